"""STUN from the WireGuard port without binding it: a raw UDP socket sends, a filtered copy receives.

WireGuard (kernel or wireguard-go) owns the listen port, and the mapping worth knowing is that port's.
We build the UDP header ourselves (source port = the WireGuard port, checksum over the pseudo-header;
IPv6 lets the kernel fill it with ``IPV6_CHECKSUM``) and hand it to a raw ``IPPROTO_UDP`` socket. The same
socket receives a *copy* of incoming UDP datagrams, cut down by a classic BPF filter to those addressed to
the WireGuard port whose payload carries the STUN magic cookie, so nothing else is ever queued for us.
WireGuard still receives its own packets (and drops the STUN reply: it is no WireGuard message). Needs
CAP_NET_RAW; :class:`NoRawSocketPrivilege` tells the caller to fall back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence

from kubespan.nat.classify import NatReport, Observation, classify
from kubespan.wireguard.types import AddrPort
from spanutil import stun
from spanutil.ipcodec import IPAddress, ip_without_scope

__all__ = [
    "NoRawSocketPrivilege",
    "StunProbeError",
    "StunTimeout",
    "bpf_program",
    "discover",
    "mapped_endpoint",
    "probe",
    "udp_checksum",
    "udp_datagram",
]

SO_ATTACH_FILTER = 26
SO_MARK = getattr(socket, "SO_MARK", 36)
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
TRIES = 3
INTERVAL = 0.5  # seconds between retransmissions
TIMEOUT = 2.0
RECV_SIZE = 2048

# classic BPF opcodes (linux/filter.h)
_LDH_ABS, _LDW_ABS, _LDH_IND, _LDW_IND, _LDXB_MSH = 0x28, 0x20, 0x48, 0x40, 0xB1
_JEQ, _JSET, _RET = 0x15, 0x45, 0x06
_ACCEPT = 0xFFFF  # bytes of an accepted packet kept


class StunProbeError(Exception):
    """No mapped endpoint from this responder; the text says why (shown in status)."""


class NoRawSocketPrivilege(StunProbeError):
    """The process may not open raw sockets (CAP_NET_RAW): fall back to what works without STUN."""


class StunTimeout(StunProbeError):
    """The responder did not answer in time."""


def bpf_program(
    wg_port: int, ipv6: bool, magic: int = stun.MAGIC_COOKIE, offset: int = 4
) -> list[tuple[int, int, int, int]]:
    """Accept UDP to ``wg_port`` whose payload has the 32-bit ``magic`` at ``offset`` (by default the STUN
    magic cookie at 4); drop the rest.

    IPv4 raw sockets see the packet from the IP header (non-first fragments are dropped, the header
    length is read from IHL); IPv6 raw sockets see it from the UDP header.
    """
    if ipv6:
        return [
            (_LDH_ABS, 0, 0, 2),  # UDP destination port
            (_JEQ, 0, 3, wg_port),
            (_LDW_ABS, 0, 0, 8 + offset),  # the magic
            (_JEQ, 0, 1, magic),
            (_RET, 0, 0, _ACCEPT),
            (_RET, 0, 0, 0),
        ]
    return [
        (_LDH_ABS, 0, 0, 6),  # flags + fragment offset
        (_JSET, 6, 0, 0x1FFF),  # a later fragment: no UDP header here
        (_LDXB_MSH, 0, 0, 0),  # X = IP header length
        (_LDH_IND, 0, 0, 2),  # UDP destination port
        (_JEQ, 0, 3, wg_port),
        (_LDW_IND, 0, 0, 8 + offset),  # the magic
        (_JEQ, 0, 1, magic),
        (_RET, 0, 0, _ACCEPT),
        (_RET, 0, 0, 0),
    ]


def _attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(program), ctypes.addressof(buf))  # struct sock_fprog (native layout)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def udp_checksum(src: IPAddress, dst: IPAddress, udp: bytes) -> int:
    """The UDP checksum over the pseudo-header and ``udp`` (its checksum field zero); never 0 (RFC 768)."""
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(udp), socket.IPPROTO_UDP)
    data = pseudo + udp + b"\0" * (len(udp) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def udp_datagram(src: IPAddress | None, dst: IPAddress, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP header plus ``payload``; the checksum is computed when ``src`` is given (else left 0 for the
    kernel to fill, IPv6 with ``IPV6_CHECKSUM``)."""
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if src is None:
        return udp
    return udp[:6] + struct.pack("!H", udp_checksum(src, dst, udp)) + udp[8:]


def _source_for(server: IPAddress, port: int, fwmark: int) -> IPAddress:
    """The local address the kernel would send from to ``server`` (a connected UDP socket; sends nothing)."""
    family = socket.AF_INET6 if server.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if fwmark:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        s.connect((str(server), port))
        return ip_without_scope(s.getsockname()[0])


