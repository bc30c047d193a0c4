"""``kubespan run --punch-retry-initial/--punch-retry-max``: the duration grammar, the defaults, and
errors named by flag before anything runs (issue 14)."""

from __future__ import annotations

import pytest

from kubespan import cli
from kubespan.nat.punch import PunchTimings

REQUIRED = ["run", "--cluster-id", "c1", "--discovery", "http://127.0.0.1:3000", "--state-dir", "/tmp/ks"]


def test_defaults_are_one_minute_doubling_to_ten() -> None:
    t = cli.punch_timings(cli.build_parser().parse_args(REQUIRED))
    assert (t.retry_initial, t.retry_max) == (60.0, 600.0)
    assert (t.lead, t.window) == (PunchTimings().lead, PunchTimings().window)


def test_durations_use_the_project_grammar() -> None:
    ns = cli.build_parser().parse_args(
        [*REQUIRED, "--punch-retry-initial", "5s", "--punch-retry-max", "1m30s"]
    )
    t = cli.punch_timings(ns)
    assert (t.retry_initial, t.retry_max) == (5.0, 90.0)
    assert t.backoff(1) == 5.0 and t.backoff(3) == 20.0 and t.backoff(10) == 90.0
    plain = cli.build_parser().parse_args([*REQUIRED, "--punch-retry-initial", "2.5"])
    assert cli.punch_timings(plain).retry_initial == 2.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--punch-retry-initial", "soon"], "argument --punch-retry-initial: invalid duration 'soon'"),
        (["--punch-retry-max=-1s"], "argument --punch-retry-max: invalid duration"),
        (["--punch-retry-initial", "0s"], "--punch-retry-initial: must be greater than 0"),
        (
            ["--punch-retry-initial", "2m", "--punch-retry-max", "1m"],
            "--punch-retry-max: 60s is below --punch-retry-initial 120s",
        ),
    ],
)
def test_bad_values_are_named_by_flag(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*REQUIRED, *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
