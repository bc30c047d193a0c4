"""Problems, warnings and errors of the machine config.

Every problem names the document (``v1alpha1``, ``KubeSpanConfig``, ``ServiceConfig[etcd]`` or
``document N`` when the document cannot be identified), the field path inside it and the rule that
was broken. Messages never carry the value of a secret field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_LISTED = 10  # problems (or warning paths) listed in a message; the rest are counted
MAX_LINE = 300  # characters of one listed item (a field path can hold a key of any length)


def clip(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def listing(items: Sequence[str], limit: int = MAX_LISTED) -> tuple[list[str], str]:
    """The first ``limit`` items, each clipped, and ``and N more`` (or "") for the rest."""
    rest = len(items) - limit
    return [clip(i) for i in items[:limit]], (f"and {rest} more" if rest > 0 else "")


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: ``v1alpha1.cluster.secret (document 1): must be base64 of 32 bytes``."""

    document: str  # document label: "v1alpha1", "KubeSpanConfig", "ServiceConfig[etcd]", "document 3"
    index: int  # 0-based position of the document in the file; -1 when not about one document
    path: str  # field path inside the document ("cluster.secret", "args[2]"); "" = the document itself
    rule: str  # what is required, never the value of a secret

    @property
    def location(self) -> str:
        """``<document>.<path>``, the way field paths are written in messages."""
        if not self.path:
            return self.document
        sep = "" if self.path.startswith("[") else "."
        return f"{self.document}{sep}{self.path}"

    def __str__(self) -> str:
        where = f" (document {self.index + 1})" if self.index >= 0 else ""
        return f"{self.location}{where}: {self.rule}"


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Accepted but worth knowing: unused Talos fields, settings without effect on a Linux agent."""

    document: str
    index: int
    message: str
    paths: tuple[str, ...] = ()  # full field paths the warning is about ("v1alpha1.machine.kubelet")

    def __str__(self) -> str:
        where = f" (document {self.index + 1})" if self.index >= 0 else ""
        shown, more = listing(self.paths)
        listed = f": {', '.join([*shown, more] if more else shown)}" if self.paths else ""
        return clip(f"{self.document}{where}: {clip(self.message, 4 * MAX_LINE)}{listed}", 8 * MAX_LINE)


class ConfigValidationError(ValueError):
    """The config is invalid; ``problems`` holds every broken rule found (not only the first).

    The message lists the first :data:`MAX_LISTED` problems, each cut to :data:`MAX_LINE` characters,
    and counts the rest: it stays a few KB whatever the config (it travels in a gRPC status, whose
    metadata is limited to 8 KiB, and in logs and events).
    """

    def __init__(self, problems: tuple[Problem, ...], warnings: tuple[ConfigWarning, ...] = ()) -> None:
        self.problems = problems
        self.warnings = warnings
        n = len(problems)
        shown, more = listing([str(p) for p in problems[: MAX_LISTED + 1]])
        lines = [f"invalid machine config ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in shown]
        if more:
            lines.append(f"  - and {n - MAX_LISTED} more")
        super().__init__("\n".join(lines))


class PatchError(ValueError):
    """A patch cannot be applied; names the operation (JSON patch) or patch document and the path."""

    def __init__(
        self,
        message: str,
        *,
        op_index: int | None = None,
        op: str = "",
        path: str = "",
        document: str = "",
    ) -> None:
        self.op_index = op_index
        self.op = op
        self.path = path
        self.document = document
        self.reason = message
        if op_index is not None:
            head = f"JSON patch op[{op_index}]"
            if op:
                head += f" {op}"
            if path or op:
                head += f" {path!r}"
            if document:
                head += f" in {document}"
        else:
            head = "strategic merge patch"
            if document:
                head += f" {document}"
            if path:
                head += f" at {path}"
        super().__init__(f"{head}: {message}")


class ApplyError(Exception):
    """An apply request that cannot be honoured; ``code`` maps onto a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "failed_precondition" | "invalid_argument" | "unimplemented"
