"""The kernel lab: run the ``kernel``-marked tests inside a VM booted with Debian's kernel.

The host kernel of these machines has neither the WireGuard module nor ``sch_netem``, so the kernel
WireGuard backend and the netem impairments are tested in a virtual machine: virtme-ng (``vng``) boots
``/boot/vmlinuz-*`` (Debian's ``linux-image-amd64``) under QEMU over the host's own root filesystem
(read-only; the repository is shared read-write), so the project's ``.venv`` and tests run unchanged.
Nested virtualisation does not work here, so QEMU emulates the CPU (TCG, ``--disable-kvm``): expect
everything inside to be 10-20 times slower than on the host.

Inside, ``pytest -m kernel`` writes a junit XML and a log to ``.kernel-lab/`` in the repository; back
on the host this script prints the summary and exits non-zero when a test failed or errored, when the
run did not finish in ``--timeout`` seconds, or when the VM could not start. A VM that cannot start
(missing QEMU, kernel or busybox; QEMU failing) fails the run when ``CI`` is set (``CI=true``) and is
reported as a skip, with the reason, otherwise.

    python scripts/kernel_lab.py                       # every kernel test (make test-kernel)
    python scripts/kernel_lab.py -k sigterm            # extra arguments go to pytest inside the VM
    python scripts/kernel_lab.py tests/kernel/test_kernel_netlink.py

Exit status: 0 passed (or skipped outside CI), 1 failed / could not start in CI / timed out, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / ".kernel-lab"
DEFAULT_TIMEOUT = 900.0  # the VM part's budget on a 2-core machine: runs took 462-488 s and, on a slower
# day of the same machine, 695 s (2026-12-07); a hang guard with room for that, not a target
MEMORY = "2G"
CPUS = 2


class CannotStart(Exception):
    """The VM could not be started (a missing prerequisite, or QEMU/the kernel failed to boot)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_kernel(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CannotStart(f"kernel image {path} does not exist")
        return path
    images = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not images:
        raise CannotStart("no /boot/vmlinuz-*: install Debian's linux-image-amd64 (make kernel-lab-deps)")
    return Path(images[-1])


def _version_key(path: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def find_vng() -> Path:
    venv_vng = Path(sys.executable).parent / "vng"
    if venv_vng.exists():
        return venv_vng
    found = shutil.which("vng")
    if found is None:
        raise CannotStart("vng not found: install virtme-ng (pip install -e '.[dev]', i.e. make venv)")
    return Path(found)


def check_prerequisites() -> None:
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    if not any(shutil.which(b) for b in ("busybox-static", "busybox.static", "busybox")):
        missing.append("busybox for the VM's initramfs (Debian package busybox-static)")
    if missing:
        raise CannotStart("missing " + "; ".join(missing) + " (make kernel-lab-deps installs them)")


def inside_script(pytest_args: list[str], ci: bool) -> str:
    """What runs in the VM (as root, in the repository): load the modules, run pytest, keep its status."""
    results = shlex.quote(str(RESULTS))
    python = shlex.quote(str(Path(sys.executable)))
    args = shlex.join(pytest_args)
    return f"""#!/bin/bash
# written by scripts/kernel_lab.py; runs inside the kernel-lab VM
set -u
cd {shlex.quote(str(REPO))}
R={results}
uname -r > "$R/booted"
echo "kernel lab: booted $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {{print $2 / 1024}}' /proc/meminfo) MiB"
modprobe wireguard || echo "kernel lab: modprobe wireguard failed"
modprobe sch_netem || echo "kernel lab: modprobe sch_netem failed"
export KUBESPAN_KERNEL_LAB=1 PYTHONUNBUFFERED=1 {"CI=true" if ci else ""}
export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH
{python} -m pytest -m kernel -p no:cacheprovider -v -rA --durations=10 \\
    --junitxml="$R/junit.xml" {args} 2>&1 | tee "$R/pytest.log"
echo "${{PIPESTATUS[0]}}" > "$R/pytest.rc"
"""


def vng_command(vng: Path, kernel: Path, script: Path) -> list[str]:
    cmd = [str(vng), "--run", str(kernel), "--disable-kvm", "--memory", MEMORY, "--cpus", str(CPUS)]
    cmd += ["--rwdir", str(REPO), "--cwd", str(REPO)]
    if os.geteuid() != 0:
        cmd += ["--user", "root"]  # network namespaces and WireGuard links need root inside
    return [*cmd, "--", f"bash {shlex.quote(str(script))}"]


@dataclass
class Summary:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def read_junit(path: Path) -> Summary:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    s = Summary()
    for suite in suites:
        s.tests += int(suite.get("tests", 0))
        s.failures += int(suite.get("failures", 0))
        s.errors += int(suite.get("errors", 0))
        s.skipped += int(suite.get("skipped", 0))
        s.seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for kind in ("failure", "error"):
                for el in case.findall(kind):
                    first = (el.get("message") or "").strip().splitlines()[:1]
                    s.failed.append(f"{kind.upper()} {name}: {first[0] if first else ''}"[:300])
            for el in case.findall("skipped"):
                s.skips.append(f"SKIPPED {name}: {el.get('message', '')}"[:300])
    return s


def run_vm(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run vng, relaying its console to stdout and ``log``; (exit status or None on timeout, seconds)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(cmd[0]).parent}:{env.get('PATH', '')}"  # vng calls virtme-run from its own dir
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

        def relay() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()

        pump = threading.Thread(target=relay, daemon=True)
        pump.start()
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        pump.join(10)
    return rc, time.monotonic() - t0


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"


def cannot_start(reason: str, ci: bool) -> int:
    if ci:
        print(f"kernel lab: FAILED: the VM cannot start: {reason}", file=sys.stderr)
        print("kernel lab: in CI (CI is set) this is an error, never a skip", file=sys.stderr)
        return 1
    print(f"kernel lab: SKIPPED: the VM cannot start: {reason}")
    print("kernel lab: (outside CI this is a skip; with CI=true it fails)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run the kernel-marked tests in a VM with Debian's kernel (virtme-ng, QEMU TCG).",
        epilog="Arguments after the options (or after --) go to pytest inside the VM.",
    )
    ap.add_argument(
        "--kernel", default=os.environ.get("KERNEL_LAB_KERNEL"), help="default: newest /boot/vmlinuz-*"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("KERNEL_LAB_TIMEOUT", DEFAULT_TIMEOUT)),
        help=f"seconds for the whole VM run (default {DEFAULT_TIMEOUT:.0f})",
    )
    ns, pytest_args = ap.parse_known_args(argv)
    if not pytest_args or all(a.startswith("-") for a in pytest_args):
        pytest_args = [*pytest_args, "tests/kernel"]
    ci = in_ci()

    try:
        check_prerequisites()
        kernel = find_kernel(ns.kernel)
        vng = find_vng()
    except CannotStart as e:
        return cannot_start(str(e), ci)

    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir()
    script = RESULTS / "inside.sh"
    script.write_text(inside_script(pytest_args, ci))
    cmd = vng_command(vng, kernel, script)
    print(f"kernel lab: {shlex.join(cmd)}", flush=True)
    print(f"kernel lab: pytest {shlex.join(pytest_args)} inside; results in {RESULTS}", flush=True)
    rc, took = run_vm(cmd, RESULTS / "vm.log", ns.timeout)

    booted = RESULTS / "booted"
    if not booted.exists():
        why = "timed out before booting" if rc is None else f"vng exited {rc} before the guest ran anything"
        return cannot_start(f"{why} ({kernel}); its output:\n{tail(RESULTS / 'vm.log')}", ci)
    guest = booted.read_text().strip()
    junit = RESULTS / "junit.xml"
    if rc is None:
        print(
            f"kernel lab: FAILED: the VM run exceeded {ns.timeout:.0f}s and was stopped; last output:\n"
            f"{tail(RESULTS / 'pytest.log')}",
            file=sys.stderr,
        )
        return 1
    if not junit.exists():
        print(
            f"kernel lab: FAILED: no results came back from the VM (vng exited {rc}); last output:\n"
            f"{tail(RESULTS / 'vm.log')}",
            file=sys.stderr,
        )
        return 1
    try:
        pytest_rc = int((RESULTS / "pytest.rc").read_text().strip())
    except (OSError, ValueError):
        pytest_rc = -1
    s = read_junit(junit)
    print()
    print(
        f"kernel lab: kernel {guest}, QEMU TCG, {CPUS} CPUs, {MEMORY}; VM run {took:.0f}s (budget {ns.timeout:.0f}s)"
    )
    for line in s.skips + s.failed:
        print(f"  {line}")
    print(
        f"kernel lab: {s.passed} passed, {s.failures} failed, {s.errors} errors, {s.skipped} skipped "
        f"in {s.seconds:.0f}s of tests; junit {junit}, log {RESULTS / 'pytest.log'}"
    )
    if s.tests == 0:
        print("kernel lab: FAILED: no kernel tests were collected", file=sys.stderr)
        return 1
    if s.failures or s.errors or pytest_rc != 0:
        print(f"kernel lab: FAILED (pytest exit status {pytest_rc})", file=sys.stderr)
        return 1
    print("kernel lab: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
