"""Desired vs observed WireGuard state -> the minimal list of operations.

Only what differs is touched: an unchanged peer yields no operation, a peer
whose endpoint alone changed yields an :class:`UpdatePeer` carrying only the
endpoint, and so on. Allowed IPs are always *replaced* as a whole when they
differ (UAPI ``replace_allowed_ips``, netlink ``WGPEER_F_REPLACE_ALLOWEDIPS``),
never appended to, and the device's peer list is never replaced wholesale
(that would drop every session).

A desired ``endpoint=None`` means "keep whatever WireGuard has": roaming is
left alone, as in Talos.

:func:`apply_ops` models how WireGuard executes the operations (including that
an allowed IP given to one peer is taken away from any other peer holding
exactly that prefix). Fakes use it, and tests check ``apply_ops(observed,
diff(desired, observed))`` converges to ``desired``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    PublicKey,
)
from spanutil.ipcodec import IPNetwork


@dataclass(frozen=True, slots=True)
class SetDevice:
    """Change device-level settings; ``None`` fields are left alone."""

    private_key: PrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True, slots=True)
class AddPeer:
    """Create a peer with exactly this configuration."""

    peer: PeerConfig


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    """Change an existing peer; ``None`` fields are unchanged.

    ``preshared_key`` set to the all-zero key clears the PSK; ``allowed_ips``
    replaces the whole list.
    """

    public_key: PublicKey
    endpoint: AddrPort | None = None
    persistent_keepalive: int | None = None
    preshared_key: PresharedKey | None = None
    allowed_ips: frozenset[IPNetwork] | None = None


PeerOp = AddPeer | RemovePeer | UpdatePeer
Op = SetDevice | PeerOp

_ZERO = PresharedKey(bytes(32))


def split_ops(ops: Iterable[Op]) -> tuple[SetDevice, list[PeerOp]]:
    """The device settings of ``ops`` merged (a later :class:`SetDevice` wins field by field) and the
    peer operations in order, as both backends' encoders send them; TypeError for anything else."""
    private_key: PrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    peer_ops: list[PeerOp] = []
    for op in ops:
        if isinstance(op, SetDevice):
            private_key = op.private_key if op.private_key is not None else private_key
            listen_port = op.listen_port if op.listen_port is not None else listen_port
            fwmark = op.fwmark if op.fwmark is not None else fwmark
        elif isinstance(op, AddPeer | UpdatePeer | RemovePeer):
            peer_ops.append(op)
        else:
            raise TypeError(f"unknown operation {type(op).__name__}")
    return SetDevice(private_key, listen_port, fwmark), peer_ops


def diff_peer(desired: PeerConfig, observed: PeerConfig | ObservedPeer) -> UpdatePeer | None:
    """The update turning ``observed`` into ``desired``, or None when nothing differs."""
    endpoint = None
    if desired.endpoint is not None and desired.endpoint != observed.endpoint:
        endpoint = desired.endpoint
    keepalive = None
    if desired.persistent_keepalive != observed.persistent_keepalive:
        keepalive = desired.persistent_keepalive
    psk = None
    if desired.preshared_key != observed.preshared_key:
        psk = desired.preshared_key if desired.preshared_key is not None else _ZERO
    allowed = None
    if desired.allowed_ips != observed.allowed_ips:
        allowed = desired.allowed_ips
    if endpoint is None and keepalive is None and psk is None and allowed is None:
        return None
    return UpdatePeer(desired.public_key, endpoint, keepalive, psk, allowed)


class DiffMemo:
    """Peers found in sync by the last :func:`diff_device` that used this memo.

    WireGuard state is re-read and desired state recomputed every reconcile, but
    when a peer's desired :class:`PeerConfig` and observed :class:`ObservedPeer`
    are the very same (immutable) objects as last time, the comparison cannot
    come out differently, so it is skipped. Only the last call's peers are kept.
    """

    __slots__ = ("in_sync",)

    def __init__(self) -> None:
        self.in_sync: dict[PublicKey, tuple[PeerConfig, PeerConfig | ObservedPeer]] = {}


def _by_key(op: PeerOp) -> bytes:
    return op.peer.public_key.raw if isinstance(op, AddPeer) else op.public_key.raw


