"""bench/run_all.py's summary lines (the benchmarks themselves run in bench/, not here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("run_all", Path(__file__).parents[2] / "bench" / "run_all.py")
assert spec is not None and spec.loader is not None
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)


def test_summary_keeps_each_figure_and_verdict() -> None:
    line = run_all.summarize(
        "registry_ha.py",
        [
            "RESULT registry_ha one_replica_ratio=0.47 target>=0.5 MISS",
            "RESULT registry_ha writes_per_key_per_ttl=0.18 target<=2 PASS",
        ],
        12.4,
        0,
    )
    assert "one_replica_ratio=0.47 MISS" in line and "writes_per_key_per_ttl=0.18 PASS" in line
    assert line.endswith("[12 s]")


def test_a_failed_or_silent_benchmark_is_an_error_not_a_pass() -> None:
    assert "ERROR (exit 0, 0 results)" in run_all.summarize("x.py", [], 1.0, 0)
    failed = run_all.summarize("x.py", ["RESULT x y=1 target<=2 PASS"], 1.0, 1)
    assert "ERROR (exit 1, 1 results)" in failed and "PASS" not in failed


def test_every_listed_benchmark_exists() -> None:
    for b in run_all.BENCHES:
        assert (run_all.HERE / b.split()[0]).is_file(), b
