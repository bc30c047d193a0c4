"""spanutil: the one duration grammar and the one byte<->IP codec."""

from __future__ import annotations

import argparse

import pytest

from spanutil.durations import DurationError, parse_duration

# Every form the three former parsers accepted (discovery-service flags, spanctl flags, machined
# config fields), one grammar now.
GOOD = [
    # Go durations (machined config; the flags accepted the ms/s/m/h subset)
    ("5s", 5.0),
    ("500ms", 0.5),
    ("1m30s", 90.0),
    ("10m30s", 630.0),
    ("1h", 3600.0),
    ("1h2m3.5s", 3723.5),
    ("1.5s", 1.5),
    ("1.s", 1.0),
    (".5s", 0.5),
    ("250us", 0.00025),
    ("250µs", 0.00025),
    ("250μs", 0.00025),
    ("10ns", 1e-8),
    ("8760h", 8760 * 3600.0),
    ("1m1m", 120.0),
    ("0s", 0.0),
    (" 30s ", 30.0),
    # plain seconds (the flags; config had only "0")
    ("0", 0.0),
    ("90", 90.0),
    ("1.5", 1.5),
    ("1e3", 1000.0),
    # numbers (YAML values in config)
    (3, 3.0),
    (0.25, 0.25),
]


@pytest.mark.parametrize(("value", "seconds"), GOOD)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "  ",
        "s",
        "5 s",
        "5 minutes",
        "1d",
        "5x",
        "1.2.3s",
        "-1s",
        "-5",
        "+5s",
        "inf",
        "nan",
        "1e400",
        "1_000",
        ".s",
        True,
        None,
        -1,
        float("nan"),
        float("inf"),
        [1],
    ],
)
def test_bad_durations_name_the_input(bad):
    with pytest.raises(DurationError) as e:
        parse_duration(bad)
    assert repr(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_argparse_shows_the_message():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--every", type=parse_duration)
    assert p.parse_args(["--every", "1m30s"]).every == 90.0
    with pytest.raises(argparse.ArgumentError, match=r"invalid duration '5 minutes'"):
        p.parse_args(["--every", "5 minutes"])