def diff_peers(
    desired: Mapping[PublicKey, PeerConfig],
    observed: Mapping[PublicKey, PeerConfig | ObservedPeer],
    memo: DiffMemo | None = None,
) -> list[PeerOp]:
    """Removals, then updates, then additions; each group in public-key order."""
    removes: list[PeerOp] = [RemovePeer(k) for k in observed if k not in desired]
    updates: list[PeerOp] = []
    adds: list[PeerOp] = []
    previous = memo.in_sync if memo is not None else {}
    in_sync: dict[PublicKey, tuple[PeerConfig, PeerConfig | ObservedPeer]] = {}
    for k, want in desired.items():
        have = observed.get(k)
        if have is None:
            adds.append(AddPeer(want))
            continue
        known = previous.get(k)
        if known is not None and known[0] is want and known[1] is have:
            in_sync[k] = known
            continue
        upd = diff_peer(want, have)
        if upd is None:
            in_sync[k] = (want, have)
        else:
            updates.append(upd)
    if memo is not None:
        memo.in_sync = in_sync
    # PublicKey orders by its bytes; sorting by them directly avoids a Python-level __lt__ per comparison
    removes.sort(key=_by_key)
    updates.sort(key=_by_key)
    adds.sort(key=_by_key)
    return removes + updates + adds


def diff_device(
    desired: DeviceConfig, observed: ObservedDevice | None, memo: DiffMemo | None = None
) -> list[Op]:
    """All operations to reach ``desired``; empty when the device already matches.

    ``memo`` (optional) skips re-comparing peers whose desired and observed
    objects are unchanged since the last call; the result is the same.
    """
    if observed is None:
        observed = ObservedDevice()
    ops: list[Op] = []
    set_dev = SetDevice(
        private_key=desired.private_key if desired.private_key != observed.private_key else None,
        listen_port=desired.listen_port if desired.listen_port != observed.listen_port else None,
        fwmark=desired.fwmark if desired.fwmark != observed.fwmark else None,
    )
    if set_dev != SetDevice():
        ops.append(set_dev)
    ops.extend(diff_peers(desired.peers, observed.peers, memo))
    return ops


def apply_ops(device: ObservedDevice, ops: Iterable[Op]) -> ObservedDevice:
    """What WireGuard's device looks like after executing ``ops`` in order."""
    private_key = device.private_key
    listen_port = device.listen_port
    fwmark = device.fwmark
    peers: dict[PublicKey, ObservedPeer] = dict(device.peers)

    def take(owner: PublicKey, nets: frozenset[IPNetwork]) -> None:
        for k, p in list(peers.items()):
            if k != owner and p.allowed_ips & nets:
                peers[k] = replace(p, allowed_ips=p.allowed_ips - nets)

    for op in ops:
        if isinstance(op, SetDevice):
            private_key = op.private_key if op.private_key is not None else private_key
            listen_port = op.listen_port if op.listen_port is not None else listen_port
            fwmark = op.fwmark if op.fwmark is not None else fwmark
        elif isinstance(op, RemovePeer):
            peers.pop(op.public_key, None)
        elif isinstance(op, AddPeer):
            cfg = op.peer
            old = peers.get(cfg.public_key, ObservedPeer(cfg.public_key))
            take(cfg.public_key, cfg.allowed_ips)
            peers[cfg.public_key] = replace(
                old,
                allowed_ips=cfg.allowed_ips,
                endpoint=cfg.endpoint if cfg.endpoint is not None else old.endpoint,
                persistent_keepalive=cfg.persistent_keepalive,
                preshared_key=cfg.preshared_key,
            )
        elif isinstance(op, UpdatePeer):
            cur = peers.get(op.public_key)
            if cur is None:
                continue  # update_only: the peer vanished meanwhile
            if op.allowed_ips is not None:
                take(op.public_key, op.allowed_ips)
                cur = replace(cur, allowed_ips=op.allowed_ips)
            if op.endpoint is not None:
                cur = replace(cur, endpoint=op.endpoint)
            if op.persistent_keepalive is not None:
                cur = replace(cur, persistent_keepalive=op.persistent_keepalive)
            if op.preshared_key is not None:
                psk = None if op.preshared_key.is_zero() else op.preshared_key
                cur = replace(cur, preshared_key=psk)
            peers[op.public_key] = cur
        else:  # pragma: no cover - exhaustive
            raise TypeError(f"unknown operation {op!r}")
    return ObservedDevice(private_key, listen_port, fwmark, peers)
