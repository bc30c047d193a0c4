"""The pyroute2 stand-in (kubespan.lazynetlink): the agent's run path loads only the submodules it
uses, and any caller still gets the whole package when it asks the package for a name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PRODUCT = ("kubespan", "machined", "discovery", "netns", "spanutil", "spanapi")
# The pyroute2 imports of the run path (kernel backend, links, host view), as the code writes them.
RUN_PATH = (
    "import sys, kubespan.cli, kubespan.wiring, kubespan.hostinfo, kubespan.dataplane.links\n"
    "import kubespan.dataplane.nft, kubespan.wireguard.kernel, kubespan.wireguard.userspace\n"
    "from pyroute2.iproute import AsyncIPRoute\n"
    "from pyroute2.netlink.generic.wireguard import AsyncWireGuard\n"
    "from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR\n"
)


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.strip()


def test_the_run_path_leaves_pyroute2s_other_families_unloaded() -> None:
    out = run(
        RUN_PATH
        + "print(*[m for m in ('pyroute2.ndb', 'pyroute2.ipdb', 'pyroute2.plan9') if m in sys.modules])"
    )
    assert out == ""


def test_asking_the_package_for_a_name_loads_the_whole_package_once() -> None:
    out = run(
        RUN_PATH
        + "import pyroute2\n"
        + "from pyroute2 import IPRoute, NDB\n"
        + "from pyroute2.iproute.linux import IPRoute as Direct\n"
        + "print(IPRoute is Direct, NDB.__name__, pyroute2.__version__ != 'unknown',\n"
        + "      sys.modules['pyroute2'] is pyroute2, '__getattr__' in vars(pyroute2))"
    )
    assert out == "True NDB True True False"


def test_a_name_the_package_lacks_is_an_import_error_naming_it() -> None:
    out = run(
        "import kubespan\n"
        "try:\n"
        "    from pyroute2 import NoSuchThing\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, 'NoSuchThing' in str(e))"
    )
    assert out == "ImportError True"


def test_installing_after_pyroute2_was_imported_changes_nothing() -> None:
    out = run(
        "import pyroute2, sys\n"
        "before = sys.modules['pyroute2']\n"
        "from kubespan import lazynetlink\n"
        "lazynetlink.install()\n"
        "print(sys.modules['pyroute2'] is before, '__getattr__' in vars(before))"
    )
    assert out == "True False"


def test_product_code_imports_pyroute2_names_from_their_submodules() -> None:
    """``from pyroute2 import X`` (or ``import pyroute2``) in our code would run the whole package's
    ``__init__`` at that point, undoing the stand-in on the path that reaches it."""
    bare = re.compile(r"^\s*(from\s+pyroute2\s+import\s|import\s+pyroute2\s*(#.*)?$)", re.MULTILINE)
    found = [
        f"{path.relative_to(REPO)}:{text[: m.start()].count(chr(10)) + 1}"
        for pkg in PRODUCT
        for path in sorted((REPO / pkg).rglob("*.py"))
        for text in [path.read_text()]
        for m in bare.finditer(text)
    ]
    assert found == []
