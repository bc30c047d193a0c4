"""bench/_meshlab.compile_bytecode: a lab's agents find every product module's bytecode up to date (issue 18)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import _meshlab


def fresh(py: Path) -> bool:
    """Does ``py`` have a ``.pyc`` that the import system would use (source mtime and size match)?"""
    pyc = Path(importlib.util.cache_from_source(str(py)))
    if not pyc.exists():
        return False
    head = pyc.read_bytes()[:16]
    st = py.stat()
    return (
        int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF
    )


def test_stale_and_missing_bytecode_is_rewritten(tmp_path: Path) -> None:
    for pkg in _meshlab.PRODUCT_PACKAGES:
        (tmp_path / pkg / "sub").mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "sub" / "mod.py").write_text("X = 1\n")
    _meshlab.compile_bytecode(tmp_path)
    mod = tmp_path / "kubespan" / "sub" / "mod.py"
    assert fresh(mod) and fresh(tmp_path / "spanapi" / "__init__.py")
    mod.write_text("X = 22\n")  # edited after its .pyc was written: stale
    os.utime(mod, (mod.stat().st_atime, mod.stat().st_mtime + 5))
    assert not fresh(mod)
    _meshlab.compile_bytecode(tmp_path)
    assert fresh(mod)


def test_a_syntax_error_is_reported_and_the_rest_compiled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for pkg in _meshlab.PRODUCT_PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "discovery" / "bad.py").write_text("def (:\n")
    _meshlab.compile_bytecode(tmp_path)
    out = capsys.readouterr().out
    assert "bad.py" in out and "compiling discovery failed" in out
    assert fresh(tmp_path / "discovery" / "__init__.py") and fresh(tmp_path / "spanutil" / "__init__.py")
