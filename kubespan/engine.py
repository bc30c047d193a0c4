"""The mesh engine: discovery in, WireGuard peers, routes, rules and nftables out.

Level-triggered: every pass recomputes the desired state from the inputs (the
affiliates discovery reports, the host's addresses, the peers' observed
WireGuard counters) and applies only the difference. A pass runs every poll
interval (1 s, to feed the endpoint state machines), when an input changes,
and when netlink reports that something we own was changed from outside. The
data plane (link, routes, rules, nftables) is also re-checked every
``reconcile_interval`` (2 s) so that what someone removed comes back within 5 s.

A pass between polls that nothing but our own inputs asked for (a discovery
change, typically) is *light*: it neither reads the WireGuard device nor the
nftables table, and runs no endpoint state machine of a peer whose spec did not
change. It trusts that both still hold what our last successful writes left
(anything changed from outside is found by the next poll, at most one
``poll_interval`` later, or by the data plane check), and writes only what the
changed peer specs imply. Probe replies, netlink events, a failed write and the
periodic checks all make the next pass a full one.

A pass writes to WireGuard at most once, and the engine is what diffs (with
:mod:`kubespan.wireguard.diff`, against its last observation). Writes are not
transactional: after a failed one the next pass re-reads the device and applies
what is missing; a failed light pass asks for that pass at once.

All I/O goes through injected adapters (WireGuard backend, link and nftables
managers, host info, prober, discovery client), so the engine runs against
in-memory fakes in unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespan.affiliate import AffiliateError, LocalAffiliate, RemoteAffiliate, build_local_affiliate
from kubespan.constants import MeshConfig
from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6
from kubespan.endpoints import EndpointMachine, Observation, PeerState, order_candidates
from kubespan.hostinfo import HostInfo, IPInterface
from kubespan.identity import MeshIdentity, load_identity, pick_mac
from kubespan.ipset import IPSet
from kubespan.peerspec import PeerSpec, PeerSpecMemo, PeerSpecs, compute_peer_specs
from kubespan.ports import Closable, DiscoveryPort, LinkPort, LinkWatcher, NftPort
from kubespan.probe import Prober
from kubespan.routed import PrefixMemo, RoutedIndex, routed_prefixes
from kubespan.snapshot import MeshSnapshot, MeshStatus, PeerStatus, RemoteRecord
from kubespan.wireguard.backend import WireGuardBackend, WireGuardError
from kubespan.wireguard.diff import DiffMemo, SetDevice, apply_ops, diff_device, diff_peers
from kubespan.wireguard.types import (
    AddrPort,
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    PresharedKey,
    PublicKey,
)
from spanapi.discovery.client import affiliate_pb2
from spanutil.ipcodec import IPNetwork
from spanutil.logs import log_event

log = logging.getLogger("kubespan.engine")

NODE_ID_FILE = "node-id"
_BASE62 = string.digits + string.ascii_letters


def load_node_id(state_dir: Path) -> str:
    """This node's discovery affiliate id: base62 of 32 random bytes, created once (like Talos' NodeID)."""
    path = state_dir / NODE_ID_FILE
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    n = int.from_bytes(secrets.token_bytes(32), "big")
    digits = []
    while n:
        n, r = divmod(n, 62)
        digits.append(_BASE62[r])
    node_id = "".join(reversed(digits)) or "0"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return node_id


@dataclass(frozen=True)
class MeshOptions:
    cluster_id: str
    cluster_secret: bytes = field(repr=False)
    state_dir: Path
    nodename: str
    hostname: str = ""
    config: MeshConfig = field(default_factory=MeshConfig)
    advertise: Sequence[IPNetwork] = ()
    exclude: Sequence[IPNetwork] = ()
    endpoint_filters: Sequence[str] = ()
    extra_endpoints: Sequence[AddrPort] = ()
    mac: bytes | None = None
    publish_learned: bool = True
    operating_system: str = "kubespan-mesh"
    machine_type: str = ""  # controlplane / worker (the affiliate's machine_type; empty: not a Talos role)


class Mesh:
    """Runs the mesh until stopped. ``await mesh.start()`` … ``await mesh.stop()``."""

    def __init__(
        self,
        opts: MeshOptions,
        *,
        backend: WireGuardBackend,
        links: LinkPort,
        nft: NftPort,
        host: HostInfo,
        discovery: DiscoveryPort | None,
        prober: Prober | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.backend = backend
        self.links = links
        self.nft = nft
        self.host = host
        self.discovery = discovery
        self.prober = prober or Prober()
        self.clock = clock
        self.wall = wall
        self.identity: MeshIdentity | None = None
        self.node_id = ""
        self.psk = PresharedKey(opts.cluster_secret)
        self.machines: dict[PublicKey, EndpointMachine] = {}
        self.specs = PeerSpecs((), ())
        self.local: LocalAffiliate | None = None
        self.device: ObservedDevice | None = None
        self.local_addresses: list[IPInterface] = []
        self.errors: list[str] = []
        self.passes = 0
        self.light_passes = 0  # passes that trusted the last observation (see the module docstring)
        self.wg_writes = 0
        self.dataplane_changes: list[str] = []
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._dataplane_due = True
        self._sets_due = False
        self._full_resync = True
        self._last_dataplane = -1e9
        self._last_host = -1e9
        self._last_affiliates_version: int | None = None
        self._last_observe = -1e9  # when the device was last read (a full pass)
        # self.device holds what WireGuard has after our last writes (no failed write since it was read)
        self._device_known = False
        self._by_key: tuple[PeerSpecs, dict[PublicKey, PeerSpec]] | None = None
        # Per-pass work reused while its inputs are the same (immutable) objects; see _compute_specs,
        # _candidates and _peer_config. None of it changes a result, only what is recomputed.
        self._remote_cache: dict[str, tuple[Any, RemoteRecord | None, str | None]] = {}
        self._remotes: list[RemoteAffiliate] | None = None
        self._records: tuple[RemoteRecord, ...] = ()  # the same affiliates, for the snapshot
        self._built_local: LocalAffiliate | None = None  # what the last pass computed (maybe unpublished)
        self._snapshot: MeshSnapshot | None = None
        # per peer: (spec, observed peer, machine, machine status key, status) of the last snapshot
        self._status_cache: dict[PublicKey, tuple[PeerSpec, ObservedPeer | None, Any, Any, PeerStatus]] = {}
        self._malformed: dict[str, tuple[str, bytes, tuple[bytes, ...]]] = {}  # last reported, by id
        self._spec_memo = PeerSpecMemo()
        self._prefix_memo = PrefixMemo()
        self._routed = RoutedIndex()
        self._target_sets: tuple[PeerSpecs, frozenset[PublicKey], dict[str, list[IPNetwork]]] | None = None
        self._diff_memo = DiffMemo()
        self._specs_inputs: tuple[Any, ...] | None = None
        self._local_key: tuple[Any, ...] = ()
        self._local_gen = 0
        self._cand_cache: dict[PublicKey, tuple[tuple[AddrPort, ...], tuple[AddrPort, ...], int, Any]] = {}
        self._config_cache: dict[PublicKey, tuple[tuple[IPNetwork, ...], AddrPort | None, PeerConfig]] = {}
        self._learned_pub: dict[str, tuple[AddrPort, ...]] = {}  # as last published
        self._unpublished: object = None  # what the last failed publish tried (reported once)
        self._deferred_probes: list[tuple[PublicKey, ipaddress.IPv6Address]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.on_pass: Callable[[Mesh], None] | None = None  # called after each pass published its snapshot

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node_id = load_node_id(self.opts.state_dir)
        mac = self.opts.mac or pick_mac(await self.host.links())
        if mac is None:
            raise RuntimeError("no link with a MAC address: pass a MAC (--mac) to derive the mesh address")
        self.identity = load_identity(self.opts.state_dir, self.opts.cluster_id, mac)
        log_event(
            log,
            "mesh identity",
            node_id=self.node_id,
            public_key=self.identity.public_key.b64,
            mesh_address=str(self.identity.address),
            backend=self.backend.name,
        )
        self._publish_snapshot(light=False, at=None)
        await self.backend.ensure_device()
        self.prober.on_reply = self.wake
        self.prober.open()
        self._tasks.append(asyncio.create_task(self._run(), name="mesh-loop"))
        if isinstance(self.links, LinkWatcher):
            self._tasks.append(asyncio.create_task(self._watch_netlink(self.links), name="mesh-netlink"))

    async def stop(self, cleanup: bool = True) -> None:
        """Stop the loops; with ``cleanup`` remove everything we created (rules, routes, nft, link)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self.prober.close()
        if cleanup:
            for what, step in (
                ("nftables", self.nft.teardown),
                ("routes and rules", lambda: self.links.teardown(remove_link=False)),
            ):
                try:
                    await step()
                except Exception as e:
                    log_event(log, "cleanup failed", logging.WARNING, what=what, error=str(e))
        # every adapter is closed (and its sockets released) even when another one's close raises
        async with contextlib.AsyncExitStack() as closing:
            closing.push_async_callback(self.host.close)
            if isinstance(self.links, Closable):
                closing.push_async_callback(self.links.close)
            await self.backend.close(remove=cleanup)
        log_event(log, "mesh stopped", cleanup=cleanup)

    def wake(self, dataplane: bool = False) -> None:
        if dataplane:
            self._dataplane_due = True
        self._wake.set()

    async def _watch_netlink(self, watcher: LinkWatcher) -> None:
        while not self._stopping:
            try:
                await watcher.watch(lambda *_: self.wake(dataplane=True))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log_event(log, "netlink watch failed; retrying", logging.WARNING, error=str(e))
                await asyncio.sleep(1)

    async def _run(self) -> None:
        interval = self.cfg.timings.poll_interval
        while True:
            delay = interval
            try:
                await self.reconcile()
                # polls keep their cadence however many light passes come between them
                delay = max(0.1 * interval, min(interval, self._last_observe + interval - self.clock()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep running; the next pass retries
                self._error(f"reconcile: {e}")
                log.exception("reconcile failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    def _error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-20]
        log_event(log, "mesh error", logging.WARNING, error=text)

    # -- one pass ----------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """One level-triggered pass (light or full, see the module docstring)."""
        assert self.identity is not None, "start() first"
        now = self.clock()
        self.passes += 1
        light = self._light_possible(now)
        if not light and (now - self._last_host >= self.cfg.reconcile_interval or not self.local_addresses):
            self.local_addresses = await self.host.addresses(exclude_links=(self.cfg.link_name,))
            self._last_host = now
            local_key = tuple(self.local_addresses)
            if local_key != self._local_key:
                self._local_key = local_key
                self._local_gen += 1  # candidate orderings depend on our addresses
        await self._publish_local()
        previous = self.specs
        self._compute_specs()

        # probes of a pass whose write failed wait for the next write (their peers may be missing)
        probes, self._deferred_probes = self._deferred_probes, []
        if light:
            light = await self._reconcile_peers_light(now, previous, probes)
            if light:
                self.light_passes += 1
            else:  # one write per pass: the re-read and the repair are the next (full) pass's, now
                self._deferred_probes = probes
                self.wake()
        elif not await self._reconcile_peers_full(now, probes):
            self._deferred_probes = probes
        if not self._deferred_probes:
            for pk, addr in dict.fromkeys(probes):
                self.prober.send(pk, addr)
        if not light or (self.specs is not previous and self._learned_pub):
            # learned endpoints change only when machines observe, or when a peer that has some leaves
            await self._publish_learned()

        if self._dataplane_due or now - self._last_dataplane >= self.cfg.reconcile_interval:
            await self._reconcile_dataplane()
            self._last_dataplane = now
        elif self._sets_due:
            await self._reconcile_dataplane(links=False)
        if not self.ready.is_set() and self.device is not None:
            self.ready.set()
        self._publish_snapshot(light=light, at=self.wall())
        if self.on_pass is not None:
            self.on_pass(self)

    def _light_possible(self, now: float) -> bool:
        """Whether this pass may trust the last observation: between polls, with no probe reply
        to process, nothing reported changed from outside and no periodic check due."""
        poll = self.cfg.timings.poll_interval
        return (
            self.device is not None
            and self._device_known
            and bool(self.local_addresses)
            and not self._dataplane_due
            and now - self._last_observe + 0.1 * poll < poll
            and now - self._last_dataplane < self.cfg.reconcile_interval
            and now - self._last_host < self.cfg.reconcile_interval
            and not self.prober.has_answered
        )

    async def _reconcile_peers_full(
        self, now: float, probes: list[tuple[PublicKey, ipaddress.IPv6Address]]
    ) -> bool:
        """WireGuard: observe, run every peer's state machine, apply the difference (at most one
        write). False: the write failed."""
        self._last_observe = now
        try:
            self.device = await self.backend.get()
        except WireGuardError as e:
            self._error(f"read WireGuard device: {e}")
            self.device = None
        if self.device is None:
            await self.backend.ensure_device()
            self._dataplane_due = True
            self.device = await self.backend.get()
        self._device_known = self.device is not None
        desired, decided = self._decide(now)
        probes.extend(decided)
        ops = diff_device(desired, self.device, self._diff_memo)
        if not ops:
            return True
        if any(isinstance(op, SetDevice) for op in ops):
            # device-level settings were missing: a re-created device, which lost its
            # addresses and routes (peer-only changes leave links, routes and rules alone)
            self._dataplane_due = True
        try:
            await self.backend.apply(ops)
        except WireGuardError as e:
            # sets are not transactional: the next pass (a full one) re-reads and applies what is missing
            self._device_known = False
            self._error(f"apply WireGuard config: {e}")
            return False
        if self.device is not None:
            self.device = apply_ops(self.device, ops)
        self.wg_writes += 1
        self._sets_due = True  # the nftables target sets follow the peers' AllowedIPs
        return True

    def _specs_by_key(self, specs: PeerSpecs) -> dict[PublicKey, PeerSpec]:
        cached = self._by_key
        if cached is not None and cached[0] is specs:
            return cached[1]
        by_key = specs.by_key()
        self._by_key = (specs, by_key)
        return by_key

    async def _reconcile_peers_light(
        self, now: float, previous: PeerSpecs, probes: list[tuple[PublicKey, ipaddress.IPv6Address]]
    ) -> bool:
        """WireGuard for the peers whose spec changed since ``previous``, against the last
        observation (see the module docstring). False: the write failed (the next pass is full)."""
        if self.specs is previous:
            return True
        assert self.device is not None
        old = self._specs_by_key(previous)
        new = self._specs_by_key(self.specs)
        observed = self.device.peers
        desired: dict[PublicKey, PeerConfig] = {}
        have: dict[PublicKey, ObservedPeer] = {}
        for spec in self.specs.specs:
            if old.get(spec.public_key) is spec:
                continue
            m = self.machines.get(spec.public_key)
            cands = self._candidates(spec, m.learned if m is not None else ())
            if m is None:
                m = self.machines[spec.public_key] = EndpointMachine(
                    self.cfg.timings, now=now, candidates=cands
                )
            else:
                m.set_candidates(cands)  # a present peer's machine runs at the next poll
            peer = observed.get(spec.public_key)
            endpoint: AddrPort | None = None
            if peer is None:
                # absent: add it with the endpoint its machine picks, and probe it
                decision = m.observe(now, None)
                endpoint = decision.set_endpoint
                if endpoint is not None:
                    log_event(
                        log, "peer endpoint", peer=spec.label or spec.node_id[:12], endpoint=str(endpoint)
                    )
                if decision.probe and spec.mesh_address is not None:
                    probes.append((spec.public_key, spec.mesh_address))
            else:
                have[spec.public_key] = peer
            desired[spec.public_key] = self._peer_config(spec, endpoint)
        for key in old:
            if key not in new and key in observed:
                have[key] = observed[key]
        ops = diff_peers(desired, have)
        if not ops:
            return True
        try:
            await self.backend.apply(ops)
        except WireGuardError as e:
            self._device_known = False
            self._error(f"apply WireGuard config: {e}")
            return False
        self.device = apply_ops(self.device, ops)
        self.wg_writes += 1
        self._sets_due = True
        return True

    async def _publish_local(self) -> None:
        assert self.identity is not None
        public_ip = self.discovery.public_ip if self.discovery is not None else None
        local = build_local_affiliate(
            node_id=self.node_id,
            nodename=self.opts.nodename,
            hostname=self.opts.hostname or self.opts.nodename,
            public_key=self.identity.public_key,
            mesh_address=self.identity.address,
            node_addresses=self.local_addresses,
            listen_port=self.cfg.listen_port,
            advertised=self.opts.advertise,
            excluded=self.opts.exclude,
            public_ip=public_ip,
            extra_endpoints=self.opts.extra_endpoints,
            endpoint_filters=self.opts.endpoint_filters,
            operating_system=self.opts.operating_system,
            machine_type=self.opts.machine_type,
        )
        if local == self._built_local:
            local = self._built_local  # the same object while unchanged (readers compare identity)
        self._built_local = local
        if local == self.local:
            return
        if self.discovery is not None:
            try:
                await self.discovery.set_local_data(
                    local.to_pb(), local.endpoints_pb(), self._other_endpoints_pb(self._learned_pub)
                )
            except Exception as e:  # e.g. too large for the registry: the next pass tries again
                self._publish_failed(local, e)
                return
            log_event(
                log,
                "local affiliate published",
                endpoints=[str(e) for e in local.endpoints],
                addresses=[str(a) for a in local.addresses],
            )
        self.local = local  # only what was published: status shows it, later passes compare with it
        self._unpublished = None

    def _publish_failed(self, what: object, error: Exception) -> None:
        """Report a failed publish once per content (then at DEBUG: every pass retries it)."""
        if what != self._unpublished:
            self._unpublished = what
            self._error(f"publish to discovery: {error}")
        else:
            log_event(log, "publish to discovery failed again", logging.DEBUG, error=str(error))

    def _remote_affiliates(self) -> list[RemoteAffiliate]:
        """The affiliates as :class:`RemoteAffiliate`; malformed ones are reported (once) and skipped.

        Nothing is re-read while the discovery's version is unchanged, and an
        entry that is the same object as last time keeps its conversion (see
        :class:`~kubespan.ports.DiscoveryPort`).
        """
        if self.discovery is None:
            return []
        version = self.discovery.version
        if version != self._last_affiliates_version or self._remotes is None:
            previous = self._remote_cache
            cache: dict[str, tuple[Any, RemoteRecord | None, str | None]] = {}
            records: list[RemoteRecord] = []
            for aid, d in self.discovery.affiliates.items():
                entry = previous.get(aid)
                if entry is None or entry[0] is not d:
                    try:
                        remote = RemoteAffiliate.from_pb(d.affiliate, d.endpoints)
                    except AffiliateError as e:
                        entry = (d, None, f"affiliate {aid[:12]}: {e}")
                        self._report_malformed(aid, d, entry[2])
                    else:
                        record = RemoteRecord(
                            aid, remote, d.affiliate.machine_type, d.affiliate.operating_system
                        )
                        entry = (d, record, None)
                cache[aid] = entry
                if entry[1] is not None:
                    records.append(entry[1])
            self._remote_cache = cache
            self._records = tuple(records)
            self._remotes = [r.affiliate for r in records]
            self._last_affiliates_version = version
            # forget the affiliates that left or were fixed: broken again, they are news again
            for aid in [a for a in self._malformed if cache.get(a, (None, None, None))[2] is None]:
                del self._malformed[aid]
        return self._remotes

    def _report_malformed(self, aid: str, d: Any, error: str) -> None:
        """Report a malformed affiliate once per content; every pass re-reads it, at DEBUG after the first."""
        payload = (
            error,
            d.affiliate.SerializeToString(deterministic=True),
            tuple(e.SerializeToString(deterministic=True) for e in d.endpoints),
        )
        if self._malformed.get(aid) == payload:
            log_event(log, "malformed affiliate still skipped", logging.DEBUG, error=error)
            return
        self._malformed[aid] = payload
        self._error(error)

    def _compute_specs(self) -> None:
        assert self.identity is not None
        remotes = self._remote_affiliates()
        inputs = (self.node_id, self.identity.public_key, self.identity.address.ip)
        if (
            self._specs_inputs is not None
            and remotes is self._specs_inputs[0]
            and inputs == self._specs_inputs[1:]
        ):
            return  # same affiliates (the same list object: nothing was re-read), same identity
        self._specs_inputs = (remotes, *inputs)
        self.specs = compute_peer_specs(
            remotes,
            self.node_id,
            self.identity.public_key,
            self.identity.address.ip,
            memo=self._spec_memo,
        )
        if not self._spec_memo.keys_changed:
            return  # the same peers (only some specs replaced in place): nothing to forget
        wanted = {s.public_key for s in self.specs.specs}
        for gone in set(self.machines) - wanted:
            del self.machines[gone]
        for cache in (self._cand_cache, self._config_cache):
            for gone in set(cache) - wanted:
                del cache[gone]

    def _candidates(self, spec: PeerSpec, learned: tuple[AddrPort, ...]) -> Any:
        """:func:`order_candidates` for a peer, recomputed only when its endpoints, its learned
        endpoints or our addresses changed."""
        assert self.identity is not None
        cached = self._cand_cache.get(spec.public_key)
        if (
            cached is not None
            and cached[2] == self._local_gen
            and (cached[0] is spec.endpoints or cached[0] == spec.endpoints)
            and cached[1] == learned
        ):
            return cached[3]
        cands = order_candidates(
            spec.endpoints, self.local_addresses, learned=learned, exclude=[self.identity.subnet]
        )
        self._cand_cache[spec.public_key] = (spec.endpoints, learned, self._local_gen, cands)
        return cands

    def _peer_config(self, spec: PeerSpec, endpoint: AddrPort | None) -> PeerConfig:
        """The desired config of a peer; the previous pass's object when nothing in it changed."""
        cached = self._config_cache.get(spec.public_key)
        if (
            cached is not None
            and cached[0] is spec.allowed_ips
            and cached[1] == endpoint
            and cached[2].persistent_keepalive == self.cfg.persistent_keepalive
            and cached[2].preshared_key is self.psk
        ):
            return cached[2]
        config = PeerConfig(
            public_key=spec.public_key,
            allowed_ips=frozenset(spec.allowed_ips),
            endpoint=endpoint,
            persistent_keepalive=self.cfg.persistent_keepalive,
            preshared_key=self.psk,
        )
        # the memo compares psk by identity: keep ours (PeerConfig keeps a non-zero key as given)
        if config.preshared_key is self.psk:
            self._config_cache[spec.public_key] = (spec.allowed_ips, endpoint, config)
        return config

    def _decide(self, now: float) -> tuple[DeviceConfig, list[tuple[PublicKey, ipaddress.IPv6Address]]]:
        assert self.identity is not None
        observed = self.device.peers if self.device is not None else {}
        answered = self.prober.take_answered()
        wall = self.wall()
        peers: list[PeerConfig] = []
        probes: list[tuple[PublicKey, ipaddress.IPv6Address]] = []
        for spec in self.specs.specs:
            m = self.machines.get(spec.public_key)
            learned = m.learned if m is not None else ()
            cands = self._candidates(spec, learned)
            if m is None:
                m = self.machines[spec.public_key] = EndpointMachine(
                    self.cfg.timings, now=now, candidates=cands
                )
            else:
                m.set_candidates(cands)
            have = observed.get(spec.public_key)
            obs = Observation.from_peer(have, wall) if have is not None else None
            decision = m.observe(now, obs, answered=spec.public_key in answered)
            if decision.state_changed:
                log_event(
                    log,
                    "peer state",
                    peer=spec.label or spec.node_id[:12],
                    state=str(m.state),
                    endpoint=str(m.current) if m.current else None,
                )
            endpoint = decision.set_endpoint
            if endpoint is None and have is None:
                endpoint = m.current
            if decision.set_endpoint is not None:
                log_event(log, "peer endpoint", peer=spec.label or spec.node_id[:12], endpoint=str(endpoint))
            peers.append(self._peer_config(spec, endpoint))
            if decision.probe and spec.mesh_address is not None:
                probes.append((spec.public_key, spec.mesh_address))
        desired = DeviceConfig.of(
            self.identity.private_key, self.cfg.listen_port, self.cfg.fwmark_wireguard, peers
        )
        return desired, probes

    @staticmethod
    def _other_endpoints_pb(
        learned: Mapping[str, tuple[AddrPort, ...]],
    ) -> dict[str, list[affiliate_pb2.Endpoint]]:
        return {
            nid: [affiliate_pb2.Endpoint(ip=e.ip.packed, port=e.port) for e in eps]
            for nid, eps in learned.items()
        }

    async def _publish_learned(self) -> None:
        """Publish roamed endpoints we learned for other nodes (NAT), only when they change."""
        if not self.opts.publish_learned or self.discovery is None or self.local is None:
            return
        by_key = {s.public_key: s for s in self.specs.specs}
        learned = {
            by_key[pk].node_id: m.learned for pk, m in self.machines.items() if m.learned and pk in by_key
        }
        if learned == self._learned_pub:
            return
        try:
            await self.discovery.set_local_data(
                self.local.to_pb(), self.local.endpoints_pb(), self._other_endpoints_pb(learned)
            )
        except Exception as e:  # the next full pass tries again
            self._publish_failed(learned, e)
            return
        self._learned_pub = learned  # only what was published
        self._unpublished = None

    async def _reconcile_dataplane(self, links: bool = True) -> None:
        """Links, routes and rules (unless ``links`` is False), then the nftables table and sets."""
        assert self.identity is not None
        self._sets_due = False
        changes: list[str] = []
        if links:
            self._dataplane_due = False
            try:
                changes += await self.links.reconcile_link([self.identity.address])
                changes += await self.links.reconcile_routes()
                changes += await self.links.reconcile_rules()
            except Exception as e:
                self._error(f"links/routes/rules: {e}")
                self._dataplane_due = True
        states = {pk: m.state for pk, m in self.machines.items()}
        # the target sets depend on the specs and, with the bypass, on which peers are down
        down = (
            frozenset(pk for pk, st in states.items() if st == PeerState.DOWN)
            if self.cfg.allow_down_peer_bypass
            else frozenset()
        )
        cached = self._target_sets
        if cached is not None and cached[0] is self.specs and cached[1] == down:
            sets = cached[2]
        else:
            bypass = self.cfg.allow_down_peer_bypass
            # a few specs replaced: update the union by their old and new addresses only
            by_family = None if bypass else self._routed.update(self.specs.specs, self.identity.subnet)
            if by_family is None:
                prefixes = routed_prefixes(
                    self.specs.specs,
                    self.identity.subnet,
                    states=states,
                    allow_down_peer_bypass=bypass,
                    memo=self._prefix_memo,
                )
                by_family = self._routed.reset(
                    None if bypass else self.specs.specs, self.identity.subnet, IPSet(prefixes)
                )
            sets = {SET_IPV4: by_family[4], SET_IPV6: by_family[6]}
            self._target_sets = (self.specs, down, sets)
        try:
            # a sets-only pass follows our own WireGuard writes: nothing to re-read (the periodic
            # check reads the table and repairs what was changed from outside)
            changes += await self.nft.reconcile(sets, trust_cache=not links, normalized=True)
        except Exception as e:
            self._error(f"nftables: {e}")
            self._dataplane_due = True
        if changes:
            self.dataplane_changes = (self.dataplane_changes + changes)[-50:]
            log_event(log, "data plane reconciled", changes=changes)

    # -- status ------------------------------------------------------------------------------------

    @property
    def snapshot(self) -> MeshSnapshot | None:
        """What the last pass published (None before :meth:`start`)."""
        return self._snapshot

    def status(self) -> MeshStatus:
        """The published snapshot, as strings."""
        assert self._snapshot is not None, "start() first"
        return self._snapshot.status()

    def _publish_snapshot(self, *, light: bool, at: float | None) -> None:
        """Build this pass's :class:`MeshSnapshot`, reusing the previous one (or its parts) where
        nothing changed, and publish it."""
        assert self.identity is not None
        prev = self._snapshot
        peers = self._peer_statuses(light, prev.peers if prev is not None else ())
        public_ip = self.discovery.public_ip if self.discovery is not None else None
        errors = tuple(self.errors[-5:])
        configured = self.ready.is_set()
        if (
            prev is not None
            and prev.peers is peers
            and prev.specs is self.specs
            and prev.remotes is self._records
            and prev.local is self._built_local
            and prev.published_local is self.local
            and prev.configured == configured
            and prev.public_ip == public_ip
            and prev.errors == errors
            and prev.identity is self.identity
        ):
            return  # nothing changed: the previous snapshot stands
        self._snapshot = MeshSnapshot(
            at=at,
            node_id=self.node_id,
            nodename=self.opts.nodename,
            identity=self.identity,
            listen_port=self.cfg.listen_port,
            backend=self.backend.name,
            configured=configured,
            public_ip=public_ip,
            remotes=self._records,
            specs=self.specs,
            peers=peers,
            local=self._built_local,
            published_local=self.local,
            errors=prev.errors if prev is not None and prev.errors == errors else errors,
        )

    def _peer_statuses(self, light: bool, prev: tuple[PeerStatus, ...]) -> tuple[PeerStatus, ...]:
        """Every peer's status; a peer whose spec, observation and endpoint machine did not change
        keeps its previous object (``light``: this pass ran no machine of an unchanged spec)."""
        observed = self.device.peers if self.device is not None else {}
        cache = self._status_cache
        fresh: dict[PublicKey, tuple[PeerSpec, ObservedPeer | None, Any, Any, PeerStatus]] = {}
        out: list[PeerStatus] = []
        times: tuple[float, float] | None = None  # (wall, clock), read once when a status is built
        for spec in self.specs.specs:
            pk = spec.public_key
            m = self.machines.get(pk)
            if m is None:
                continue
            have = observed.get(pk)
            hit = cache.get(pk)
            st = None
            if hit is not None and hit[0] is spec and hit[2] is m and (hit[1] is have or hit[1] == have):
                if light:
                    fresh[pk] = hit
                    out.append(hit[4])
                    continue
                st = m.status()
                key = _status_key(st)
                if key == hit[3]:
                    fresh[pk] = (spec, have, m, hit[3], hit[4])
                    out.append(hit[4])
                    continue
            if st is None:
                st = m.status()
                key = _status_key(st)
            if times is None:
                times = (self.wall(), self.clock())
            wall, now = times
            change = st.last_endpoint_change
            status = PeerStatus(
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
            )
            fresh[pk] = (spec, have, m, key, status)
            out.append(status)
        self._status_cache = fresh
        if len(out) == len(prev) and all(a is b for a, b in zip(out, prev, strict=True)):
            return prev
        return tuple(out)


def _status_key(st: Any) -> tuple[Any, ...]:
    """What of an :class:`~kubespan.endpoints.EndpointStatus` a :class:`PeerStatus` shows."""
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
    )
