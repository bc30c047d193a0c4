"""A seeded simulation of one peer's path, driving :class:`~kubespan.endpoints.EndpointMachine`.

Pure (no sockets, no real clock): an event queue holds our pings, probes and keepalives, the
peer's answers and keepalives, and the engine's polls. It answers two questions about a set of
:class:`~kubespan.constants.DetectionTimings` and gives the probing cost of each:

* failover: the time from black-holing the endpoint in use (both directions) to pings flowing
  again, measured as ``bench/mesh_failover.py`` measures it in the lab (the reply time of the first
  of 5 consecutive answered pings sent after the black-hole, 10 Hz pings);
* spurious switches: endpoint changes while nothing is broken, only every packet lost with
  probability ``loss`` in each direction, over simulated hours; beside the count, the expected
  rate from the episodes seen and the chance that all ``dead_min_probes`` probe round trips of one
  episode are lost.

The model: one round trip takes ``rtt``; WireGuard's session stays valid (re-keyed every 120 s);
the peer answers pings and probes at once and roams to where our packets come from; each side
sends a persistent keepalive 25 s after its last packet sent or received. The engine polls every
``poll_interval`` or sooner when the machine asks (:attr:`EndpointMachine.due`), wakes on a probe
reply as the real engine does, and applies a decision ``engine_delay`` later. Run
``python -m kubespan.endpointsim`` for the figures (docs/design/endpoints.md quotes them).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kubespan.constants import PERSISTENT_KEEPALIVE, WG_REKEY_AFTER_TIME, DetectionTimings
from kubespan.endpoints import Candidate, CandidateKind, EndpointMachine, Observation
from kubespan.wireguard.types import AddrPort

STEADY = 5  # consecutive answered pings that count as "flowing" (as the lab benchmark)
DATA = 96  # bytes of a ping or probe on the wire (WireGuard's counters count these)
KEEPALIVE = 32


@dataclass(frozen=True, slots=True)
class SimConfig:
    loss: float = 0.0  # per packet and direction
    ping_hz: float | None = 1.0  # our steady traffic to the peer (None: idle but for keepalives)
    rtt: float = 0.002
    engine_delay: float = 0.002  # from an observation to its decision applied
    candidates: int = 2
    timings: DetectionTimings = field(default_factory=DetectionTimings)
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss: {self.loss!r} must be in [0, 1)")
        if self.ping_hz is not None and not self.ping_hz > 0:
            raise ValueError(f"ping_hz: {self.ping_hz!r} must be greater than 0")
        if not self.rtt >= 0 or not self.engine_delay >= 0:
            raise ValueError("rtt and engine_delay must be at least 0")
        if self.candidates < 1:
            raise ValueError(f"candidates: {self.candidates} must be at least 1")


def endpoints(n: int) -> tuple[AddrPort, ...]:
    return tuple(AddrPort(f"10.6{i + 1}.0.3", 51820) for i in range(n))


class PathSim:
    """Us, one peer with ``cfg.candidates`` endpoints, and the lossy network between."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = 0.0
        self.candidates = endpoints(cfg.candidates)
        cands = [Candidate(e, CandidateKind.SAME_SUBNET) for e in self.candidates]
        self.m = EndpointMachine(cfg.timings, now=0.0, candidates=cands)
        self.blackholed: set[AddrPort] = set()
        self.endpoint: AddrPort | None = None  # our WireGuard's endpoint for the peer
        self.peer_source: AddrPort | None = None  # where the peer sends to us from (it roams)
        self.rx = self.tx = 0
        self.hs: float | None = None
        self.answered = False
        self.rtt: float | None = None  # of the probe answered since the last poll
        self.ping_seq = 0
        self.ping_sent: dict[int, float] = {}
        self.ping_reply: dict[int, float] = {}
        self.probe_times: list[float] = []
        self.switches: list[tuple[float, AddrPort]] = []
        self._q: list[tuple[float, int, str, object]] = []
        self._n = 0
        self._poll_gen = 0
        self._last_full = -1e9
        self._our_last = 0.0
        self._their_last = -self.rng.uniform(0, PERSISTENT_KEEPALIVE)  # keepalives out of phase
        self._push(0.0, "poll", 0)
        self._push(self._their_last + PERSISTENT_KEEPALIVE, "their_ka", None)
        if cfg.ping_hz is not None:
            self._push(0.5, "ping", None)

    # --- the event queue ---------------------------------------------------------------------------

    def _push(self, at: float, kind: str, data: object) -> None:
        self._n += 1
        heapq.heappush(self._q, (at, self._n, kind, data))

    def run(self, until: float) -> None:
        while self._q and self._q[0][0] <= until:
            at, _, kind, data = heapq.heappop(self._q)
            self.now = at
            getattr(self, "_on_" + kind)(data)
        self.now = until

    def run_until(self, until: float, cond: Callable[[], bool]) -> bool:
        """Run until ``cond()`` holds (checked after each event) or ``until``; whether it held."""
        while self._q and self._q[0][0] <= until:
            at, _, kind, data = heapq.heappop(self._q)
            self.now = at
            getattr(self, "_on_" + kind)(data)
            if cond():
                return True
        self.now = until
        return False

    # --- the network ------------------------------------------------------------------------------

    def _through(self, via: AddrPort | None) -> bool:
        return via is not None and via not in self.blackholed and self.rng.random() >= self.cfg.loss

    def _we_send(self, kind: str, seq: int = 0) -> None:
        via = self.endpoint
        if via is None:
            return
        self._our_last = self.now
        self._push(self.now + PERSISTENT_KEEPALIVE, "our_ka", self.now)
        self.tx += KEEPALIVE if kind == "ka" else DATA
        if self.hs is None or self.now - self.hs >= WG_REKEY_AFTER_TIME:
            self.hs = self.now  # the re-key rides along (its loss is not modelled)
        if self._through(via):
            self._push(self.now + self.cfg.rtt / 2, "at_peer", (kind, via, seq or self.now))

    def _on_at_peer(self, data: object) -> None:
        kind, via, seq = data  # type: ignore[misc]
        self.peer_source = via  # roaming: it answers where our packet came from
        self._their_last = self.now
        if kind == "ka":
            return
        if self._through(via):
            self._push(self.now + self.cfg.rtt / 2, "at_us", (kind, seq))

    def _on_at_us(self, data: object) -> None:
        kind, seq = data  # type: ignore[misc]
        self.rx += KEEPALIVE if kind == "ka" else DATA
        self._our_last = self.now
        self._push(self.now + PERSISTENT_KEEPALIVE, "our_ka", self.now)
        if kind == "ping":
            self.ping_reply.setdefault(seq, self.now)
        elif kind == "probe":
            self.answered = True
            self.rtt = self.now - seq  # (a probe carries its send time)
            self._push(self.now, "poll", self._poll_gen)  # the prober wakes the engine

    def _on_ping(self, _: object) -> None:
        assert self.cfg.ping_hz is not None
        self.ping_seq += 1
        self.ping_sent[self.ping_seq] = self.now
        self._we_send("ping", self.ping_seq)
        self._push(self.now + 1 / self.cfg.ping_hz, "ping", None)

    def _on_our_ka(self, last: object) -> None:
        if self._our_last == last:
            self._we_send("ka")

    def _on_their_ka(self, _: object) -> None:
        if self.now - self._their_last >= PERSISTENT_KEEPALIVE - 1e-9:
            self._their_last = self.now
            if self._through(self.peer_source):
                self._push(self.now + self.cfg.rtt / 2, "at_us", ("ka", 0))
        self._push(self._their_last + PERSISTENT_KEEPALIVE, "their_ka", None)

    # --- the engine -------------------------------------------------------------------------------

    def _on_poll(self, gen: object) -> None:
        if gen != self._poll_gen:
            return  # superseded by a later schedule
        self._poll_gen += 1
        self._last_full = self.now
        age = None if self.hs is None else self.now - self.hs
        obs = Observation(self.endpoint, self.rx, self.tx, age)
        d = self.m.observe(self.now, obs, answered=self.answered, rtt=self.rtt)
        self.answered, self.rtt = False, None
        if d.set_endpoint is not None or d.probe:
            self._push(self.now + self.cfg.engine_delay, "apply", (d.set_endpoint, d.probe))
        nxt = self._last_full + self.m.t.poll_interval
        if self.m.due is not None:
            nxt = min(nxt, max(self.m.due, self.now + 1e-3))
        self._push(nxt, "poll", self._poll_gen)

    def _on_apply(self, data: object) -> None:
        endpoint, probe = data  # type: ignore[misc]
        if endpoint is not None and endpoint != self.endpoint:
            if self.endpoint is not None:
                self.switches.append((self.now, endpoint))
            self.endpoint = endpoint
        if probe:
            self.probe_times.append(self.now)
            self._we_send("probe")

    # --- measurements -----------------------------------------------------------------------------

    def steady_since(self, since: float, k: int = STEADY) -> float | None:
        """Reply time of the first of ``k`` consecutive answered pings all sent at or after ``since``."""
        run: list[int] = []
        for seq in sorted(s for s, t in self.ping_sent.items() if t >= since):
            if seq in self.ping_reply:
                run.append(seq)
                if len(run) == k:
                    return self.ping_reply[run[0]]
            else:
                run = []
        return None


