"""Generate docs/configuration.md from the daemons' argparse parsers, so the reference cannot drift.

.venv/bin/python docs/gen_config_reference.py           # rewrite docs/configuration.md
.venv/bin/python docs/gen_config_reference.py --check   # exit 1 when it is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"

# (title, module, subcommand or None, one-line description)
DAEMONS: list[tuple[str, str, str | None, str]] = [
    ("discovery-service", "discovery.server.main", None, "the discovery registry"),
    ("kubespan run", "kubespan.cli", "run", "the standalone mesh agent"),
    ("kubespan status", "kubespan.cli", "status", "peer status of a running `kubespan run`"),
    ("machined", "machined.main", None, "the node agent (mesh, machine API, services)"),
    ("apid", "machined.apid.main", None, "the mTLS gateway to machined's API"),
]

HEADER = """# Configuration reference

Generated from the daemons' command-line parsers by `docs/gen_config_reference.py`; do not edit by hand
(`tests/unit/test_deploy_docs.py` fails when this file is out of date: rerun the script).
Every daemon also takes `--help` and `--version`. In the systemd units, extra flags go into the
environment files in `/etc/kubespan-mesh/` (see `deploy/systemd/env/`).
"""


def _parser(module: str, sub: str | None) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    if sub is None:
        return p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[sub]
    raise LookupError(f"{module}: no subcommand {sub}")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(a: argparse.Action) -> str:
    if isinstance(a, argparse._StoreTrueAction):
        return "off"
    d = a.default
    if a.required:
        return "required"
    if d is None or d == [] or d is argparse.SUPPRESS:
        return "none"
    if d == socket.gethostname():
        return "the host name"
    if isinstance(d, tuple) and len(d) == 2:  # parsed HOST:PORT
        return f"`{d[0]}:{d[1]}`"
    if d == "":
        return "empty"
    if isinstance(d, int) and not isinstance(d, bool) and a.dest.endswith("mode"):
        return f"`{d:#o}`"
    if isinstance(d, int) and not isinstance(d, bool) and a.type is not None and "lambda" in repr(a.type):
        return f"`{d:#x}`" if d > 7 else f"`{d}`"
    return f"`{d}`"


def _value(a: argparse.Action) -> str:
    if a.nargs == 0:
        return ""
    if a.choices:
        return " | ".join(f"`{c}`" for c in a.choices)
    return a.metavar if isinstance(a.metavar, str) else a.dest.upper()


def render() -> str:
    out = [HEADER]
    for title, module, sub, what in DAEMONS:
        p = _parser(module, sub)
        out.append(f"\n## `{title}`: {what}\n")
        out.append("| flag | value | default | meaning |")
        out.append("|---|---|---|---|")
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction | argparse._VersionAction):
                continue
            flags = ", ".join(f"`{o}`" for o in a.option_strings)
            repeat = (
                " (repeatable)"
                if isinstance(a, argparse._AppendAction) and "repeatable" not in (a.help or "")
                else ""
            )
            help_text = (a.help or "").replace("%(default)s", str(a.default))
            out.append(f"| {flags} | {_cell(_value(a))} | {_default(a)} | {_cell(help_text + repeat)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    ns = ap.parse_args(argv)
    text = render()
    if ns.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(
                f"{OUT.relative_to(ROOT)} is out of date: run python docs/gen_config_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
