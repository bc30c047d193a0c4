"""What the mesh engine keeps for one peer: its spec, endpoint machine, candidates, desired config and status.

One :class:`PeerRuntime` per peer public key replaces parallel per-peer caches: every value derived
from the spec lives beside the spec, together with what it was computed from, so a replaced spec
resets them in one place (:meth:`PeerRuntime.respec`). The endpoint machine survives a replaced spec:
the peer's up/down history does not depend on its addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv6Network
from typing import Any

from kubespan.endpoints import Candidate, EndpointMachine, EndpointStatus, order_candidates
from kubespan.firstcontact import FirstContact
from kubespan.peerspec import PeerSpec
from kubespan.snapshot import PeerStatus
from kubespan.traversal import NO_PATH, PathStatus
from kubespan.wireguard.types import AddrPort, ObservedPeer, PeerConfig, PresharedKey
from spanutil.ipcodec import IPInterface


class PeerRuntime:
    """One peer's working state. Each derived value is recomputed when what it came from changed
    (compared by identity first: specs, address tuples and observations are immutable)."""

    __slots__ = (
        "_candidates",
        "_candidates_from",
        "_config",
        "_config_from",
        "_status",
        "_status_from",
        "first",
        "known_at",
        "machine",
        "spec",
    )

    def __init__(
        self,
        spec: PeerSpec,
        machine: EndpointMachine,
        first: FirstContact | None = None,
        known_at: float | None = None,
    ) -> None:
        self.spec = spec
        self.machine = machine
        self.known_at = known_at  # unix time the engine first had this peer's record
        self.first = first  # who initiates first, while the new peer has no session
        self._candidates: tuple[Candidate, ...] = ()
        self._candidates_from: tuple[Any, ...] | None = None  # (endpoints, learned, local addresses)
        self._config: PeerConfig | None = None
        self._config_from: tuple[Any, ...] = ()  # (endpoint, keepalive, psk)
        self._status: PeerStatus | None = None
        self._status_from: tuple[Any, ...] = ()  # (observed peer, _status_key of the machine, NAT class)

    @property
    def label(self) -> str:
        return self.spec.label or self.spec.node_id[:12]

    @property
    def config(self) -> PeerConfig | None:
        """The desired config the last pass computed (None: none since the spec was set)."""
        return self._config

    def respec(self, spec: PeerSpec) -> None:
        """Take a replaced spec: forget what was derived from the old one (the machine stays)."""
        self.spec = spec
        self._config = None
        self._status = None

    def candidates(self, local: Sequence[IPInterface], exclude: IPv6Network) -> tuple[Candidate, ...]:
        """:func:`order_candidates` for this peer; ``local`` is compared by identity (the engine
        replaces its address tuple only when the addresses change)."""
        endpoints, learned = self.spec.endpoints, self.machine.learned
        since = self._candidates_from
        if (
            since is not None
            and since[2] is local
            and since[1] == learned
            and (since[0] is endpoints or since[0] == endpoints)
        ):
            return self._candidates
        self._candidates = order_candidates(endpoints, local, learned=learned, exclude=[exclude])
        self._candidates_from = (endpoints, learned, local)
        return self._candidates

    def config_for(self, endpoint: AddrPort | None, keepalive: int, psk: PresharedKey) -> PeerConfig:
        """The desired WireGuard config; the previous object while nothing in it changed (the
        diff memo compares configs by identity)."""
        since = self._config_from
        if self._config is not None and since[2] is psk and since[0] == endpoint and since[1] == keepalive:
            return self._config
        self._config = PeerConfig(
            public_key=self.spec.public_key,
            allowed_ips=frozenset(self.spec.allowed_ips),
            endpoint=endpoint,
            persistent_keepalive=keepalive,
            preshared_key=psk,
        )
        self._config_from = (endpoint, keepalive, psk)
        return self._config

    def status(
        self,
        have: ObservedPeer | None,
        *,
        light: bool,
        wall: float,
        now: float,
        nat_class: str = "unknown",
        path: PathStatus = NO_PATH,
    ) -> PeerStatus:
        """The peer's status; the previous object while its spec, observation, published NAT class
        and what the machine shows are unchanged (``light``: the machine did not run, only the spec,
        the observation and the NAT class are compared; ``path``, traversal's view, by identity)."""
        since, st = self._status_from, None
        if (
            self._status is not None
            and (since[0] is have or since[0] == have)
            and since[2] == nat_class
            and since[3] is path
        ):
            if light:
                return self._status
            st = self.machine.status()
            key = _status_key(st)
            if key == since[1]:
                self._status_from = (have, key, nat_class, path)
                return self._status
        if st is None:
            st = self.machine.status()
        self._status = peer_status(self.spec, st, have, wall=wall, now=now, nat_class=nat_class, path=path)
        self._status_from = (have, _status_key(st), nat_class, path)
        return self._status


def peer_status(
    spec: PeerSpec,
    st: EndpointStatus,
    have: ObservedPeer | None,
    *,
    wall: float,
    now: float,
    nat_class: str = "unknown",
    path: PathStatus = NO_PATH,
) -> PeerStatus:
    """A peer's :class:`PeerStatus` from its spec, its machine's status, its observation and the
    NAT class it publishes (``wall`` and ``now``: the same moment by the wall clock and the
    engine's clock)."""
    change = st.last_endpoint_change
    endpoint = st.endpoint if st.endpoint is not None else (have.endpoint if have is not None else None)
    kind, relay_via, why = path.resolve(str(st.state) == "up", endpoint)
    return PeerStatus(
        label=spec.label or spec.node_id[:12],
        node_id=spec.node_id,
        public_key=spec.public_key.b64,
        mesh_address=str(spec.mesh_address) if spec.mesh_address else None,
        # the machine's view includes a switch applied after this pass read the device
        endpoint=str(st.endpoint)
        if st.endpoint is not None
        else (str(have.endpoint) if have is not None and have.endpoint else None),
        state=str(st.state),
        rx_bytes=have.rx_bytes if have is not None else 0,
        tx_bytes=have.tx_bytes if have is not None else 0,
        last_handshake=have.last_handshake if have is not None else None,
        last_used_endpoint=str(st.last_used_endpoint) if st.last_used_endpoint else None,
        last_endpoint_change=(wall - (now - change)) if change is not None else None,
        endpoint_switches=st.switches,
        roams=st.roams,
        failures=st.failures,
        candidates=tuple(str(c.endpoint) for c in st.candidates),
        learned=tuple(str(e) for e in st.learned),
        allowed_ips=tuple(str(p) for p in spec.allowed_ips),
        nat_class=nat_class,
        path=kind,
        relay_via=relay_via,
        why_not_direct=why,
        connect_time=path.connect_time,
        probes=st.probes,
        rtt=round(st.rtt, 4) if st.rtt is not None else None,
    )


def _status_key(st: EndpointStatus) -> tuple[Any, ...]:
    """What of an :class:`EndpointStatus` a :class:`PeerStatus` shows."""
    return (
        st.state,
        st.endpoint,
        st.last_used_endpoint,
        st.last_endpoint_change,
        st.switches,
        st.roams,
        st.failures,
        st.candidates,
        st.learned,
        st.probes,
        st.rtt,
    )
