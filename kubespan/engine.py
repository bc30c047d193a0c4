"""The mesh engine: discovery in; WireGuard peers, routes, rules and nftables out.

Level-triggered: every pass recomputes the desired state from its inputs (the affiliates, our
addresses, the peers' observed WireGuard counters), keeping one :class:`~kubespan.runtime.PeerRuntime`
per peer, plans the device with one planner for both kinds of pass (:meth:`Mesh._plan`) and writes
only the difference, at most once. A discovery change between polls runs a *light* pass that trusts
the last observation instead of re-reading the device. The path of one affiliate update, and when a
pass is light: docs/design/affiliate-path.md. All I/O goes through injected ports, so unit tests run
the engine against in-memory fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import string
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubespan.affiliate import (
    AffiliateError,
    LocalAffiliate,
    RemoteAffiliate,
    Traversal,
    build_local_affiliate,
)
from kubespan.constants import WATCHED_CHECK_INTERVAL, MeshConfig
from kubespan.dataplane.links import NetlinkEvent, notify
from kubespan.dataplane.ruleset import SET_IPV4, SET_IPV6
from kubespan.endpoints import Candidate, CandidateKind, EndpointMachine, Observation
from kubespan.firstcontact import NATTED, Action, FirstContact, FirstContactTimings, waits
from kubespan.hostinfo import HostInfo
from kubespan.identity import MeshIdentity, load_identity, pick_mac
from kubespan.nat.classify import NatClass, NatReport
from kubespan.nat.punch import PunchTimings
from kubespan.peerspec import PeerSpecMemo, PeerSpecs, compute_peer_specs
from kubespan.ports import (
    ChangeWatcher,
    Closable,
    DiscoveryPort,
    LinkPort,
    NftPort,
    PunchPort,
    RelayClientPort,
    RelayServerPort,
    StunPort,
)
from kubespan.probe import Prober
from kubespan.routed import RoutedIndex, routed_union
from kubespan.runtime import PeerRuntime, peer_status
from kubespan.snapshot import (
    NO_STUN,
    MeshSnapshot,
    MeshStatus,
    NatStatus,
    PeerStatus,
    RelayStatus,
    RemoteRecord,
)
from kubespan.traversal import NO_PATH, PeerFacts, Route
from kubespan.traversal import Traversal as TraversalWork
from kubespan.wireguard.backend import WireGuardBackend, WireGuardError
from kubespan.wireguard.diff import DiffMemo, RemovePeer, SetDevice, apply_ops, diff_device
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
from spanutil.ipcodec import IPInterface, IPNetwork
from spanutil.logs import log_event

log = logging.getLogger("kubespan.engine")

NODE_ID_FILE = "node-id"
STUN_INTERVAL = 60.0  # seconds between endpoint discoveries (also re-run when our addresses change)
FIRST_STUN_WAIT = 3.0  # with hole punching: the first publish waits this long for the first discovery
STUN_RETRY = 10.0  # after a discovery no responder answered (e.g. started before the responders)
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
    # published as the affiliate's control_plane (None: not a control plane)
    api_server_port: int | None = None
    stun_servers: Sequence[tuple[str, int]] = ()  # (host, port) STUN responders; empty: no discovery
    stun_interval: float = STUN_INTERVAL
    stun_retry: float = STUN_RETRY
    relay: bool = False  # run a relay for other nodes (announced in Traversal.relay)
    punch_timings: PunchTimings | None = None  # None: the defaults (2 s lead, 10 s window, 60 s → 10 min)
    relay_failover: float = 5.0  # seconds without rx on a relayed path before the next relay
    # who initiates a new pair's first handshake (kubespan.firstcontact); None: both at once
    first_contact: FirstContactTimings | None = field(default_factory=FirstContactTimings)


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
        stun: StunPort | None = None,
        punch: PunchPort | None = None,
        relay_client: RelayClientPort | None = None,
        relay_server: RelayServerPort | None = None,
        nft_watch: ChangeWatcher | None = None,
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
        self.stun = stun
        self.punch = punch
        self.relay_client = relay_client
        self.relay_server = relay_server if opts.relay else None
        self.nft_watch = nft_watch  # reports changes to the nftables table made from outside
        self.traversal: TraversalWork | None = None  # created at start (needs our key)
        self._traversal_facts: tuple[tuple[RemoteRecord, ...], dict[str, Traversal]] = ((), {})
        self._traversal_dir: PeerSpecs | None = None  # the specs the relay directory was built from
        self._traversal_seen: tuple[RemoteRecord, ...] | None = None  # the affiliates it last stepped on
        self.clock = clock
        self.wall = wall
        self.identity: MeshIdentity | None = None
        self.node_id = ""
        self.psk = PresharedKey(opts.cluster_secret)
        self.peers: dict[PublicKey, PeerRuntime] = {}  # one record per peer of self.specs
        self.specs = PeerSpecs((), ())
        self.local: LocalAffiliate | None = None
        self.device: ObservedDevice | None = None
        self.local_addresses: tuple[IPInterface, ...] = ()  # replaced only when they change
        self.errors: list[str] = []
        self.passes = 0
        self.light_passes = 0  # passes that trusted the last observation
        self.wg_writes = 0
        self.dataplane_changes: list[str] = []
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._dataplane_due = True
        self._sets_due = False
        self._last_dataplane = -1e9
        self._last_links = -1e9  # when links, routes and rules were last re-read
        # set while the netlink watch is subscribed (it reports every change to what the links own)
        self._watched = asyncio.Event()
        self._nft_watched = asyncio.Event()  # the same for the nftables watch (``nft_watch``)
        self._nft_due = False  # the nftables watch reported a change from outside (or lost some)
        self._last_host = -1e9
        self._host_due = False  # the netlink watch reported a node address change
        self._last_observe = -1e9  # when the device was last read (a full pass)
        # self.device holds what WireGuard has after our last writes (no failed write since it was read)
        self._device_known = False
        # Work reused while its inputs are the same (immutable) objects; none of it changes a result.
        self._affiliates_version: int | None = None  # the discovery version _remotes was read at
        self._remote_cache: dict[str, tuple[Any, RemoteRecord | None, str | None]] = {}  # by affiliate id
        self._remotes: list[RemoteAffiliate] | None = None
        self._records: tuple[RemoteRecord, ...] = ()  # the same affiliates, for the snapshot
        self._specs_from: tuple[Any, ...] | None = None  # (remotes, node id, public key, mesh address)
        self._spec_memo = PeerSpecMemo()
        self._routed = RoutedIndex()
        self._diff_memo = DiffMemo()
        self._built_local: LocalAffiliate | None = None  # what the last pass computed (maybe unpublished)
        self._snapshot: MeshSnapshot | None = None
        self._malformed: dict[str, tuple[str, bytes, tuple[bytes, ...]]] = {}  # last reported, by id
        self._learned_pub: dict[str, tuple[AddrPort, ...]] = {}  # as last published
        self._unpublished: object = None  # what the last failed publish tried (reported once)
        self._deferred_probes: list[tuple[PublicKey, ipaddress.IPv6Address]] = []
        self._fresh_sessions: list[PublicKey] = []  # peers to re-create in this pass's write
        self._joining: set[PublicKey] = set()  # peers whose first contact is not done
        self._contact_heard = False  # a joining peer's probe reached us: look for its session now
        self._observe_at: float | None = None  # (clock) a full pass is due then (a first contact step)
        # (clock) ... or then: an endpoint machine asked to observe its peer (fast detection)
        self._machines_at: float | None = None
        self._full_deferred = False  # the last pass was a change's light pass ahead of a due full one
        self._tasks: list[asyncio.Task[None]] = []
        # endpoint discovery (STUN): one run in flight at most; its result is taken by the next pass
        self.nat: NatReport | None = None  # what the last completed run found
        self.stun_runs = 0
        self._stun_task: asyncio.Task[NatReport] | None = None
        self._stun_for: tuple[IPInterface, ...] | None = None  # the addresses the last run started with
        self._stun_next = 0.0  # (clock) when the periodic run is due
        self._nat_status: NatStatus = self._no_stun_status()
        self._nat_classes: tuple[tuple[RemoteRecord, ...], dict[str, str]] = ((), {})  # by node id
        self._stopping = False
        self._started_at = 0.0
        self.on_pass: Callable[[Mesh], None] | None = None  # called after each pass published its snapshot

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, loop: bool = True) -> None:
        """Load the identity, open the device and start the pass loop (``loop`` False: the caller
        runs :meth:`reconcile` itself, as benchmarks do; the netlink watch runs either way)."""
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
            steering=self.cfg.steering,
        )
        self._publish_snapshot(light=False, at=None)
        await self.backend.ensure_device()
        self.prober.on_reply = self.wake
        self.prober.on_request = self._probe_request
        self.prober.open()
        self._started_at = self.clock()
        if self.punch is not None or self.relay_client is not None or self.relay_server is not None:
            self.traversal = TraversalWork(
                self.identity.public_key,
                wg_port=self.cfg.listen_port,
                punch=self.punch,
                relay_client=self.relay_client,
                relay_server=self.relay_server,
                wake=self.wake,
                clock=self.clock,
                wall=self.wall,
                timings=self.opts.punch_timings,
                failover_after=self.opts.relay_failover,
            )
        if loop:
            self._tasks.append(asyncio.create_task(self._run(), name="mesh-loop"))
        if isinstance(self.links, ChangeWatcher):
            task = self._watch(self.links, self._on_netlink, self._watched, "netlink")
            self._tasks.append(asyncio.create_task(task, name="mesh-netlink"))
        if self.nft_watch is not None:
            task = self._watch(self.nft_watch, self._on_nft, self._nft_watched, "nftables")
            self._tasks.append(asyncio.create_task(task, name="mesh-nft-watch"))

    async def stop(self, cleanup: bool = True) -> None:
        """Stop the loops; with ``cleanup`` remove everything we created (rules, routes, nft, link)."""
        self._stopping = True
        running: list[asyncio.Task[Any]] = [*self._tasks]
        if self._stun_task is not None:
            running.append(self._stun_task)
            self._stun_task = None
        for t in running:
            t.cancel()
        for t in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self.prober.close()
        if self.traversal is not None:
            await self.traversal.close()
        if cleanup:
            for what, step in (
                (self.nft.what, self.nft.teardown),
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

    @property
    def joining(self) -> int:
        """Peers whose first contact is not over (:mod:`kubespan.firstcontact`)."""
        return len(self._joining)

    def wake(self, dataplane: bool = False) -> None:
        if dataplane:
            self._dataplane_due = True
        self._wake.set()

    async def _watch(
        self,
        watcher: ChangeWatcher,
        callback: Callable[[NetlinkEvent], None],
        ready: asyncio.Event,
        what: str,
    ) -> None:
        while not self._stopping:
            try:
                await watcher.watch(callback, ready=ready)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # changes may have gone unreported: the watch's own resync
                ready.clear()
                await notify(callback, NetlinkEvent("resync", "resync", str(e)))
                log_event(log, f"{what} watch failed; retrying", logging.WARNING, error=str(e))
                await asyncio.sleep(1)

    async def _run(self) -> None:
        interval = self.cfg.timings.poll_interval
        # not ``while True``: Python 3.11's wait_for returns the result instead of raising when it is
        # cancelled just as its awaitable finishes (a wake-up at stop time), losing stop()'s cancel
        while not self._stopping:
            delay = interval
            try:
                await self.reconcile()
                # polls keep their cadence however many light passes come between them
                delay = max(0.1 * interval, min(interval, self._last_observe + interval - self.clock()))
                due = _earliest(self._observe_at, self._machines_at)
                if due is not None:
                    delay = max(0.0, min(delay, due - self.clock()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep running; the next pass retries
                self._error(f"reconcile: {e}")
                log.exception("reconcile failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    def _on_netlink(self, event: NetlinkEvent) -> None:
        if event.kind == "hostaddr":  # a node address came or went: read them in the next pass
            self._host_due = True
            self._wake.set()
            return
        if event.kind == "resync":  # events may have been lost: re-read every 2 s until resubscribed
            self._watched.clear()
            self._host_due = True
        self.wake(dataplane=True)

    def _on_nft(self, event: NetlinkEvent) -> None:
        if event.kind == "resync":
            self._nft_watched.clear()
        else:
            log_event(log, "nftables table changed from outside", detail=event.detail)
        self._nft_due = True
        self._wake.set()

    def _check_every(self, *watches: asyncio.Event) -> float:
        """How often to read back what ``watches`` cover: every ``reconcile_interval``, or while all
        of them are subscribed (they report every change from outside at once) as a safety net."""
        if all(w.is_set() for w in watches):
            return WATCHED_CHECK_INTERVAL
        return self.cfg.reconcile_interval

    def _error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-20]
        log_event(log, "mesh error", logging.WARNING, error=text)

    # -- endpoint discovery (STUN) -----------------------------------------------------------------

    def _step_stun(self, now: float) -> None:
        """Take a finished discovery's result and start the next one when it is due: at start, when
        our addresses changed since the last run started, and every ``stun_interval`` (``stun_retry``
        after a run no responder answered). The run is a
        background task (a pass never waits for responders); its end wakes the engine, whose next
        pass publishes the result."""
        task = self._stun_task
        if task is not None:
            if not task.done():
                return  # one in flight at a time
            self._stun_task = None
            try:
                report = task.result()
            except Exception as e:  # a port must not raise, but if it does: no STUN, with the reason
                report = NatReport(NatClass.UNKNOWN, None, (), f"discovery failed: {e}")
            self._take_nat(report)
            if not report.responders:  # nobody answered: try again sooner than the interval
                self._stun_next = min(self._stun_next, now + self.opts.stun_retry)
        if self.stun is None or not self.opts.stun_servers or not self.local_addresses or self._stopping:
            return
        if self._stun_for is self.local_addresses and now < self._stun_next:
            return
        self._stun_for = self.local_addresses
        self._stun_next = now + self.opts.stun_interval
        self.stun_runs += 1
        local = tuple(dict.fromkeys(a.ip for a in self.local_addresses))
        self._stun_task = asyncio.create_task(
            self.stun.discover(self.cfg.listen_port, tuple(self.opts.stun_servers), local),
            name="mesh-stun",
        )
        self._stun_task.add_done_callback(lambda _: self.wake())

    def _take_nat(self, report: NatReport) -> None:
        """Keep a finished discovery's report (published by this pass) and its status."""
        previous, self.nat = self.nat, report
        if (
            self.relay_server is not None
            and report.nat_class != NatClass.PUBLIC
            and (previous is None or previous.nat_class != report.nat_class)
        ):
            log_event(
                log,
                "relaying without a public endpoint: peers reach the relay only through a port forward",
                logging.WARNING,
                nat_class=str(report.nat_class),
            )
        publish = report.publishable
        error = f"STUN: {report.error}" if report.error else None
        if publish is None and error is None:  # an answered but endpoint-dependent mapping
            error = "STUN: the mapping depends on the destination (symmetric NAT): nothing to publish"
        self._nat_status = NatStatus(
            nat_class=str(report.nat_class),
            mapped=str(report.mapped) if report.mapped else None,
            published=str(publish) if publish else None,
            responders=tuple(str(r) for r in report.responders),
            servers=self._nat_status.servers,
            error=error,
            checked_at=self.wall(),
        )
        if previous is None or (previous.nat_class, previous.mapped, previous.error) != (
            report.nat_class,
            report.mapped,
            report.error,
        ):
            log_event(
                log,
                "endpoint discovery",
                nat_class=str(report.nat_class),
                mapped=str(report.mapped) if report.mapped else None,
                published=str(publish) if publish else None,
                error=report.error or None,
            )

    def _no_stun_status(self) -> NatStatus:
        """The NAT status before any discovery finished (or when none runs), with the reason."""
        servers = tuple(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.opts.stun_servers)
        if not servers:
            return NO_STUN
        if self.stun is None:
            return NatStatus(servers=servers, error="STUN: no STUN port (endpoint discovery is off)")
        return NatStatus(servers=servers, error="STUN: discovery has not finished yet")

    # -- one pass ----------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """One level-triggered pass, light or full (see docs/design/affiliate-path.md)."""
        assert self.identity is not None, "start() first"
        now = self.clock()
        self.passes += 1
        light = self._light_possible(now)
        # a discovery change goes first: when only periodic work is due (the poll, the host and data
        # plane checks, a machine's timer), a light pass writes the change now and the due full pass
        # follows at once (woken), so a change never waits for a 1000-peer re-read and re-plan
        deferred = not light and not self._full_deferred and self._change_first_possible()
        self._full_deferred = deferred
        if deferred:
            light = True
            self.wake()
        host_every = self._check_every(self._watched)
        if not light and (self._host_due or now - self._last_host >= host_every or not self.local_addresses):
            self._host_due = False
            addresses = tuple(await self.host.addresses(exclude_links=(self.cfg.link_name,)))
            if addresses != self.local_addresses:
                self.local_addresses = addresses  # a new object: the peers' candidates are reordered
            self._last_host = now
        self._step_stun(now)
        failed_early = False  # the first pass's data plane failed (reported once; the next pass retries)
        if not self._dataplane_started:
            # the first pass: link, routes, rules and table before we are published. WireGuard
            # handshakes only on an up link, and once we are published every peer's pass competes
            # for the CPU (a 50-node join on 2 cores: 0.7 s from our first peers' write to the link)
            await self._reconcile_dataplane(links=True, reread=True)
            self._last_dataplane = self._last_links = now
            failed_early = self._dataplane_due
        await self._publish_local()
        previous = self.specs
        changed = self._compute_specs(now)
        # traversal steps on every full pass and on every affiliate change: a new peer's punch intent,
        # or the peer's commitment to ours, must not wait for the next poll (the start is 1 s away)
        if self.traversal is not None and (not light or self._records is not self._traversal_seen):
            self._traversal_seen = self._records
            if self._step_traversal(now):
                await self._publish_local()  # new punch intents: the peer must see them before the start

        # probes of a pass whose write failed wait for the next write (their peers may be missing)
        probes, self._deferred_probes = self._deferred_probes, []
        if light and self.specs is previous:
            written = True  # no peer changed, and the last observation is trusted
        else:
            written = await self._reconcile_peers(now, changed if light else None, probes)
        if not written:
            self._deferred_probes = probes
            if light:  # one write per pass: the re-read and the repair are the next (full) pass's, now
                light = False
                self.wake()
        elif light:
            self.light_passes += 1
        if not self._deferred_probes:
            for pk, addr in dict.fromkeys(probes):
                self.prober.send(pk, addr)
        if not light or (self.specs is not previous and self._learned_pub):
            # learned endpoints change only when machines observe, or when a peer that has some leaves
            await self._publish_learned()

        if failed_early:
            pass  # not twice in one pass: the same error again, for nothing
        elif (
            self._dataplane_due
            or self._nft_due
            or (
                not deferred
                and now - self._last_dataplane >= self._check_every(self._watched, self._nft_watched)
            )
        ):
            # links, routes and rules: when something changed (or may have) and, while the netlink
            # watch reports every change to them, only every WATCHED_CHECK_INTERVAL besides
            links = self._dataplane_due or now - self._last_links >= self._check_every(self._watched)
            await self._reconcile_dataplane(links=links, reread=True)
            self._last_dataplane = now
            if links:
                self._last_links = now
        elif self._sets_due:
            await self._reconcile_dataplane(links=False, reread=False)
        if self.traversal is not None and self._dataplane_started and not self._stopping:
            await self.traversal.ensure_started(self.identity.address.ip, self.cfg.link_name)
        if not self.ready.is_set() and self.device is not None:
            self.ready.set()
        self._publish_snapshot(light=light, at=self.wall())
        if self.on_pass is not None:
            self.on_pass(self)

    @property
    def _dataplane_started(self) -> bool:
        """Whether a pass has reconciled the data plane (link, routes, rules, table) yet."""
        return self._last_dataplane > -1e9

    def _light_possible(self, now: float) -> bool:
        """Whether this pass may trust the last observation: between polls, with no probe reply
        to process, nothing reported changed from outside and no periodic check due."""
        poll = self.cfg.timings.poll_interval
        return (
            self.device is not None
            and self._device_known
            and bool(self.local_addresses)
            and not self._dataplane_due
            and not self._host_due
            and now - self._last_observe + 0.1 * poll < poll
            and now - self._last_dataplane < self._check_every(self._watched, self._nft_watched)
            and now - self._last_host < self._check_every(self._watched)
            and not self.prober.has_answered
            and not self._contact_heard
            and not (self.traversal is not None and self.traversal.dirty)
            and (self._observe_at is None or now < self._observe_at)
            and (self._machines_at is None or now < self._machines_at)
        )

    def _change_first_possible(self) -> bool:
        """A discovery change is pending and nothing but timers asks for a full pass: the last
        observation is usable (device known, addresses read), nothing changed from outside, no probe
        reply or traversal step waits. Then the change may go first, in a light pass."""
        return (
            self.discovery is not None
            and self.discovery.version != self._affiliates_version
            and self.device is not None
            and self._device_known
            and bool(self.local_addresses)
            and not self._dataplane_due
            and not self.prober.has_answered
            and not self._contact_heard
            and not (self.traversal is not None and self.traversal.dirty)
        )

    async def _reconcile_peers(
        self,
        now: float,
        changed: AbstractSet[PublicKey] | None,
        probes: list[tuple[PublicKey, ipaddress.IPv6Address]],
    ) -> bool:
        """WireGuard: plan (:meth:`_plan`) and apply the difference, at most one write. ``changed``
        None: a full pass, which reads the device first; otherwise a light one, against the last
        observation. The probes to send are added to ``probes``. False: the write failed."""
        answered: AbstractSet[Hashable] = frozenset()
        rtts: Mapping[Hashable, float] = {}
        if changed is None:
            self._contact_heard = False
            await self._read_device(now)
            answered = self.prober.take_answered()
            rtts = self.prober.take_rtts()
        observed = self.device.peers if self.device is not None else {}
        desired, planned = self._plan(now, observed, answered, changed, rtts)
        self._observe_at = self._first_contact_due()
        self._machines_at = self._machines_due()
        probes.extend(planned)
        fresh, self._fresh_sessions = self._fresh_sessions, []
        return await self._write(desired, fresh)

    async def _read_device(self, now: float) -> None:
        """Observe the WireGuard device (creating it when it is missing)."""
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

    def _plan(
        self,
        now: float,
        observed: Mapping[PublicKey, ObservedPeer],
        answered: AbstractSet[Hashable],
        changed: AbstractSet[PublicKey] | None,
        rtts: Mapping[Hashable, float] | None = None,
    ) -> tuple[DeviceConfig, list[tuple[PublicKey, ipaddress.IPv6Address]]]:
        """The desired device and the probes to send.

        Full pass (``changed`` None): every peer's endpoint machine observes its peer in
        ``observed``. Light pass: only the peers in ``changed`` (new, or with a replaced spec) are
        looked at; an absent one gets the endpoint its machine picks, and a probe; a present one
        keeps WireGuard's endpoint (its machine runs at the next poll); the others keep their
        last config.
        """
        assert self.identity is not None
        wall = self.wall()
        keepalive, subnet = self.cfg.persistent_keepalive, self.identity.subnet
        peers: list[PeerConfig] = []
        probes: list[tuple[PublicKey, ipaddress.IPv6Address]] = []
        for spec in self.specs.specs:
            peer = self.peers[spec.public_key]
            if changed is not None and peer.config is not None and spec.public_key not in changed:
                peers.append(peer.config)
                continue
            candidates = peer.candidates(self.local_addresses, subnet)
            have = observed.get(spec.public_key)
            endpoint = None
            route = self._route(spec.public_key, spec.node_id)
            if route is not None:
                candidates = _routed_candidates(candidates, route)
            peer.machine.set_candidates(candidates)
            adopt, fresh = (
                self.traversal.take_adopt(spec.public_key, route)
                if route is not None and self.traversal is not None
                else (False, False)
            )
            if adopt:
                # a punch answered or a relay was allocated: switch now (the machine observes next poll)
                assert route is not None and route.first is not None
                self._end_first_contact(peer)
                # WireGuard holds the next initiation for REKEY_TIMEOUT (5 s) after its last one, even
                # one it could not send or that went to the previous route: a peer without a session
                # is re-created too, so its initiation to the new route leaves at once
                if have is not None and (fresh or not _has_session(have, wall)):
                    self._fresh_sessions.append(spec.public_key)
                peer.machine.adopt(now, route.first)
                endpoint = route.first
                log_event(log, "peer endpoint", peer=peer.label, endpoint=str(endpoint), via="traversal")
                if spec.mesh_address is not None:
                    probes.append((spec.public_key, spec.mesh_address))
            else:
                act = self._first_contact(peer, now, have, wall, route, spec.public_key in answered)
                if act is Action.HOLD:
                    peers.append(peer.config_for(None, 0, self.psk))
                    continue
                if act is Action.PROBE and spec.mesh_address is not None:
                    probes.append((spec.public_key, spec.mesh_address))
                if act is Action.RECREATE and have is not None:
                    self._fresh_sessions.append(spec.public_key)
                    why = peer.first.why if peer.first is not None else ""
                    log_event(log, "peer re-created for a first initiation", peer=peer.label, why=why)
                if changed is None or have is None or act is Action.RECREATE:
                    state = peer.machine.state
                    key = spec.public_key
                    rtt = rtts.get(key) if rtts else None
                    endpoint, probe, fresh = self._step(peer, now, have, wall, key in answered, rtt)
                    if fresh and have is not None and act is not Action.RECREATE:
                        # the trial needs a handshake: a re-created peer initiates at once
                        self._fresh_sessions.append(key)
                        endpoint = endpoint or peer.machine.current
                    if self.cfg.allow_down_peer_bypass and peer.machine.state != state:
                        self._sets_due = True  # the bypass routes only peers that are up
                    if act is Action.RECREATE:
                        endpoint = endpoint or peer.machine.current  # the re-added peer needs it
                    if probe and spec.mesh_address is not None:
                        probes.append((spec.public_key, spec.mesh_address))
            ka = route.keepalive if route is not None and route.keepalive is not None else keepalive
            peers.append(peer.config_for(endpoint, ka, self.psk))
        desired = DeviceConfig.of(
            self.identity.private_key, self.cfg.listen_port, self.cfg.fwmark_wireguard, peers
        )
        return desired, probes

    # -- first contact -----------------------------------------------------------------------------

    def _first_contact(
        self,
        peer: PeerRuntime,
        now: float,
        have: ObservedPeer | None,
        wall: float,
        route: Route | None,
        heard: bool,
    ) -> Action:
        """A new peer's first-contact step (:mod:`kubespan.firstcontact`); GO once it is done. A
        punch-gated peer has none: its punch decides who sends what when. ``heard``: a probe to
        the peer was answered in this pass (what confirms a session, when the peer can be probed)."""
        first = peer.first
        if first is None or first.done:
            return Action.GO
        if route is not None and route.exclusive:
            self._end_first_contact(peer)
            return Action.GO
        session = have is not None and _has_session(have, wall)
        probed = self.prober.enabled and peer.spec.mesh_address is not None
        act = first.step(
            now,
            session,
            answered=have is not None and not session and have.rx_bytes > 0,
            heard=heard if probed else None,
        )
        if first.done:
            self._joining.discard(peer.spec.public_key)
        return act

    def _probe_request(self, source: ipaddress.IPv6Address) -> None:
        """An echo request arrived (the prober's callback). From a joining peer's mesh address it
        came through the peer's session to us: the next pass is a full one, at once, so the session
        is seen without waiting for the first contact's next look (``check``)."""
        for key in self._joining:
            peer = self.peers.get(key)
            if peer is not None and peer.spec.mesh_address == source:
                self._contact_heard = True
                self.wake()
                return

    def _end_first_contact(self, peer: PeerRuntime) -> None:
        if peer.first is not None:
            peer.first.done = True
            self._joining.discard(peer.spec.public_key)

    def _machines_due(self) -> float | None:
        """The earliest observation an endpoint machine asked for (fast detection: an active poll
        while a peer's tx grows, the next probe or verdict of an episode)."""
        due = [d for p in self.peers.values() if (d := p.machine.due) is not None]
        return min(due) if due else None

    def _first_contact_due(self) -> float | None:
        """When a first contact next has a step to take (a full pass is due then)."""
        due = [d for k in self._joining if (p := self.peers.get(k)) and p.first and (d := p.first.due())]
        return min(due) if due else None

    def _waits_for(self, key: PublicKey, node_id: str) -> bool:
        assert self.identity is not None
        peer_class = self._remote_traversals().get(node_id, Traversal()).nat_class
        local = self._local_class()
        return waits(self.identity.public_key, "eim" if local == "pending" else local, key, peer_class)

    # -- NAT traversal -----------------------------------------------------------------------------

    def _local_class(self) -> str:
        """Our NAT class for traversal; ``pending`` while the first discovery runs (peers behind NAT
        are then held, not tried naively: an early initiation can pollute their NAT)."""
        if self.nat is not None:
            return str(self.nat.nat_class)
        return "pending" if self.stun is not None and self.opts.stun_servers else "unknown"

    def _remote_traversals(self) -> dict[str, Traversal]:
        """Each affiliate's published :class:`Traversal`, by node id (rebuilt when the affiliates change)."""
        records, by_node = self._traversal_facts
        if records is not self._records:
            by_node = {r.affiliate.node_id: r.affiliate.traversal for r in self._records}
            self._traversal_facts = (self._records, by_node)
        return by_node

    def _route(self, key: PublicKey, node_id: str) -> Route | None:
        """What traversal wants for this peer's endpoint (None: nothing, the machine alone decides)."""
        if self.traversal is None:
            return None
        local = self._local_class()
        peer_class = self._remote_traversals().get(node_id, Traversal()).nat_class
        gated = self.traversal.gated("eim" if local == "pending" else local, peer_class)
        route = self.traversal.route(key, gated)
        return None if route.first is None and not route.exclusive else route

    def _step_traversal(self, now: float) -> bool:
        """Feed the punch planner and the relay choice (see :mod:`kubespan.traversal`); True when
        the punch intents to publish changed."""
        assert self.traversal is not None
        t = self.traversal
        if self.specs is not self._traversal_dir:
            t.directory((s.public_key, s.mesh_address) for s in self.specs.specs)
            self._traversal_dir = self.specs
        remotes = self._remote_traversals()
        observed = self.device.peers if self.device is not None else {}
        facts: list[PeerFacts] = []
        for spec in self.specs.specs:
            peer = self.peers[spec.public_key]
            tr = remotes.get(spec.node_id, Traversal())
            have = observed.get(spec.public_key)
            facts.append(
                PeerFacts(
                    key=spec.public_key,
                    name=peer.label,
                    mesh_address=spec.mesh_address,
                    nat_class=tr.nat_class,
                    relays=tr.relay,
                    candidates=spec.endpoints,
                    intents=tr.punches,
                    up=str(peer.machine.state) == "up",
                    endpoint=(have.endpoint if have is not None and have.endpoint else peer.machine.current),
                    rx_bytes=have.rx_bytes if have is not None else 0,
                    last_handshake=have.last_handshake if have is not None else None,
                    known_at=peer.known_at,
                )
            )
        before = t.intents
        local = self._local_class()
        return t.step(now, "unknown" if local == "pending" else local, facts) != before

    @staticmethod
    def _step(
        peer: PeerRuntime,
        now: float,
        have: ObservedPeer | None,
        wall: float,
        answered: bool,
        rtt: float | None = None,
    ) -> tuple[AddrPort | None, bool, bool]:
        """Run a peer's endpoint machine on its observation: the endpoint to configure (None:
        keep WireGuard's), whether to probe it and whether to re-create the peer first."""
        m = peer.machine
        obs = Observation.from_peer(have, wall) if have is not None else None
        decision = m.observe(now, obs, answered=answered, rtt=rtt)
        if decision.state_changed:
            endpoint = str(m.current) if m.current else None
            log_event(log, "peer state", peer=peer.label, state=str(m.state), endpoint=endpoint)
        if decision.set_endpoint is not None:
            log_event(log, "peer endpoint", peer=peer.label, endpoint=str(decision.set_endpoint))
        endpoint = decision.set_endpoint
        if endpoint is None and have is None:
            endpoint = m.current  # an absent peer is (re-)added with the machine's endpoint
        return endpoint, decision.probe, decision.fresh_session

    async def _write(self, desired: DeviceConfig, fresh: Sequence[PublicKey] = ()) -> bool:
        """Apply the difference between ``desired`` and the last observation in one write; the
        peers in ``fresh`` are removed first and re-added (a new session: see
        :meth:`~kubespan.traversal.Traversal.take_adopt`).
        False: the write failed (WireGuard may hold part of it: the next pass re-reads)."""
        pre: list[Any] = []
        if fresh and self.device is not None:
            pre = [RemovePeer(k) for k in fresh if k in self.device.peers]
            self.device = apply_ops(self.device, pre)  # what the write leaves before the diff's ops
        changes = diff_device(desired, self.device, self._diff_memo)
        ops = [*pre, *changes] if pre else changes
        if not ops:
            return True
        if self.wg_writes and any(isinstance(op, SetDevice) for op in ops):
            # device-level settings were missing after we had written them: a re-created device,
            # which lost its addresses and routes (peer-only changes leave links, routes and rules
            # alone). Our first write sets them on the device the first pass's data plane just saw.
            self._dataplane_due = True
        try:
            await self.backend.apply(ops)
        except WireGuardError as e:
            self._device_known = False
            self._error(f"apply WireGuard config: {e}")
            return False
        if self.device is not None:
            self.device = apply_ops(self.device, changes)  # (``pre`` is applied already)
        self.wg_writes += 1
        self._sets_due = True  # the nftables target sets follow the peers' AllowedIPs
        return True

    async def _publish_local(self) -> None:
        assert self.identity is not None
        if (
            self.local is None
            and self.traversal is not None
            and self._local_class() == "pending"
            and self.clock() - self._started_at < FIRST_STUN_WAIT
        ):
            # with hole punching, peers must see our NAT class with our first affiliate: a peer that
            # takes us for an unknown (so not punch-gated) node tries us naively, and its early
            # initiations pollute a bare NAT (nat.md §0); the first discovery takes milliseconds
            return
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
            api_server_port=self.opts.api_server_port,
            mapped_endpoint=self.nat.publishable if self.nat is not None else None,
            traversal=Traversal(
                nat_class=str(self.nat.nat_class) if self.nat is not None else "unknown",
                relay=self.relay_server is not None,
                punches=self.traversal.intents if self.traversal is not None else (),
            ),
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
        if version != self._affiliates_version or self._remotes is None:
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
            self._affiliates_version = version
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

    def _compute_specs(self, now: float) -> set[PublicKey]:
        """Peer specs from the affiliates (and their records, :meth:`_sync_peers`). Returns the
        peers whose spec is new or replaced (empty when the specs are unchanged)."""
        assert self.identity is not None
        since = (self._remote_affiliates(), self.node_id, self.identity.public_key, self.identity.address.ip)
        if (
            self._specs_from is not None
            and since[0] is self._specs_from[0]
            and since[1:] == self._specs_from[1:]
        ):
            return set()  # same affiliates (the same list object: nothing was re-read), same identity
        self._specs_from = since
        specs = compute_peer_specs(*since, memo=self._spec_memo)
        if specs is self.specs:
            return set()
        self.specs = specs
        return self._sync_peers(now)

    def _sync_peers(self, now: float) -> set[PublicKey]:
        """One :class:`PeerRuntime` per peer of ``self.specs``: new peers get one, a replaced
        spec resets its record's derived values, departed peers lose theirs. Returns the peers
        whose spec is new or replaced."""
        specs = self.specs
        changed: set[PublicKey] = set()
        for spec in specs.specs:
            peer = self.peers.get(spec.public_key)
            if peer is None:
                first = None
                if self.opts.first_contact is not None:
                    waiting = self._waits_for(spec.public_key, spec.node_id)
                    # a peer behind NAT may be unreachable from here: its hold ends without a re-creation
                    natted = self._remote_traversals().get(spec.node_id, Traversal()).nat_class in NATTED
                    first = FirstContact(now, waiting, self.opts.first_contact, recreate=not natted)
                    self._joining.add(spec.public_key)
                machine = EndpointMachine(self.cfg.timings, now=now)
                self.peers[spec.public_key] = PeerRuntime(spec, machine, first, self.wall())
            elif peer.spec is not spec:
                peer.respec(spec)
            else:
                continue
            changed.add(spec.public_key)
        if len(self.peers) > len(specs.specs):  # some left
            wanted = {s.public_key for s in specs.specs}
            for gone in [k for k in self.peers if k not in wanted]:
                del self.peers[gone]
                self._joining.discard(gone)
        return changed

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
        learned = {p.spec.node_id: p.machine.learned for p in self.peers.values() if p.machine.learned}
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

    async def _reconcile_dataplane(self, *, links: bool, reread: bool) -> None:
        """Links, routes and rules (unless ``links`` is False), then the nftables table and sets
        (read back from the kernel when ``reread``; else our last write is trusted)."""
        assert self.identity is not None
        self._sets_due = self._nft_due = False
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
        sets = self._target_sets()
        try:
            # a sets-only pass follows our own WireGuard writes: nothing to re-read (the periodic
            # check reads the table and repairs what was changed from outside)
            changes += await self.nft.reconcile(sets, trust_cache=not reread, normalized=True)
        except Exception as e:
            # the target sets drive the marking chains, or become prefix routes (steering "routes")
            self._error(f"{self.nft.what}: {e}")
            self._dataplane_due = True
        if changes:
            self.dataplane_changes = (self.dataplane_changes + changes)[-50:]
            log_event(log, "data plane reconciled", changes=changes)

    def _target_sets(self) -> dict[str, list[IPNetwork]]:
        """The nftables target sets: the routed prefixes by family. The routed index updates them
        by the replaced specs; with the bypass they also depend on which peers are up and are
        recomputed."""
        assert self.identity is not None
        specs, subnet = self.specs.specs, self.identity.subnet
        if self.cfg.allow_down_peer_bypass:
            states = {key: peer.machine.state for key, peer in self.peers.items()}
            union = routed_union(specs, subnet, states=states, allow_down_peer_bypass=True)
            by_family = self._routed.reset(None, subnet, union)
        else:
            by_family = self._routed.update(specs, subnet)
            if by_family is None:
                by_family = self._routed.reset(specs, subnet, routed_union(specs, subnet))
        return {SET_IPV4: by_family[4], SET_IPV6: by_family[6]}

    # -- status ------------------------------------------------------------------------------------

    @property
    def snapshot(self) -> MeshSnapshot | None:
        """What the last pass published (None before :meth:`start`)."""
        return self._snapshot

    def status(self) -> MeshStatus:
        """The published snapshot, as strings."""
        assert self._snapshot is not None, "start() first"
        return self._snapshot.status()

    def _publish_snapshot(self, *, light: bool, at: float | None, reuse: bool = True) -> None:
        """Build this pass's :class:`MeshSnapshot`, reusing the previous one (or its parts) where
        nothing changed, and publish it. ``reuse`` False builds every peer status afresh (for
        tests that compare the two)."""
        assert self.identity is not None
        prev = self._snapshot
        peers = self._peer_statuses(light, prev.peers if prev is not None else (), reuse)
        public_ip = self.discovery.public_ip if self.discovery is not None else None
        errors = tuple(self.errors[-5:])
        configured = self.ready.is_set()
        relay = RelayStatus.of(self.relay_server.status()) if self.relay_server is not None else None
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
            and prev.nat is self._nat_status
            and prev.relay == relay
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
            nat=self._nat_status,
            relay=prev.relay if prev is not None and prev.relay == relay else relay,
            steering=self.cfg.steering,
        )

    def _peer_nat_classes(self) -> dict[str, str]:
        """The NAT class each affiliate publishes, by node id (recomputed when the affiliates change)."""
        records, classes = self._nat_classes
        if records is not self._records:
            classes = {r.affiliate.node_id: r.affiliate.traversal.nat_class for r in self._records}
            self._nat_classes = (self._records, classes)
        return classes

    def _peer_statuses(
        self, light: bool, prev: tuple[PeerStatus, ...], reuse: bool = True
    ) -> tuple[PeerStatus, ...]:
        """Every peer's status, in the order of the specs; ``prev`` again when no status changed
        (see :meth:`PeerRuntime.status`; ``light``: this pass ran no machine of an unchanged spec)."""
        observed = self.device.peers if self.device is not None else {}
        wall, now = self.wall(), self.clock()
        classes = self._peer_nat_classes()
        out: list[PeerStatus] = []
        for spec in self.specs.specs:
            peer, have = self.peers[spec.public_key], observed.get(spec.public_key)
            nat = classes.get(spec.node_id, "unknown")
            path = self.traversal.status(spec.public_key) if self.traversal is not None else NO_PATH
            if reuse:
                out.append(peer.status(have, light=light, wall=wall, now=now, nat_class=nat, path=path))
            else:
                st = peer.machine.status()
                out.append(peer_status(spec, st, have, wall=wall, now=now, nat_class=nat, path=path))
        if len(out) == len(prev) and all(a is b for a, b in zip(out, prev, strict=True)):
            return prev
        return tuple(out)


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _has_session(have: ObservedPeer, wall: float) -> bool:
    """A handshake recent enough that WireGuard still holds its keys (REJECT_AFTER_TIME, 180 s)."""
    return have.last_handshake is not None and wall - have.last_handshake < 180


def _routed_candidates(candidates: tuple[Candidate, ...], route: Route) -> tuple[Candidate, ...]:
    """A peer's candidates with traversal's endpoint first (or alone: ``route.exclusive``)."""
    first = () if route.first is None else (Candidate(route.first, CandidateKind.LEARNED),)
    if route.exclusive:
        return first
    return first + tuple(c for c in candidates if c.endpoint != route.first)