def _open(server: IPAddress, port: int, wg_port: int, fwmark: int) -> tuple[socket.socket, IPAddress]:
    family = socket.AF_INET6 if server.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError as e:
        raise NoRawSocketPrivilege(f"no privilege (CAP_NET_RAW) for a raw socket: {e.strerror}") from None
    try:
        _attach_filter(sock, bpf_program(wg_port, server.version == 6))
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        try:
            src = _source_for(server, port, fwmark)
        except PermissionError:
            raise
        except OSError as e:
            raise StunProbeError(f"no route to the responder: {e.strerror or e}") from None
        if server.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
        sock.bind((str(src), 0))  # the source the checksum was computed for, and replies to it only
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # anything queued before the filter was attached
            for _ in range(1024):
                sock.recv(RECV_SIZE)
    except StunProbeError:
        sock.close()
        raise
    except PermissionError as e:
        sock.close()
        raise NoRawSocketPrivilege(f"no privilege (CAP_NET_ADMIN) to set the fwmark: {e.strerror}") from None
    except OSError as e:
        sock.close()
        raise StunProbeError(f"raw socket: {e.strerror or e}") from None
    return sock, src


def _reply(data: bytes, addr: tuple[str, int], server: IPAddress, port: int, wg_port: int) -> bytes | None:
    """The STUN payload of a received packet if it comes from ``server:port`` to ``wg_port``."""
    if server.version == 4:
        if len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_UDP:
            return None
        if ipaddress.IPv4Address(data[12:16]) != server:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    elif ip_without_scope(addr[0]) != server:
        return None
    if len(data) < 8:
        return None
    sport, dport, length, _ = struct.unpack_from("!HHHH", data)
    if sport != port or dport != wg_port or not 8 <= length <= len(data):
        return None
    return data[8:length]


async def mapped_endpoint(
    wg_port: int,
    server: tuple[str | IPAddress, int],
    timeout: float = TIMEOUT,  # noqa: ASYNC109 (the retransmission schedule needs the deadline)
    *,
    tries: int = TRIES,
    interval: float = INTERVAL,
    fwmark: int = 0,
) -> AddrPort:
    """The public ip:port that ``server`` (a STUN responder) sees for this host's ``wg_port``.

    Sends up to ``tries`` Binding requests ``interval`` apart and waits at most ``timeout`` in all.
    ``fwmark`` marks the requests like WireGuard's own packets (so they skip the mesh's routing table).
    Raises :class:`NoRawSocketPrivilege`, :class:`StunTimeout` or :class:`StunProbeError`.
    """
    ip, port = ipaddress.ip_address(server[0]), int(server[1])
    loop = asyncio.get_running_loop()
    sock, src = _open(ip, port, wg_port, fwmark)
    try:
        txid = stun.new_transaction_id()
        payload = stun.binding_request(txid)
        packet = udp_datagram(src if ip.version == 4 else None, ip, wg_port, port, payload)
        answer: asyncio.Future[AddrPort] = loop.create_future()

        def readable() -> None:
            for _ in range(64):  # bounded per wake-up; the rest waits for the next one
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except OSError:
                    # nothing left, or an ICMP error queued on the socket: it can concern any UDP packet
                    # from this address (WireGuard's too), so it proves nothing about our responder
                    return
                body = _reply(data, addr, ip, port, wg_port)
                if body is None or answer.done():
                    continue
                try:
                    msg = stun.parse(body)
                    if msg.transaction_id != txid:
                        continue  # another probe's answer (each socket sees every STUN reply)
                    mapped = stun.parse_binding_response(body, txid)
                except stun.StunError as e:
                    answer.set_exception(StunProbeError(str(e)))
                    continue
                answer.set_result(AddrPort(mapped.ip, mapped.port))

        loop.add_reader(sock.fileno(), readable)
        try:
            deadline = loop.time() + timeout
            sent = 0
            while True:
                if sent < tries:
                    try:
                        sock.sendto(packet, (str(ip), 0))
                    except OSError as e:
                        raise StunProbeError(f"send: {e.strerror or e}") from None
                    sent += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wait = min(interval, remaining) if sent < tries else remaining
                done, _ = await asyncio.wait({answer}, timeout=wait)
                if done:
                    return answer.result()
            raise StunTimeout(f"no answer in {timeout:g}s ({sent} requests)")
        finally:
            loop.remove_reader(sock.fileno())
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # retrieved: no "never retrieved" warning
    finally:
        sock.close()


async def probe(
    wg_port: int,
    servers: Iterable[tuple[str | IPAddress, int]],
    timeout: float = TIMEOUT,  # noqa: ASYNC109
    fwmark: int = 0,
) -> list[Observation]:
    """Ask every responder at once; one :class:`Observation` per responder, in order."""

    async def one(server: tuple[str | IPAddress, int]) -> Observation:
        where = AddrPort(ipaddress.ip_address(server[0]), int(server[1]))
        try:
            return Observation(where, await mapped_endpoint(wg_port, server, timeout, fwmark=fwmark))
        except StunProbeError as e:
            return Observation(where, None, str(e))

    return list(await asyncio.gather(*(one(s) for s in servers)))


async def discover(
    wg_port: int,
    servers: Iterable[tuple[str | IPAddress, int]],
    local_addrs: Iterable[IPAddress | str],
    timeout: float = TIMEOUT,  # noqa: ASYNC109
    fwmark: int = 0,
) -> NatReport:
    """Probe ``servers`` from ``wg_port`` and classify the NAT (see :mod:`kubespan.nat.classify`)."""
    return classify(await probe(wg_port, servers, timeout, fwmark), local_addrs, wg_port)
