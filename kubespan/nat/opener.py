"""The punch executor: openers and probes sent from the WireGuard port through raw sockets.

WireGuard owns the listen port, so, as in :mod:`kubespan.nat.rawstun`, we write the UDP header ourselves
(source port = the WireGuard port) and read filtered copies of what arrives. Three tools, driven by the
engine at the start time both peers agreed on (docs/design/nat-traversal.md, "Hole punching"):

* :func:`send_openers`: one tiny datagram per candidate with a small IP TTL, which creates our NAT's
  mapping and filter entry towards the candidate but dies before the peer's NAT, so it cannot leave a
  stray conntrack entry there (the "pollution" deadlock of nat.md §0).
* :class:`ProbeResponder`: answers valid probes (:mod:`kubespan.nat.probemsg`) from known peers, from
  the WireGuard port to the probe's source, so the answer retraces the path WireGuard will use.
* :func:`probe_candidates`: probes every candidate until the first valid answer and returns the
  address it came from: the endpoint to give WireGuard.
* :func:`punch`: the two in the order and at the times of one punch (openers at the start, probes 1 s
  later).

Probes and openers never look like WireGuard messages, so WireGuard drops its copy of them. Needs
CAP_NET_RAW (:class:`NoRawSocketPrivilege` otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Final, Self

from kubespan.nat import probemsg
from kubespan.nat.probemsg import (
    ANSWER_MAGIC,
    PROBE_MAGIC,
    ProbeError,
    ProbeMessage,
    RateLimiter,
    ReplayGuard,
)
from kubespan.nat.rawstun import (
    IPV6_CHECKSUM,
    SO_MARK,
    NoRawSocketPrivilege,
    StunProbeError,
    _attach_filter,
    _source_for,
    bpf_program,
    udp_datagram,
)
from kubespan.wireguard.types import AddrPort, PublicKey
from spanutil.ipcodec import IPAddress, ip_without_scope

__all__ = [
    "OPENER_TTL",
    "NoRawSocketPrivilege",
    "ProbeResponder",
    "RawPunch",
    "parse_datagram",
    "probe_candidates",
    "punch",
    "send_openers",
    "set_ttl",
]

log = logging.getLogger(__name__)

OPENER_TTL: Final = 3  # through our NAT(s), dead a hop or two past them: never reaches the peer's NAT
PROBE_INTERVAL: Final = 0.3  # seconds between probe rounds
PROBE_TIMEOUT: Final = 5.0
# Seconds from our openers to our first probe. The peer's openers must have left its NAT before our
# full-TTL probe reaches it (nat.md §0). Started on time (before the agreed start), our openers leave
# at the start and the peer's at the start too, or as soon as our intent naming the start has come back
# to it: so this covers clock skew (NTP: milliseconds) and how late the peer may start, which the lab
# measured at 0.57 s at most (bench/nat_traversal.py, eight agents starting at once on two cores; p95
# under 0.2 s over 300 punches). Started late (we saw the peer's intent only after the start), our openers go out at
# once and the delay counts from them: the peer, which committed first, has had its openers out since.
PROBE_DELAY: Final = 0.5
MAX_CANDIDATES: Final = 32
IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)  # Linux; Python does not export it
IPV6_RECVPKTINFO: Final = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: Final = getattr(socket, "IPV6_PKTINFO", 50)
RECV_SIZE: Final = 2048
_DROP_ALL: Final = [(0x06, 0, 0, 0)]  # classic BPF "return 0": a send-only socket queues nothing
_CMSG_SPACE: Final = socket.CMSG_SPACE(20)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def set_ttl(sock: socket.socket, version: int, ttl: int) -> None:
    """Give datagrams sent on ``sock`` the IP TTL (IPv6: unicast hop limit) ``ttl``."""
    if not 1 <= ttl <= 255:
        raise ValueError(f"ttl: {ttl} must be 1..255")
    if version == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


def _raw_socket(version: int, program: Sequence[tuple[int, int, int, int]], fwmark: int) -> socket.socket:
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError as e:
        raise NoRawSocketPrivilege(f"no privilege (CAP_NET_RAW) for a raw socket: {e.strerror}") from None
    try:
        _attach_filter(sock, program)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        if version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)  # the kernel fills the UDP checksum
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # anything queued before the filter was attached
            for _ in range(1024):
                sock.recv(RECV_SIZE)
    except PermissionError as e:
        sock.close()
        raise NoRawSocketPrivilege(f"no privilege (CAP_NET_ADMIN) to set the fwmark: {e.strerror}") from None
    except OSError as e:
        sock.close()
        raise StunProbeError(f"raw socket: {e.strerror or e}") from None
    return sock


def _open_family(
    version: int, program: Sequence[tuple[int, int, int, int]], fwmark: int
) -> socket.socket | None:
    """A raw socket, or None when this address family is unusable here (an IPv4-only host): its
    candidates are skipped. A missing privilege is raised: nothing will work then."""
    try:
        return _raw_socket(version, program, fwmark)
    except NoRawSocketPrivilege:
        raise
    except StunProbeError as e:
        log.info("no IPv%d raw socket, its candidates skipped: %s", version, e)
        return None


def _magic_filter(wg_port: int, version: int, magic: bytes) -> list[tuple[int, int, int, int]]:
    return bpf_program(wg_port, version == 6, int.from_bytes(magic, "big"), 0)


def _send(
    sock: socket.socket,
    wg_port: int,
    dst: AddrPort,
    payload: bytes,
    fwmark: int,
    src: IPAddress | None = None,
) -> None:
    """One datagram from ``wg_port`` to ``dst``, from local address ``src`` (default: the route's)."""
    if src is None:
        src = _source_for(dst.ip, dst.port, fwmark)
        cmsg: list[tuple[int, int, bytes]] = []
    elif dst.ip.version == 4:
        cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, src.packed, bytes(4)))]
    else:
        cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", src.packed, 0))]
    packet = udp_datagram(src if dst.ip.version == 4 else None, dst.ip, wg_port, dst.port, payload)
    sock.sendmsg([packet], cmsg, 0, (str(dst.ip), 0))


