"""Regenerate the Python stubs in ``spanapi/`` from the ``.proto`` sources in ``proto/``.

Usage: ``python scripts/genproto.py [--out DIR]`` (default: the repository root).
The unit test ``tests/unit/test_proto_stubs.py`` regenerates into a temporary
directory and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "spanapi"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def googleapis_include() -> str:
    """The directory holding googleapis-common-protos' ``google/rpc/status.proto``: common.proto uses
    that package's google.rpc.Status (a local copy collided with it in one descriptor pool)."""
    status = Path(str(resources.files("google.rpc") / "status.proto"))
    if not status.is_file():
        raise SystemExit("googleapis-common-protos does not ship google/rpc/status.proto: install it")
    return str(status.parents[2])


def generate(out: Path) -> list[Path]:
    """Generate stubs for every .proto under proto/ into ``out``; return the files written."""
    include = str(resources.files("grpc_tools") / "_proto")
    files = proto_files()
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"-I{googleapis_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(f.relative_to(PROTO_DIR)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory of the generated tree becomes a regular package.
    pkg = out / PACKAGE
    for d in [pkg, *(p for p in pkg.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf stubs (see scripts/genproto.py)."""\n')
    # grpc stubs of messages-only files are empty boilerplate: drop them.
    for p in pkg.rglob("*_pb2_grpc.py"):
        if "Stub" not in p.read_text():
            p.unlink()
    return sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: repository root)")
    ns = ap.parse_args(argv)
    for p in generate(ns.out):
        print(p.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
