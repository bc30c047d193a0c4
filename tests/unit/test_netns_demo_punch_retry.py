"""The demo's judgement of a missed punch: a pair relayed where nat.md §2 predicts direct is waited for
(the agents' retry), not failed at once; pairs predicted relayed are never waited for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from netns import demo as D

# a1 and b1 behind port-restricted NATs in two clouds (direct by punching), a2 beside a1 (LAN),
# h1 behind a symmetric NAT (relayed against the port-restricted ones)
PROFILES = {"a1": "easy-fw", "a2": "easy-fw", "b1": "easy-fw", "h1": "hard"}


class FakeDemo(D.Demo):
    """A Demo without a lab: :meth:`statuses` replays ``frames`` (the last one repeats)."""

    def __init__(self, frames: list[dict[str, dict[str, Any] | None]]) -> None:
        super().__init__(None, None, None, {}, list(PROFILES), {}, [], dict(PROFILES))  # type: ignore[arg-type]
        self.frames = frames
        self.calls = 0

    async def statuses(self) -> dict[str, dict[str, Any] | None]:
        self.calls += 1
        return self.frames[min(self.calls, len(self.frames)) - 1]


def states(paths: dict[tuple[str, str], str]) -> dict[str, dict[str, Any] | None]:
    """Every pair up; ``paths`` names the path of a pair (both sides), the rest are direct."""
    out: dict[str, dict[str, Any] | None] = {}
    for n in PROFILES:
        rows = []
        for o in PROFILES:
            if o != n:
                path = paths.get((n, o)) or paths.get((o, n)) or "direct"
                rows.append({"label": o, "state": "up", "path": path})
        out[n] = {"peers": rows}
    return out


RELAYED_AS_PREDICTED = {(a, "h1"): "relay" for a in ("a1", "a2", "b1")} | {("a1", "a2"): "lan"}


def test_a_pair_relayed_where_direct_is_predicted_is_a_missed_punch() -> None:
    demo = FakeDemo([])
    assert D.missed_punches(demo, states(RELAYED_AS_PREDICTED)) == []
    got = D.missed_punches(demo, states(RELAYED_AS_PREDICTED | {("b1", "a1"): "relay"}))
    assert got == [("a1", "b1")]


def test_one_side_on_the_relay_is_enough_and_a_pair_not_up_is_left_to_the_convergence() -> None:
    demo = FakeDemo([])
    s = states(RELAYED_AS_PREDICTED)
    row = next(p for p in s["a1"]["peers"] if p["label"] == "b1")  # type: ignore[index]
    row["path"] = "relay"
    assert D.missed_punches(demo, s) == [("a1", "b1")]
    row["state"] = "handshaking"
    assert D.missed_punches(demo, s) == []


def test_the_wait_ends_when_the_retry_went_direct(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    missed = states(RELAYED_AS_PREDICTED | {("a1", "b1"): "relay"})
    demo = FakeDemo([missed, missed, states(RELAYED_AS_PREDICTED)])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(D.asyncio, "sleep", sleep)
    asyncio.run(D.await_punch_retries(demo, missed))
    assert demo.calls == 3 and slept == [1.0, 1.0, 1.0]
    out = capsys.readouterr().out
    assert "a1 ↔ b1" in out and "direct after the retry" in out and "waiting up to 90 s" in out


def test_nothing_missed_means_no_wait() -> None:
    demo = FakeDemo([])
    asyncio.run(D.await_punch_retries(demo, states(RELAYED_AS_PREDICTED)))
    assert demo.calls == 0


def test_the_demos_punch_timings_are_the_agents_defaults() -> None:
    """netns does not import kubespan: the demo keeps its own copy of the two timings it waits on."""
    from kubespan.nat.punch import PunchTimings

    t = PunchTimings()
    assert (D.PUNCH_WINDOW, D.PUNCH_RETRY_INITIAL) == (t.window, t.retry_initial)