def send_openers(wg_port: int, candidates: Iterable[AddrPort], ttl: int = OPENER_TTL, fwmark: int = 0) -> int:
    """Send one opener from ``wg_port`` to each candidate with IP TTL ``ttl``; returns how many left.

    The opener makes our NAT map the WireGuard port towards the candidate and let its answers in, then
    dies on the way (``ttl`` must cover our own NAT layers: 3 passes a CPE and a carrier NAT). A
    candidate without a route is skipped. Raises :class:`NoRawSocketPrivilege`.
    """
    by_version: dict[int, list[AddrPort]] = {}
    for c in dict.fromkeys(candidates):
        by_version.setdefault(c.ip.version, []).append(c)
    sent = 0
    for version, targets in sorted(by_version.items()):
        sock = _open_family(version, _DROP_ALL, fwmark)
        if sock is None:
            continue
        try:
            set_ttl(sock, version, ttl)
            for target in targets:
                try:
                    _send(sock, wg_port, target, probemsg.OPENER_PAYLOAD, fwmark)
                    sent += 1
                except OSError as e:
                    log.debug("opener to %s not sent: %s", target, e.strerror or e)
        finally:
            sock.close()
    return sent


def parse_datagram(
    data: bytes, addr: tuple[str, int] | tuple[str, int, int, int], version: int, wg_port: int
) -> tuple[AddrPort, IPAddress | None, bytes] | None:
    """(source, local destination address or None, UDP payload) of a raw-socket read, when it is UDP to
    ``wg_port`` from a valid port; None otherwise. IPv4 reads start at the IP header, IPv6 at UDP."""
    dst: IPAddress | None = None
    if version == 4:
        if len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_UDP:
            return None
        src_ip: IPAddress = ipaddress.IPv4Address(data[12:16])
        dst = ipaddress.IPv4Address(data[16:20])
        data = data[(data[0] & 0x0F) * 4 :]
    else:
        src_ip = ip_without_scope(addr[0])
    if len(data) < 8:
        return None
    sport, dport, length, _ = struct.unpack_from("!HHHH", data)
    if dport != wg_port or sport == 0 or not 8 <= length <= len(data):
        return None
    return AddrPort(src_ip, sport), dst, data[8:length]


def _read(sock: socket.socket, version: int, wg_port: int) -> tuple[AddrPort, IPAddress | None, bytes] | None:
    """One packet from ``sock`` (raises BlockingIOError when none is left)."""
    data, ancdata, _flags, addr = sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
    parsed = parse_datagram(data, addr, version, wg_port)
    if parsed is None or version == 4:
        return parsed
    dst: IPAddress | None = None
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(value) >= 16:
            dst = ipaddress.IPv6Address(value[:16])
    return parsed[0], dst, parsed[2]