@dataclass(frozen=True, slots=True)
class Failover:
    took: float  # black-hole to steady pings (seconds)
    detected: float  # black-hole to the switch applied
    probes: int  # probes sent from the black-hole until steady
    max_probes_per_s: int  # the most probes in any one second of the run


def failover(cfg: SimConfig, *, warmup: float = 30.0, limit: float = 60.0) -> Failover:
    """One black-hole of the endpoint in use at a random moment after ``warmup``."""
    sim = PathSim(cfg)
    sim.run(warmup + sim.rng.uniform(0, 2))
    used = sim.endpoint
    if used is None or str(sim.m.state) != "up":
        raise RuntimeError(f"the path did not come up in {warmup} s (state {sim.m.state})")
    t0 = sim.now
    sim.blackholed.add(used)
    n0, s0 = len(sim.probe_times), len(sim.switches)
    steady: list[float] = []

    def flowing() -> bool:
        if sim.ping_reply and max(sim.ping_reply.values()) >= t0:
            t = sim.steady_since(t0)
            if t is not None:
                steady.append(t)
                return True
        return False

    if not sim.run_until(t0 + limit, flowing):
        return Failover(math.inf, math.inf, len(sim.probe_times) - n0, _max_per_second(sim.probe_times[n0:]))
    switched = sim.switches[s0][0] - t0 if len(sim.switches) > s0 else math.inf
    probes = sim.probe_times[n0:]
    return Failover(steady[0] - t0, switched, len(probes), _max_per_second(probes))


