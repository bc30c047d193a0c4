"""CPU one ``kubespan run`` spends from exec to its "mesh identity" log line (start-up cost, issue 18).

In a cold start N agents start at once on 2 cores, so each agent's start-up CPU (mostly imports)
multiplies. This runs one agent at a time, each in a network namespace of its own (``unshare --net``)
with one veth whose MAC gives the mesh address, as in the lab (no ``--mac``, backend auto) and a
discovery URL nobody answers, and reads the agent's own ``time.process_time()`` (the process's CPU
since exec, children excluded) when it logs "mesh identity"; the agent then exits. CPU time rather
than wall time, so other jobs on the machine change the figure little; the load average is printed
beside it. Also printed: whether aiohttp, urllib.request and pyroute2 were loaded at that moment.

``--baseline DIR`` runs the same measurement, interleaved, against another source tree (e.g. one made
with ``git archive <rev> kubespan spanutil discovery spanapi | tar -x -C DIR``) for a before/after.
Needs root. No target: the figure is for information (``bench/mesh_cold_start.py`` has the targets).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("aiohttp", "urllib.request", "pyroute2")

# Runs the CLI as `python -m kubespan.cli` would, and at the "mesh identity" record writes the CPU
# time and the watched modules to $START_CPU_OUT and exits (nothing after start-up is measured).
WRAPPER = f"""
import logging, os, sys, time
_handle = logging.Logger.handle
def _at_identity(self, record):
    if record.msg == "mesh identity":
        cpu = time.process_time()
        loaded = [int(m in sys.modules) for m in {WATCHED!r}]
        tree = os.path.dirname(os.path.dirname(sys.modules["kubespan"].__file__))
        with open(os.environ["START_CPU_OUT"], "w") as f:
            f.write(" ".join([repr(cpu), tree, *map(str, loaded)]))
        os._exit(0)
    return _handle(self, record)
logging.Logger.handle = _at_identity
import runpy
sys.argv[0] = "kubespan"
runpy.run_module("kubespan.cli", run_name="__main__")
"""


def one_start(tree: Path, n: int) -> tuple[float, dict[str, bool]]:
    """CPU seconds to "mesh identity" of one agent whose code comes from ``tree``, and the watched modules."""
    with tempfile.TemporaryDirectory(prefix="startcpu-") as tmp:
        secret = Path(tmp) / "secret"
        secret.write_text(base64.b64encode(os.urandom(32)).decode())
        secret.chmod(0o600)
        out = Path(tmp) / "out"
        mac = f"02:00:00:5a:{n // 256:02x}:{n % 256:02x}"
        cmd = [
            "unshare", "--net", "sh", "-c",
            f'ip link add v0 address {mac} type veth peer name v1 && exec "$@"', "sh",
            sys.executable, "-c", WRAPPER,
            "run", "--cluster-id", "bench-start-cpu", "--cluster-secret-file", str(secret),
            "--discovery", "http://127.0.0.1:1", "--state-dir", f"{tmp}/state", "--socket-dir", tmp,
        ]  # fmt: skip
        env = {**os.environ, "START_CPU_OUT": str(out)}
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(
                f"agent from {tree} did not reach 'mesh identity' (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        cpu, loaded_from, *flags = out.read_text().split()
        if Path(loaded_from).resolve() != tree.resolve():
            raise SystemExit(f"the agent imported kubespan from {loaded_from}, not {tree}")
        return float(cpu), {m: f == "1" for m, f in zip(WATCHED, flags, strict=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another source tree, measured interleaved")
    ns = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_start_cpu: needs root (network namespaces)", file=sys.stderr)
        return 1
    trees = {"this tree": ROOT, **({"baseline": ns.baseline} if ns.baseline else {})}
    for tree in trees.values():
        one_start(tree, 0)  # warm-up: .pyc files written, page cache filled
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    for i in range(ns.runs):
        for name, tree in trees.items():
            seconds, loaded = one_start(tree, i + 1)
            cpu[name].append(seconds)
            mods = " ".join(f"{m}={'yes' if v else 'no'}" for m, v in loaded.items())
            print(
                f"run {i + 1} {name:9s} {seconds * 1000:6.0f} ms CPU  {mods}  load {os.getloadavg()[0]:.1f}"
            )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    for name, values in cpu.items():
        ms = sorted(round(v * 1000) for v in values)
        print(
            f"{name:9s} median {statistics.median(values) * 1000:.0f} ms CPU exec -> 'mesh identity' ({ms})"
        )
    print(f"load average {load} (2 cores: above 2 the figures are not from a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