class ProbeResponder:
    """Answers probes sent to the WireGuard port by known peers; run it while punching may happen.

    ``known(key)`` says whether a key belongs to a current peer (others are ignored). Answers are rate
    limited per source address; replayed and stale probes are dropped. ``dropped`` counts why.
    ``async with ProbeResponder(...)`` opens a raw socket per family (IPv6 only if the host has it).
    """

    def __init__(
        self,
        wg_port: int,
        key: bytes,
        own: PublicKey,
        known: Callable[[PublicKey], bool],
        *,
        fwmark: int = 0,
        families: Sequence[int] = (4, 6),
        limiter: RateLimiter | None = None,
        replay: ReplayGuard | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wg_port, self.key, self.own, self.known = wg_port, key, own, known
        self.fwmark, self.families = fwmark, tuple(families)
        self.limiter = RateLimiter() if limiter is None else limiter
        self.replay = ReplayGuard() if replay is None else replay
        self._wall_ms, self._monotonic = wall_ms, monotonic
        self.answered = 0
        self.dropped: Counter[str] = Counter()
        self._socks: dict[int, socket.socket] = {}

    def answer(self, payload: bytes, source: AddrPort) -> bytes | None:
        """The answer to ``payload`` received from ``source``, or None (counted in ``dropped``)."""
        now_ms = self._wall_ms()
        try:
            msg = probemsg.decode(payload, self.key, now_ms)
        except ProbeError as e:
            self.dropped[str(e).split(":", 1)[0]] += 1
            return None
        if msg.answer:
            self.dropped["answer"] += 1
        elif msg.sender == self.own or not self.known(msg.sender):
            self.dropped["unknown key"] += 1
        elif not self.limiter.allow(source.ip, self._monotonic()):
            self.dropped["rate limited"] += 1
        elif not self.replay.fresh(msg.nonce, now_ms):
            self.dropped["replay"] += 1
        else:
            self.answered += 1
            return probemsg.encode(ProbeMessage.answering(msg, self.own, source, now_ms), self.key)
        return None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for version in self.families:
                sock = _open_family(version, _magic_filter(self.wg_port, version, PROBE_MAGIC), self.fwmark)
                if sock is None:
                    continue
                self._socks[version] = sock
                loop.add_reader(sock.fileno(), self._readable, sock, version)
            if not self._socks:
                raise StunProbeError(f"no usable raw socket (address families {self.families})")
        except BaseException:
            self.close()
            raise

    def _readable(self, sock: socket.socket, version: int) -> None:
        for _ in range(64):  # bounded per wake-up; the rest waits for the next one
            try:
                got = _read(sock, version, self.wg_port)
            except OSError:  # nothing left, or a queued ICMP error that says nothing about probes
                return
            if got is None:
                continue
            source, local, payload = got
            reply = self.answer(payload, source)
            if reply is None:
                continue
            try:
                _send(sock, self.wg_port, source, reply, self.fwmark, local)
            except OSError as e:
                self.dropped["send failed"] += 1
                log.debug("probe answer to %s not sent: %s", source, e.strerror or e)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing was registered
            loop = asyncio.get_running_loop()
            for sock in self._socks.values():
                loop.remove_reader(sock.fileno())
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Prober:
    """The prober's bookkeeping (no I/O): which nonce went to which candidate, and answer checking."""

    def __init__(self, key: bytes, own: PublicKey, peer: PublicKey, wall_ms: Callable[[], int]) -> None:
        self.key, self.own, self.peer, self._wall_ms = key, own, peer, wall_ms
        self.sent: dict[bytes, AddrPort] = {}  # nonce -> candidate
        self.rejected: Counter[str] = Counter()

    def probe(self, candidate: AddrPort) -> bytes:
        msg = ProbeMessage.probe(self.own, self._wall_ms())
        self.sent[msg.nonce] = candidate
        return probemsg.encode(msg, self.key)

    def accept(self, payload: bytes, source: AddrPort) -> AddrPort | None:
        """``source`` when ``payload`` is the peer's valid answer to one of our probes."""
        try:
            msg = probemsg.decode(payload, self.key, self._wall_ms())
        except ProbeError as e:
            self.rejected[str(e).split(":", 1)[0]] += 1
            return None
        if not msg.answer or msg.sender != self.peer or msg.reply_to not in self.sent:
            self.rejected["not ours"] += 1
            return None
        candidate = self.sent[msg.reply_to]
        if candidate != source:
            log.info("probe to %s answered from %s (the peer's NAT rewrote it)", candidate, source)
        return source


async def probe_candidates(
    wg_port: int,
    candidates: Iterable[AddrPort],
    *,
    key: bytes,
    own: PublicKey,
    peer: PublicKey,
    timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109 (the probe schedule needs the deadline)
    interval: float = PROBE_INTERVAL,
    fwmark: int = 0,
    wall_ms: Callable[[], int] = _wall_ms,
) -> AddrPort | None:
    """Probe every candidate from ``wg_port`` every ``interval`` until ``peer`` answers; None after
    ``timeout``.

    Returns the address the first valid answer came *from*: the peer's NAT mapping towards us, proven
    in both directions (our probe reached the peer, its answer passed our NAT). That is the endpoint
    WireGuard should use; it equals the probed candidate unless the peer's NAT rewrote the port. The
    peer must run a :class:`ProbeResponder`. Raises :class:`NoRawSocketPrivilege`.
    """
    targets = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
    if not targets:
        return None
    loop = asyncio.get_running_loop()
    prober = _Prober(key, own, peer, wall_ms)
    found: asyncio.Future[AddrPort] = loop.create_future()
    socks: dict[int, socket.socket] = {}

    def readable(sock: socket.socket, version: int) -> None:
        for _ in range(64):
            try:
                got = _read(sock, version, wg_port)
            except OSError:
                return
            if got is None or found.done():
                continue
            hit = prober.accept(got[2], got[0])
            if hit is not None:
                found.set_result(hit)

    try:
        for version in sorted({t.ip.version for t in targets}):
            sock = _open_family(version, _magic_filter(wg_port, version, ANSWER_MAGIC), fwmark)
            if sock is not None:
                socks[version] = sock
                loop.add_reader(sock.fileno(), readable, sock, version)
        targets = [t for t in targets if t.ip.version in socks]
        if not targets:
            return None
        deadline = loop.time() + timeout
        rounds = 0
        while loop.time() < deadline:
            for target in targets:
                try:
                    _send(socks[target.ip.version], wg_port, target, prober.probe(target), fwmark)
                except OSError as e:
                    log.debug("probe to %s not sent: %s", target, e.strerror or e)
            rounds += 1
            wait = min(interval, deadline - loop.time())
            if wait > 0:
                done, _ = await asyncio.wait({found}, timeout=wait)
                if done:
                    return found.result()
        log.info(
            "no probe answer from %s in %g s (%d rounds, rejected %s)",
            peer,
            timeout,
            rounds,
            dict(prober.rejected),
        )
        return None
    finally:
        for sock in socks.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        if not found.done():
            found.cancel()


async def punch(
    wg_port: int,
    candidates: Sequence[AddrPort],
    start_ms: int,
    *,
    key: bytes,
    own: PublicKey,
    peer: PublicKey,
    probe_delay: float = PROBE_DELAY,
    ttl: int = OPENER_TTL,
    timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109
    fwmark: int = 0,
    wall_ms: Callable[[], int] = _wall_ms,
) -> AddrPort | None:
    """One punch as nat.md §5 schedules it: openers at ``start_ms`` (wall clock, the time both peers
    agreed on; at once if it is past), probes ``probe_delay`` seconds after the openers went out, the
    answer's source or None.

    Call it only once the peer has committed to the same start (its intent naming us is visible):
    probes are full-TTL, and sent before the peer's openers they would pollute a bare NAT on its side.
    The delay counts from our own openers, not from the start: a side that starts late (it saw the
    peer's intent naming our start only after the start) sends its openers at once and still waits
    ``probe_delay``; the peer's openers are out by then (the peer committed first). On time, both
    sides' openers leave at the start by their own clocks, so ``probe_delay`` must exceed the clock
    skew plus a one-way trip (see :data:`PROBE_DELAY`); that both are on time is the planner's
    ``PunchTimings.lead``. The caller runs a :class:`ProbeResponder` meanwhile, for the peer's probes.
    """
    await asyncio.sleep(max(0.0, (start_ms - wall_ms()) / 1000))
    late_ms = max(0, wall_ms() - start_ms)
    if ttl > 0:  # 0: no openers (a public node has no NAT to open)
        send_openers(wg_port, candidates, ttl, fwmark)
    await asyncio.sleep(probe_delay)
    found = await probe_candidates(
        wg_port, candidates, key=key, own=own, peer=peer, timeout=timeout, fwmark=fwmark, wall_ms=wall_ms
    )
    log.info(
        "punch to %s: openers %d ms after the start, %s %d ms after the start",
        peer,
        late_ms,
        f"answer from {found}" if found is not None else "no answer",
        wall_ms() - start_ms,
    )
    return found


class RawPunch:
    """The engine's punch port over raw sockets: one :class:`ProbeResponder` for the agent's life
    and :func:`punch` per attempt (``key``: :func:`probemsg.probe_key` of the cluster secret)."""

    def __init__(self, key: bytes, fwmark: int = 0) -> None:
        self.key, self.fwmark = key, fwmark
        self.responder: ProbeResponder | None = None

    async def start(self, wg_port: int, own: PublicKey, known: Callable[[PublicKey], bool]) -> None:
        responder = ProbeResponder(wg_port, self.key, own, known, fwmark=self.fwmark)
        await responder.start()
        self.responder = responder

    async def punch(
        self,
        wg_port: int,
        candidates: Sequence[AddrPort],
        start_ms: int,
        *,
        own: PublicKey,
        peer: PublicKey,
        openers: bool = True,
    ) -> AddrPort | None:
        return await punch(
            wg_port,
            candidates,
            start_ms,
            key=self.key,
            own=own,
            peer=peer,
            ttl=OPENER_TTL if openers else 0,
            fwmark=self.fwmark,
        )

    async def close(self) -> None:
        if self.responder is not None:
            self.responder.close()
            self.responder = None
