"""The import graph: imports point down only (packages as listed in README.md, "Layout").

spanctl, apid -> machined -> kubespan -> discovery -> spanapi (generated stubs)
netns (the lab) may use discovery.testing; product code never imports netns.
spanutil (logs, durable writes, durations, IP codec) is a leaf every layer may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("spanapi", "spanutil", "discovery", "kubespan", "machined", "netns")

# package -> prefixes of our modules it may import (besides itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "spanapi": (),
    "spanutil": (),
    "discovery": ("spanapi", "spanutil"),
    "kubespan": ("spanapi", "spanutil", "discovery.client", "discovery.crypto", "discovery.limits"),
    "machined": ("spanapi", "spanutil", "discovery", "kubespan"),
    "netns": ("spanutil", "discovery.testing"),
}
# modules allowed to reach further for tests/demos (they are not imported by product code)
EXEMPT = {"discovery/testing.py", "discovery/demo.py"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.split(".")[0] in OURS}


def test_imports_point_down() -> None:
    violations = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in EXEMPT:
                continue
            for mod in imports_of(path):
                if mod.split(".")[0] == pkg or any(mod == a or mod.startswith(a + ".") for a in allowed):
                    continue
                violations.append(f"{rel} imports {mod}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_product_code_never_imports_the_lab() -> None:
    for pkg in ("discovery", "kubespan", "machined"):
        for path in (ROOT / pkg).rglob("*.py"):
            assert not any(m.startswith("netns") for m in imports_of(path)), path


def test_generated_stubs_import_nothing_of_ours_but_themselves() -> None:
    for path in (ROOT / "spanapi").rglob("*.py"):
        assert all(m.startswith("spanapi") for m in imports_of(path)), path


def test_spanutil_is_a_leaf_every_layer_may_import() -> None:
    assert (ROOT / "README.md").read_text().count("spanutil/") >= 1
    for path in (ROOT / "spanutil").rglob("*.py"):
        assert all(m.startswith("spanutil") for m in imports_of(path)), path
    for pkg, allowed in ALLOWED.items():
        if pkg not in ("spanapi", "spanutil"):
            assert "spanutil" in allowed, pkg


# Inside kubespan: NAT traversal and the relay are leaves the engine uses; they see only value types.
LEAVES: dict[str, tuple[str, ...]] = {
    "kubespan/nat": ("kubespan.nat", "kubespan.affiliate", "kubespan.wireguard.types", "kubespan.constants"),
    "kubespan/relay": ("kubespan.relay", "kubespan.wireguard.types", "kubespan.constants"),
}
# Fakes and test helpers: tests, benches and the lab use them, product code never does.
TEST_SUPPORT = (
    "kubespan.testing",
    "kubespan.wireguard.fake",
    "kubespan.dataplane.fake",
    "kubespan.relay.testing",
    "discovery.testing",
    "discovery.hostile",
    "discovery.abuse",
    "machined.daemon.testing",
    "machined.apid.testing",
)


def test_traversal_leaves_import_only_value_types() -> None:
    violations = []
    for folder, allowed in LEAVES.items():
        assert (ROOT / folder / "__init__.py").is_file(), folder
        for path in sorted((ROOT / folder).rglob("*.py")):
            for mod in imports_of(path):
                top = mod.split(".")[0]
                if top in ("spanutil", "spanapi") or any(
                    mod == a or mod.startswith(a + ".") for a in allowed
                ):
                    continue
                violations.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not violations, "\n".join(violations)


def test_product_code_never_imports_test_support() -> None:
    support_files = {m.replace(".", "/") + ".py" for m in TEST_SUPPORT}
    missing = [f for f in support_files if not (ROOT / f).is_file()]
    assert not missing, f"stale TEST_SUPPORT entries: {missing}"
    violations = []
    for pkg in ("discovery", "kubespan", "machined"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in support_files or rel in EXEMPT:
                continue
            bad = sorted(m for m in imports_of(path) if m in TEST_SUPPORT)
            if bad:
                violations.append(f"{rel} imports {', '.join(bad)}")
    assert not violations, "\n".join(violations)
