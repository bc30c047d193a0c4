"""Problems, warnings and errors of the machine config.

Every problem names the document (``v1alpha1``, ``KubeSpanConfig``, ``ServiceConfig[etcd]`` or
``document N`` when the document cannot be identified), the field path inside it and the rule that
was broken. Messages never carry the value of a secret field.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        listed = f": {', '.join(self.paths)}" if self.paths else ""
        return f"{self.document}{where}: {self.message}{listed}"


class ConfigValidationError(ValueError):
    """The config is invalid; ``problems`` holds every broken rule found (not only the first)."""

    def __init__(self, problems: tuple[Problem, ...], warnings: tuple[ConfigWarning, ...] = ()) -> None:
        self.problems = problems
        self.warnings = warnings
        n = len(problems)
        lines = [f"invalid machine config ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in problems]
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
