"""YAML in and out, the way a machine config needs it.

Loading is PyYAML's safe loader with four changes that bring it closer to what Talos (go-yaml v3)
accepts and keep values predictable:

* duplicate keys are an error (PyYAML silently keeps the last one);
* mapping keys must be strings;
* no sexagesimal numbers (``52:54:00:12:34:56`` stays a string, not 11 million) and no timestamps
  (``2024-01-01`` stays a string);
* syntax errors carry line and column but never the text of the offending line, which could be a
  secret.

Dumping produces block style, 4-space indents and indented lists (Talos's look) and literal blocks for multi-line
strings.
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


class _Loader(yaml.SafeLoader):
    pass


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

    Raises :class:`ConfigValidationError` on a syntax error (position and reason only).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigValidationError(
                (Problem(what, -1, "", f"must be UTF-8 text (invalid byte at offset {e.start})"),)
            ) from None
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))  # our _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigValidationError((syntax_problem(e, what),)) from None
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
