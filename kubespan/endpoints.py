"""Per-peer endpoint selection and failure detection (pure; the caller supplies the clock).

WireGuard reports per peer its endpoint, rx/tx counters and last handshake; :class:`EndpointMachine`
turns those observations (and probe replies) into up/down/unknown, the endpoint to use and the
probes to send. Why the thresholds are what they are, candidate trials, roaming and the states:
docs/design/endpoints.md.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kubespan.constants import (
    WG_KEEPALIVE_BYTES,
    WG_KEEPALIVE_TIMEOUT,
    WG_REJECT_AFTER_TIME,
    WG_REKEY_TIMEOUT,
    DetectionTimings,
)
from kubespan.wireguard.types import AddrPort, ObservedPeer
from spanutil.ipcodec import IPAddress, IPNetwork


class PeerState(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class CandidateKind(enum.IntEnum):
    """Preference classes, best first."""

    SAME_SUBNET = 0
    PRIVATE = 1
    PUBLIC = 2
    LEARNED = 3
    OTHER_FAMILY = 4  # we have no address of this family: try last


# Networks a path stays inside a site on: RFC 1918, ULA, link-local. Traversal labels such a path "lan".
LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10")
)
# Not reachable from the internet at large, so tried before public endpoints (no NAT on the way): the
# LAN networks plus carrier-grade NAT space (RFC 6598: shared with the carrier's other customers, not
# a site's LAN, so its path is labelled "direct") and loopback.
_PRIVATE = (
    *LAN_NETWORKS,
    *(ipaddress.ip_network(n) for n in ("100.64.0.0/10", "127.0.0.0/8", "::1/128")),
)


# Timers that fire at the deadline may run a hair early by the clock's resolution.
_EPSILON = 1e-3


def is_lan(ip: IPAddress) -> bool:
    """Whether ``ip`` lies in a site-local network (:data:`LAN_NETWORKS`)."""
    return any(ip.version == n.version and ip in n for n in LAN_NETWORKS)


@dataclass(frozen=True, slots=True)
class Candidate:
    endpoint: AddrPort
    kind: CandidateKind


def _is_private(ip: IPAddress) -> bool:
    return any(ip.version == n.version and ip in n for n in _PRIVATE)


def _usable(ep: AddrPort) -> bool:
    return not (ep.ip.is_unspecified or ep.ip.is_multicast)


def order_candidates(
    endpoints: Iterable[AddrPort],
    local_networks: Iterable[IPNetwork | ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    learned: Iterable[AddrPort] = (),
    exclude: Iterable[IPNetwork] = (),
) -> tuple[Candidate, ...]:
    """Rank a peer's endpoints (plus our learned ones) for trying, best first.

    ``local_networks`` are our own addresses with their prefixes (for "same
    subnet" and to know which families we can reach). ``exclude`` drops
    endpoints inside those networks (the mesh subnet: an endpoint reachable
    only through the tunnel would nest the tunnel in itself). Unspecified and
    multicast endpoints are dropped; duplicates keep their first position.
    Among public endpoints, global IPv6 ones come first when we have a global
    IPv6 address too: that path needs no NAT traversal.
    """
    nets = [
        n.network if isinstance(n, ipaddress.IPv4Interface | ipaddress.IPv6Interface) else n
        for n in local_networks
    ]
    families = {n.version for n in nets}
    global6 = any(n.version == 6 and not _is_private(n.network_address) for n in nets)
    excluded = list(exclude)
    seen: set[AddrPort] = set()
    ranked: list[tuple[int, int, int, Candidate]] = []
    all_eps = [(ep, False) for ep in endpoints] + [(ep, True) for ep in learned]
    for pos, (ep, is_learned) in enumerate(all_eps):
        if ep in seen or not _usable(ep):
            continue
        if any(ep.ip.version == n.version and ep.ip in n for n in excluded):
            continue
        seen.add(ep)
        if families and ep.ip.version not in families:
            kind = CandidateKind.OTHER_FAMILY
        elif is_learned:
            kind = CandidateKind.LEARNED
        elif any(ep.ip.version == n.version and ep.ip in n for n in nets):
            kind = CandidateKind.SAME_SUBNET
        elif _is_private(ep.ip):
            kind = CandidateKind.PRIVATE
        else:
            kind = CandidateKind.PUBLIC
        v6_first = 0 if kind == CandidateKind.PUBLIC and global6 and ep.ip.version == 6 else 1
        ranked.append((kind, v6_first, pos, Candidate(ep, kind)))
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return tuple(c for _, _, _, c in ranked)


@dataclass(frozen=True, slots=True)
class Observation:
    """One poll of a peer: what WireGuard reports, handshake as an age in seconds."""

    endpoint: AddrPort | None
    rx_bytes: int
    tx_bytes: int
    handshake_age: float | None  # None: never

    @classmethod
    def from_peer(cls, peer: ObservedPeer, wall_now: float) -> Observation:
        age = None if peer.last_handshake is None else max(0.0, wall_now - peer.last_handshake)
        return cls(peer.endpoint, peer.rx_bytes, peer.tx_bytes, age)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the engine must do after an observation.

    Apply ``set_endpoint`` (configure the peer's endpoint) before sending the
    probe, so the probe takes the new path.
    """

    set_endpoint: AddrPort | None = None
    probe: bool = False
    learned_changed: bool = False
    state_changed: bool = False
    # Re-create the peer in this write (remove, add): the trial starting now needs a handshake, and
    # a re-created peer initiates at once where WireGuard would hold its next initiation for up to
    # REKEY_TIMEOUT (5 s) after the last one (sent to the path that died).
    fresh_session: bool = False


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """A snapshot for status output and metrics (times are the caller's clock)."""

    state: PeerState
    endpoint: AddrPort | None  # the endpoint WireGuard uses (configured or roamed)
    last_used_endpoint: AddrPort | None  # the last endpoint we configured
    last_endpoint_change: float | None
    last_state_change: float
    switches: int  # endpoint changes we made
    roams: int  # endpoint changes WireGuard made (peer reached us from elsewhere)
    failures: int  # paths declared dead (including failed trials)
    candidates: tuple[Candidate, ...]
    learned: tuple[AddrPort, ...]
    trying: bool  # the current endpoint is on trial (no evidence yet)
    answers_probes: bool | None
    last_rx_progress: float | None
    probes: int = 0  # probes asked for, in all (the probing cost: see docs/design/endpoints.md)
    episodes: int = 0  # detection episodes on a working path (sent, no answer for a poll)
    rtt: float | None = None  # smoothed probe round trip, seconds (None: no probe answered yet)


class EndpointMachine:
    """Endpoint state of one peer. Feed it observations; it returns decisions."""

    def __init__(
        self,
        timings: DetectionTimings | None = None,
        *,
        now: float,
        candidates: Sequence[Candidate] = (),
        keepalive: bool = True,
    ) -> None:
        self.t = timings or DetectionTimings()
        self._keepalive = keepalive
        self._candidates: tuple[Candidate, ...] = tuple(candidates)
        self._learned: list[AddrPort] = []
        self._current: AddrPort | None = None
        self._last_used: AddrPort | None = None
        self._proven = False
        self._trial_started: float | None = None
        self._failed_trials = 0
        self._state = PeerState.UNKNOWN
        self._ever_up = False
        self._last_state_change = now
        self._last_endpoint_change: float | None = None
        self._switches = 0
        self._roams = 0
        self._failures = 0
        self._baseline = False  # counters seen at least once
        self._rx = 0
        self._tx = 0
        self._last_rx_progress: float | None = None
        self._awaiting_since: float | None = None
        self._last_probe: float | None = None
        self._probes = 0
        self._responsive: bool | None = None
        self._calibrations = 0
        self._first_calibration: float | None = None
        self._last_calibration: float | None = None
        self._last_evidence: float | None = None
        self._probed_absent = False  # a probe was sent along with adding the (absent) peer
        self._probes_total = 0
        self._episodes = 0
        self._active_until: float | None = None  # tx grew lately: observe often until then
        self._fast_left = 0  # fast trials left since the last proven path died
        self._fast_trial = False  # the current trial is a fast one
        self._due: float | None = None  # when the machine wants its next observation
        self._fresh_pending = False  # we asked for a re-creation: the counters will start over
        self._srtt: float | None = None  # smoothed probe round trip (as TCP's RTO estimator)
        self._rttvar = 0.0

    # --- inputs ----------------------------------------------------------------------------------

    def set_candidates(self, candidates: Sequence[Candidate]) -> None:
        """Replace the ranked candidate list (the peer spec or our local addresses changed)."""
        self._candidates = tuple(candidates)

    @property
    def learned(self) -> tuple[AddrPort, ...]:
        """Roamed endpoints to publish for this peer, most recent first."""
        return tuple(self._learned)

    @property
    def current(self) -> AddrPort | None:
        """The endpoint to configure when (re)creating this peer."""
        return self._current

    @property
    def state(self) -> PeerState:
        return self._state

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            state=self._state,
            endpoint=self._current,
            last_used_endpoint=self._last_used,
            last_endpoint_change=self._last_endpoint_change,
            last_state_change=self._last_state_change,
            switches=self._switches,
            roams=self._roams,
            failures=self._failures,
            candidates=self._candidates,
            learned=tuple(self._learned),
            trying=self._current is not None and not self._proven,
            answers_probes=self._responsive,
            last_rx_progress=self._last_rx_progress,
            probes=self._probes_total,
            episodes=self._episodes,
            rtt=self._srtt,
        )

    @property
    def due(self) -> float | None:
        """When this machine wants its next observation (the caller's clock), if sooner than the
        regular poll would give it: the next probe or verdict of an episode or fast trial, or the
        next active poll while tx grows. None: the regular poll is soon enough."""
        return self._due

    def adopt(self, now: float, endpoint: AddrPort) -> bool:
        """Switch to an endpoint found outside the machine (a punch's answer, a relay allocation): it
        goes on trial like a chosen candidate. False when it is the current endpoint already."""
        if endpoint == self._current:
            return False
        self._start_trial(now, endpoint, counted=True)
        return True

    def observe(
        self, now: float, obs: Observation | None, *, answered: bool = False, rtt: float | None = None
    ) -> Decision:
        """Process one poll.

        ``obs`` is None while the peer is absent from the device. ``answered`` is
        True when a reply to one of our probes arrived since the last poll; ``rtt``
        the round trip of one such reply, when known (a slow path gets a longer
        detection window: :meth:`dead_window`).
        """
        # (a reply whose flight spans the session's handshake also timed the handshake; it is kept:
        # a peer with traffic is not probed again, so dropping it would leave most peers without a
        # round trip — later samples smooth it out)
        if rtt is not None and rtt >= 0:
            self._take_rtt(rtt)
        before_state = self._state
        learned_changed = False
        set_endpoint: AddrPort | None = None
        probe = False
        self._due = None

        if obs is None:
            # Not configured (yet, or any more): whoever adds it must use this endpoint, and
            # probes it right after adding it (the probe starts the handshake and its reply is
            # the first evidence; waiting for the first observation would cost a poll).
            if self._current is None:
                nxt = self._next_candidate()
                if nxt is not None:
                    self._start_trial(now, nxt, counted=True)  # counts as this probe
                    probe = True
            elif self._probe_due(now, 0.0, False, immediate=True):
                probe = True
            if probe:
                self._probed_absent = True
            self._baseline = False
            return self._decide(before_state, self._current, probe, False)

        rx_progress = tx_progress = False
        keepalive_only = False  # all we sent since the last observation is one keepalive
        fresh, self._fresh_pending = self._fresh_pending, False
        reset = obs.rx_bytes < self._rx or obs.tx_bytes < self._tx
        if fresh and self._baseline and reset:
            # the re-creation we asked for: counters start over, the trial goes on
            rx_progress, tx_progress = obs.rx_bytes > 0, obs.tx_bytes > 0
            if obs.endpoint != self._current:
                set_endpoint = self._current
        elif not self._baseline or reset:
            # First sight, or the peer was (re-)created: counters start over and any
            # session is gone, so the current endpoint goes back on trial.
            restarted = self._baseline
            self._baseline = True
            if self._current is not None:
                probed = self._last_probe
                self._start_trial(now, self._current, counted=False)
                self._last_probe = None  # probe at once, below ...
                slack = 0.1 * self.t.poll_interval
                if (
                    not restarted
                    and self._probed_absent
                    and probed is not None
                    and now - probed + slack < self.t.slow_probe_interval
                ):
                    self._last_probe = probed  # ... unless one went out with the add just now
                if restarted or obs.endpoint != self._current:
                    set_endpoint = self._current
            if not restarted and self._probed_absent:
                # we added it at the last observation: its counters started at zero then, so what
                # they hold came since (e.g. the peer's keepalive after a handshake, while the
                # probe sent with the add was lost: a new node sends it before its link is up)
                rx_progress, tx_progress = obs.rx_bytes > 0, obs.tx_bytes > 0
        else:
            rx_progress = obs.rx_bytes > self._rx
            tx_progress = obs.tx_bytes > self._tx
            keepalive_only = obs.tx_bytes - self._tx == WG_KEEPALIVE_BYTES
        self._rx, self._tx = obs.rx_bytes, obs.tx_bytes
        self._probed_absent = False

        session_valid = obs.handshake_age is not None and obs.handshake_age <= WG_REJECT_AFTER_TIME
        evidence = (rx_progress and session_valid) or answered
        if answered:
            self._responsive = True
            self._calibrations = 0
            self._first_calibration = None
        if rx_progress:
            self._last_rx_progress = now
        if tx_progress and not keepalive_only:
            # traffic flows: observe often, so that a stall shows within an active poll. A lone
            # keepalive is no flow (it still starts an episode below): 100 idle peers send four a
            # second, which would keep the engine at active polls all the time
            self._active_until = now + self.t.poll_interval

        # --- what is WireGuard using? --------------------------------------------------------------
        if obs.endpoint is not None and obs.endpoint != self._current:
            if evidence or self._current is None:
                # Roamed (an authenticated packet came from there), or set before we started.
                if self._current is not None:
                    self._roams += 1
                self._last_endpoint_change = now
                self._current = obs.endpoint
                self._forget_rtt()
                set_endpoint = None
                if evidence:
                    learned_changed = self._learn(obs.endpoint)
                else:
                    self._start_trial(now, obs.endpoint, counted=False)
                    self._last_probe = None
            else:
                set_endpoint = self._current  # our configuration did not stick
        elif obs.endpoint is None and self._current is not None:
            set_endpoint = self._current

        if self._current is None:
            nxt = self._next_candidate()
            if nxt is not None:
                self._start_trial(now, nxt, counted=True)
                return self._decide(before_state, nxt, True, learned_changed)
            return self._decide(before_state, None, False, learned_changed)

        # --- evidence, episodes, probes -------------------------------------------------------------
        if evidence:
            self._last_evidence = now
            self._end_episode(answered)
            if not self._proven:
                self._proven = True
                self._trial_started = None
                self._failed_trials = 0
            self._fast_left = 0
            self._fast_trial = False
            self._set_state(now, PeerState.UP)
        elif tx_progress and self._awaiting_since is None and self._proven:
            self._begin_episode(now)
            self._episodes += 1

        dead = False
        fast_failed = False
        if self._proven:
            if self._awaiting_since is not None:
                waited = now - self._awaiting_since
                # fast only to a peer known to answer; until then the passive rule decides
                interval = self.t.probe_interval if self._responsive else self.t.slow_probe_interval
                if self._probe_due(now, waited, session_valid, interval=interval):
                    probe = True
                dead = self._fast_dead(waited) or waited >= self.t.passive_dead_after
            elif self._responsive is None and session_valid:
                probe = self._calibrate(now)
            if (
                self._keepalive
                and not evidence
                and (obs.handshake_age is None or obs.handshake_age > self.t.session_dead_after)
            ):
                dead = True
        else:
            assert self._trial_started is not None
            waited = now - self._trial_started
            fast = self._fast_trial and session_valid
            if fast and self._fast_dead(waited):
                dead = fast_failed = True  # no answer within the fast window: the next one
            elif waited >= self._trial_timeout():
                dead = True
                self._failed_trials += 1
            elif self._probe_due(
                now,
                waited,
                session_valid,
                immediate=True,
                interval=self.t.probe_interval if fast else self.t.slow_probe_interval,
            ):
                probe = True

        if dead:
            probe = False
            self._failures += 1
            was_proven = self._proven
            if self._proven:
                # a working path died: each candidate (this one last) gets one fast trial, so the
                # next working one takes over within a round trip and the probes of one window
                self._fast_left = len(self._order())
            if self._current in self._learned:
                self._learned.remove(self._current)
                learned_changed = True
            if self._ever_up:
                self._set_state(now, PeerState.DOWN)
            nxt = self._next_candidate()
            fast_next = self._fast_left > 0 and session_valid and self._responsive is True
            if nxt is not None and nxt != self._current:
                self._start_trial(now, nxt, counted=True)
                set_endpoint = nxt
                probe = True
            else:
                # nothing else to try: give the same path another (longer) trial
                self._start_trial(now, self._current, counted=False)
                if obs.endpoint != self._current:
                    set_endpoint = self._current
                probe = True
                if was_proven:
                    # ... from a new handshake: it re-latches a relay's leg after our NAT rebound
                    # (the relay forwards only from where a handshake came: docs/design/relay.md),
                    # where WireGuard would initiate only after 15 s without an answer
                    self._fresh_pending = True
            if fast_next:
                self._fast_left -= 1
                self._fast_trial = True
            elif fast_failed:
                self._failed_trials += 1  # the fast round is over: the slow trials take it from here
            if not session_valid:
                self._fresh_pending = True  # a handshake at once, to the endpoint on trial
        self._due = self._next_due(now, session_valid)
        return self._decide(before_state, set_endpoint, probe, learned_changed, self._fresh_pending)

    # --- internals -------------------------------------------------------------------------------

    def _decide(
        self,
        before: PeerState,
        set_endpoint: AddrPort | None,
        probe: bool,
        learned_changed: bool,
        fresh_session: bool = False,
    ) -> Decision:
        if probe:
            self._probes += 1
            self._probes_total += 1
        return Decision(set_endpoint, probe, learned_changed, self._state != before, fresh_session)

    def dead_window(self) -> float:
        """How long a probe-answering peer may stay silent in an episode: ``dead_after``, or
        longer on a path whose measured round trip needs it (smoothed round trip plus four
        deviations plus one probe spacing, as TCP sizes its retransmission timeout)."""
        if self._srtt is None:
            return self.t.dead_after
        return max(self.t.dead_after, self._srtt + 4 * self._rttvar + self.t.probe_interval)

    def _forget_rtt(self) -> None:
        """A new path: the old path's round trip says nothing of it."""
        self._srtt, self._rttvar = None, 0.0

    def _take_rtt(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    def _fast_dead(self, waited: float) -> bool:
        """A peer known to answer probes let the dead window pass and ``dead_min_probes`` go
        unanswered (the probe sent in this same observation is not counted: it had no time)."""
        return (
            self._responsive is True
            and waited + _EPSILON >= self.dead_window()
            and self._probes >= self.t.dead_min_probes
        )

    def _next_due(self, now: float, session_valid: bool) -> float | None:
        """When the next observation is wanted (see :attr:`due`)."""
        due: list[float] = []
        active = min(self.t.active_poll_interval, self.t.poll_interval)
        if self._active_until is not None and now < self._active_until:
            due.append(now + active)
        fast = self._responsive is True and session_valid and self._current is not None
        if fast and self._awaiting_since is not None and (self._proven or self._fast_trial):
            start = self._awaiting_since if self._proven else self._trial_started
            assert start is not None
            if self._last_probe is not None:
                due.append(self._last_probe + self.t.probe_interval)
            due.append(start + self.dead_window())
        return min(due) if due else None

    def _set_state(self, now: float, state: PeerState) -> None:
        if state == PeerState.UP:
            self._ever_up = True
        if state != self._state:
            self._state = state
            self._last_state_change = now

    def _begin_episode(self, now: float) -> None:
        self._awaiting_since = now
        self._last_probe = None
        self._probes = 0

    def _end_episode(self, answered: bool) -> None:
        if answered:
            self._responsive = True
        elif self._probes >= self.t.dead_min_probes:
            # the peer is alive but let several probes go unanswered: it drops them
            self._responsive = False
        self._awaiting_since = None
        self._last_probe = None
        self._probes = 0

    def _calibrate(self, now: float) -> bool:
        """While it is unknown whether the peer answers probes, send one now and then."""
        if self._last_calibration is not None and now - self._last_calibration < self.t.calibrate_interval:
            return False
        if self._calibrations >= self.t.dead_min_probes:
            assert self._first_calibration is not None
            if self._last_evidence is not None and self._last_evidence > self._first_calibration:
                self._responsive = False  # alive, yet none of them was answered
                return False
        if self._first_calibration is None:
            self._first_calibration = now
        self._calibrations += 1
        self._last_calibration = now
        return True

    def _probe_due(
        self,
        now: float,
        waited: float,
        session_valid: bool,
        immediate: bool = False,
        interval: float | None = None,
    ) -> bool:
        if interval is None:
            interval = self.t.probe_interval
        # a tenth of a poll (or of the interval) of slack, so that jitter in the poll timing does
        # not skip a poll
        slack = 0.1 * min(self.t.poll_interval, interval)
        if not immediate and waited + slack < self.t.probe_after:
            return False
        if self._responsive is False:
            # it will not answer; one data packet a keepalive-timeout apart is enough to
            # make its WireGuard send a passive keepalive
            interval = max(interval, WG_KEEPALIVE_TIMEOUT)
        elif not session_valid:
            # no session: WireGuard cannot handshake more often than this anyway
            interval = max(interval, WG_REKEY_TIMEOUT)
        if self._last_probe is not None and now - self._last_probe + slack < interval:
            return False
        self._last_probe = now
        return True

    def _trial_timeout(self) -> float:
        """The current trial's length: short for a never-up peer's private candidates in the first
        sweep when there is another candidate to go on to (``private_trial_timeout``), else
        ``trial_timeout`` doubling per failed sweep."""
        n = len(self._order())
        if n > 1 and not self._ever_up and self._failed_trials < n and self._current_is_private():
            return self.t.private_trial_timeout
        sweeps = self._failed_trials // max(1, n)
        return min(self.t.trial_timeout * (2**sweeps), self.t.trial_timeout_max)

    def _current_is_private(self) -> bool:
        return any(c.endpoint == self._current and c.kind <= CandidateKind.PRIVATE for c in self._candidates)

    def _start_trial(self, now: float, endpoint: AddrPort | None, *, counted: bool) -> None:
        if counted and endpoint != self._current:
            if self._current is not None or self._last_used is not None:
                self._switches += 1
            self._last_endpoint_change = now
        if endpoint != self._current:
            self._forget_rtt()
        self._current = endpoint
        if counted:
            self._last_used = endpoint
        self._proven = False
        self._fast_trial = False  # (the caller makes it a fast one)
        self._trial_started = now
        self._begin_episode(now)
        # the probe sent with this trial's decision is its first
        self._last_probe = now

    def _order(self) -> list[AddrPort]:
        order = [c.endpoint for c in self._candidates]
        order.extend(ep for ep in self._learned if ep not in order)
        return order

    def _next_candidate(self) -> AddrPort | None:
        order = self._order()
        if not order:
            return None
        for anchor in (self._current, self._last_used):
            if anchor is not None and anchor in order:
                return order[(order.index(anchor) + 1) % len(order)]
        return order[0]

    def _learn(self, endpoint: AddrPort) -> bool:
        if any(c.endpoint == endpoint for c in self._candidates) or self.t.learned_max == 0:
            return False
        if self._learned and self._learned[0] == endpoint:
            return False
        changed_set = endpoint not in self._learned
        if endpoint in self._learned:
            self._learned.remove(endpoint)
        self._learned.insert(0, endpoint)
        del self._learned[self.t.learned_max :]
        return changed_set
