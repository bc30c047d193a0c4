"""YAML in and out, the way a machine config needs it.

PyYAML's safe loader made stricter to match Talos (duplicate keys refused, string keys only, no
sexagesimals or timestamps, no secret text in syntax errors) and bounded while composing
(:data:`MAX_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_NODES` after alias expansion, :data:`MAX_DOCUMENTS`),
so a hostile document cannot stall machined. Why each limit has its value: docs/design/config-yaml.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

from machined.config.errors import ConfigValidationError, Problem

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"

_INT = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


MAX_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_DOCUMENTS = 64

try:  # libyaml's parser; the pure-Python one (same events, 30-100x slower) otherwise
    from yaml.cyaml import CParser

    _SOURCE: tuple[type, ...] = (CParser,)
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _SOURCE = (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser)


class LimitExceeded(Exception):
    """The YAML is over one of the loading limits; ``rule`` names it (see the module docstring)."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def _at(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer with the limits of the module docstring checked as each node is composed.

    ``_nodes`` counts the nodes of the stream so far with each alias counted as the expanded size of
    its node (``_sizes``, per anchor, known once the anchored node is complete); ``_depth`` is the
    number of open collections and ``_peak`` the deepest point reached (aliases included), from which
    an anchored node's height (``_heights``) is known. An alias whose node is not complete yet is
    recursive.
    """

    def __init__(self) -> None:
        super().__init__()
        self._nodes = 0
        self._documents = 0
        self._depth = 0
        self._peak = 0
        self._sizes: dict[str, int] = {}
        self._heights: dict[str, int] = {}

    def compose_document(self) -> Any:
        self._documents += 1
        if self._documents > MAX_DOCUMENTS:
            raise LimitExceeded(f"more than {MAX_DOCUMENTS} documents{_at(self.peek_event().start_mark)}")
        node = super().compose_document()
        self._sizes.clear()
        self._heights.clear()
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            anchor = event.anchor
            if anchor in self.anchors and anchor not in self._sizes:
                raise LimitExceeded(
                    f"alias *{anchor} refers to a node that contains it{_at(event.start_mark)}"
                )
            if anchor in self._sizes:
                self._nodes += self._sizes[anchor]
                if self._nodes > MAX_NODES:
                    raise LimitExceeded(f"alias expansion exceeds {MAX_NODES} nodes{_at(event.start_mark)}")
                deepest = self._depth + self._heights[anchor]
                if deepest > MAX_DEPTH:
                    raise LimitExceeded(
                        f"nesting deeper than {MAX_DEPTH} levels through alias *{anchor}{_at(event.start_mark)}"
                    )
                self._peak = max(self._peak, deepest)
            return super().compose_node(parent, index)  # undefined alias: PyYAML's error
        event = self.peek_event()
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise LimitExceeded(f"more than {MAX_NODES} nodes{_at(event.start_mark)}")
        anchor = event.anchor
        if anchor is None or anchor in self.anchors:  # a duplicate anchor: PyYAML's error
            return super().compose_node(parent, index)
        nodes, peak = self._nodes, self._peak
        self._peak = self._depth
        node = super().compose_node(parent, index)
        self._sizes[anchor] = self._nodes - nodes + 1
        self._heights[anchor] = self._peak - self._depth
        self._peak = max(peak, self._peak)
        return node

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise LimitExceeded(f"nesting deeper than {MAX_DEPTH} levels{_at(self.peek_event().start_mark)}")
        self._peak = max(self._peak, self._depth)

    def compose_sequence_node(self, anchor: Any) -> Any:
        self._enter()
        node = super().compose_sequence_node(anchor)
        self._depth -= 1
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        self._enter()
        node = super().compose_mapping_node(anchor)
        self._depth -= 1
        return node


class _Loader(_BoundedComposer, *_SOURCE, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):  # type: ignore[misc]
    def __init__(self, stream: str) -> None:
        if len(_SOURCE) == 1:
            _SOURCE[0].__init__(self, stream)  # type: ignore[misc]
        else:  # pragma: no cover - PyYAML without libyaml
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        _BoundedComposer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"mapping keys must be strings, found a {type(key).__name__}", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_str(value)


_Dumper.add_representer(str, _represent_str)


def syntax_problem(err: yaml.YAMLError, what: str = "yaml") -> Problem:
    """A YAML error as a :class:`Problem` with position and reason but no quoted source text."""
    reason = "not valid YAML"
    if isinstance(err, yaml.MarkedYAMLError):
        reason = err.problem or err.context or reason
        mark = err.problem_mark or err.context_mark
        if mark is not None:
            reason = f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {reason}"
    return Problem(what, -1, "", reason)


def load_documents(text: str | bytes, what: str = "yaml") -> list[Any]:
    """All non-empty documents of a multi-document YAML stream.

    Raises :class:`ConfigValidationError` on a syntax error (position and reason only) and when the
    text is over one of the limits of the module docstring (the problem names the limit).
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigValidationError((Problem(what, -1, "", f"{size} bytes, limit {MAX_BYTES} (4 MiB)"),))
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigValidationError(
                (Problem(what, -1, "", f"must be UTF-8 text (invalid byte at offset {e.start})"),)
            ) from None
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))  # safe: SafeConstructor, bounded composer
    except yaml.YAMLError as e:
        if "maximum nesting depth" in str(getattr(e, "problem", "")):  # libyaml's own bound (1000)
            mark = getattr(e, "problem_mark", None)
            raise ConfigValidationError(
                (Problem(what, -1, "", f"nesting deeper than {MAX_DEPTH} levels{_at(mark)}"),)
            ) from None
        raise ConfigValidationError((syntax_problem(e, what),)) from None
    except LimitExceeded as e:
        raise ConfigValidationError((Problem(what, -1, "", e.rule),)) from None
    except RecursionError:  # not expected within MAX_DEPTH; never an UNKNOWN with a huge traceback
        raise ConfigValidationError((Problem(what, -1, "", "nested too deeply"),)) from None
    return [d for d in docs if d is not None]


def dump_documents(docs: Sequence[Any]) -> str:
    """Documents as multi-document YAML (``---`` between documents)."""
    return yaml.dump_all(
        list(docs),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        indent=4,
        width=1_000_000,
    )


def dump_document(doc: Any) -> str:
    return dump_documents([doc])