@dataclass(frozen=True, slots=True)
class Spurious:
    hours: float
    loss: float
    switches: int
    failures: int
    episodes: int
    probes: int
    max_probes_per_s: int
    per_episode: float  # the chance all dead_min_probes probe round trips of one episode are lost
    expected_per_hour: float  # episodes per hour x per_episode

    @property
    def expected_per_5min(self) -> float:
        return self.expected_per_hour / 12


def spurious(cfg: SimConfig, hours: float) -> Spurious:
    """Endpoint switches over ``hours`` of simulated time with nothing broken but ``cfg.loss``."""
    sim = PathSim(cfg)
    sim.run(30.0)
    st0 = sim.m.status()
    n0 = len(sim.probe_times)
    sim.run(30.0 + hours * 3600)
    st = sim.m.status()
    episodes = st.episodes - st0.episodes
    per_episode = round_trip_loss(cfg.loss) ** cfg.timings.dead_min_probes
    return Spurious(
        hours=hours,
        loss=cfg.loss,
        switches=st.switches - st0.switches,
        failures=st.failures - st0.failures,
        episodes=episodes,
        probes=len(sim.probe_times) - n0,
        max_probes_per_s=_max_per_second(sim.probe_times[n0:]),
        per_episode=per_episode,
        expected_per_hour=episodes / hours * per_episode if hours > 0 else 0.0,
    )


def round_trip_loss(loss: float) -> float:
    """The chance a probe or its answer is lost, with ``loss`` per packet in each direction."""
    return 1 - (1 - loss) ** 2


def _max_per_second(times: Sequence[float]) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between ranks (numpy's default), as the lab benchmarks."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    if xs[hi] == math.inf:
        return math.inf if pos > lo or xs[lo] == math.inf else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="black-hole runs (10 Hz pings)")
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours per loss rate")
    ap.add_argument(
        "--loss", type=float, nargs="*", default=[0.01, 0.05], help="loss per packet and direction"
    )
    ap.add_argument("--seed", type=int, default=1)
    ns = ap.parse_args(argv)
    t = DetectionTimings()
    print(
        f"timings: active poll {t.active_poll_interval:g} s, probe every {t.probe_interval:g} s from "
        f"{t.probe_after:g} s, dead after {t.dead_after:g} s and {t.dead_min_probes} unanswered probes"
    )
    fo = [failover(SimConfig(ping_hz=10.0, seed=ns.seed + i)) for i in range(ns.runs)]
    took = [f.took for f in fo]
    print(
        f"failover, {ns.runs} black-holes at 10 Hz pings: p50 {percentile(took, 50):.2f} s, "
        f"p95 {percentile(took, 95):.2f} s, max {max(took):.2f} s; switch applied p50 "
        f"{percentile([f.detected for f in fo], 50):.2f} s; probes per failover p50 "
        f"{percentile([float(f.probes) for f in fo], 50):.0f}, max {max(f.probes for f in fo)}, "
        f"at most {max(f.max_probes_per_s for f in fo)} in any second"
    )
    for ping, what in ((1.0, "1 Hz ping"), (None, "idle")):
        for loss in ns.loss:
            s = spurious(SimConfig(loss=loss, ping_hz=ping, seed=ns.seed), ns.hours)
            print(
                f"loss {loss:.0%} each way, {what}, {s.hours:g} h: {s.switches} switches, {s.failures} "
                f"failures; {s.episodes} episodes ({s.episodes / s.hours:.0f}/h), all "
                f"{t.dead_min_probes} probes lost {s.per_episode:.2g} per episode -> expected "
                f"{s.expected_per_hour:.2g} switches/h, {s.expected_per_5min:.2g} per 5 min; probes "
                f"{s.probes / (s.hours * 3600):.3f}/s on average, at most {s.max_probes_per_s} in any second"
            )
    quiet = spurious(SimConfig(loss=0.0, ping_hz=10.0, seed=ns.seed), min(ns.hours, 1.0))
    print(
        f"healthy path, 10 Hz pings, no loss, {quiet.hours:g} h: {quiet.probes} probes, "
        f"{quiet.episodes} episodes, {quiet.switches} switches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
