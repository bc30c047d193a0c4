"""In-memory fakes of :class:`LinkManager` and :class:`NftManager` for engine unit tests.

They keep the same methods, return values and change-list semantics (an
unchanged reconcile returns ``[]``), record every call, and let a test simulate
someone else removing things (``remove_*``), which also fires the ``watch``
callbacks as the real rtnetlink watcher would. ``fail_next(method, exc)``
makes the next call of a method raise.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubespan import constants as C
from kubespan.dataplane.links import (
    Callback,
    IPInterface,
    LinkNotFoundError,
    NetlinkEvent,
    ReconcileInOrder,
    notify,
)
from kubespan.dataplane.nft import NftError, Transaction
from kubespan.dataplane.ruleset import (
    FAMILY,
    SET_IPV4,
    SET_IPV6,
    RulesetParams,
    diff_sets,
    normalize_desired,
    render_diff,
    render_replace,
)
from spanutil.ipcodec import IPNetwork

INET, INET6 = "inet", "inet6"


class _Failures:
    def __init__(self) -> None:
        super().__init__()  # the next base's state (FakeWatch's watchers) too
        self._fail: dict[str, list[BaseException]] = {}

    def fail_next(self, method: str, exc: BaseException) -> None:
        """The next call of ``method`` raises ``exc`` (queue several for several calls)."""
        self._fail.setdefault(method, []).append(exc)

    def _maybe_fail(self, method: str) -> None:
        queue = self._fail.get(method)
        if queue:
            raise queue.pop(0)


class FakeWatch:
    """A watch (the engine's ``ChangeWatcher``) whose events a test sends with ``_emit``; the nftables
    watch's fake, and the link manager's watch."""

    def __init__(self) -> None:
        self._watchers: list[Callback] = []

    async def _emit(self, kind: str, action: str, detail: str) -> None:
        for cb in list(self._watchers):
            await notify(cb, NetlinkEvent(kind, action, detail))

    async def watch(self, callback: Callback, *, ready: asyncio.Event | None = None) -> None:
        self._watchers.append(callback)
        if ready is not None:
            ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            self._watchers.remove(callback)


class FakeLinkManager(_Failures, FakeWatch, ReconcileInOrder):
    """The link, its addresses, our two default routes and our two rules, as plain state."""

    def __init__(
        self, cfg: C.MeshConfig | None = None, *, netns: str | None = None, link_exists: bool = True
    ) -> None:
        """The settings of ``cfg`` (MeshConfig's defaults when None), as ``LinkManager.from_config``."""
        super().__init__()
        cfg = cfg or C.MeshConfig()
        self.ifname, self.mtu, self.table = cfg.link_name, cfg.mtu, cfg.routing_table
        self.steering = cfg.steering
        self.priority, self.fwmask = cfg.rule_priority, cfg.fwmark_mask
        self.fwmark = cfg.fwmark_wireguard if self.by_routes else cfg.fwmark_force
        self.netns = netns
        # observable kernel state
        self.link_exists = link_exists
        self.link_mtu = 1500 if link_exists else None
        self.link_up = False
        self.addresses: set[IPInterface] = set()
        self.routes: set[str] = set()  # {"inet", "inet6"}: the default routes (steering "marks")
        self.prefix_routes: dict[int, set[IPNetwork]] = {4: set(), 6: set()}  # steering "routes"
        self.rules: set[str] = set()
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    @classmethod
    def from_config(cls, cfg: C.MeshConfig, *, netns: str | None = None) -> FakeLinkManager:
        return cls(cfg, netns=netns)

    @property
    def by_routes(self) -> bool:
        return self.steering == C.STEERING_ROUTES

    # -- test controls ------------------------------------------------------------------------

    async def create_link(self) -> None:
        """What the WireGuard backend does."""
        if not self.link_exists:
            self.link_exists, self.link_mtu, self.link_up = True, 1500, False
            await self._emit("link", "new", self.ifname)

    async def remove_link(self) -> None:
        """Someone deleted the link: its addresses and routes go with it."""
        self.link_exists, self.link_mtu, self.link_up = False, None, False
        self.addresses.clear()
        self.routes.clear()
        self.prefix_routes = {4: set(), 6: set()}
        await self._emit("link", "del", self.ifname)

    async def remove_address(self, address: IPInterface | str) -> None:
        self.addresses.discard(ipaddress.ip_interface(address))
        await self._emit("addr", "del", str(address))

    async def remove_route(self, family: str = INET) -> None:
        self.routes.discard(family)
        await self._emit("route", "del", f"{family} default table {self.table}")

    async def remove_rule(self, family: str = INET) -> None:
        self.rules.discard(family)
        await self._emit("rule", "del", f"{family} priority {self.priority}")

    async def set_link_down(self) -> None:
        self.link_up = False
        await self._emit("link", "new", self.ifname)

    # -- the LinkManager interface ------------------------------------------------------------

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeLinkManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _require_link(self) -> None:
        if not self.link_exists:
            raise LinkNotFoundError(f"link {self.ifname!r} not found")

    async def reconcile_link(self, addresses: Sequence[IPInterface], up: bool = True) -> list[str]:
        desired = [ipaddress.ip_interface(a) for a in addresses]
        self.calls.append(("reconcile_link", (tuple(desired), up)))
        self._maybe_fail("reconcile_link")
        self._require_link()
        changes = []
        if self.link_mtu != self.mtu:
            changes.append(f"link {self.ifname}: mtu {self.link_mtu} -> {self.mtu}")
            self.link_mtu = self.mtu
        if self.link_up != up:
            changes.append(f"link {self.ifname}: {'up' if up else 'down'}")
            self.link_up = up
        for a in sorted(self.addresses - set(desired), key=str):
            self.addresses.discard(a)
            changes.append(f"address {self.ifname}: del {a}")
        for a in desired:
            if a not in self.addresses:
                self.addresses.add(a)
                changes.append(f"address {self.ifname}: add {a}")
        return changes

    async def reconcile_routes(self) -> list[str]:
        self.calls.append(("reconcile_routes", None))
        self._maybe_fail("reconcile_routes")
        self._require_link()
        changes = []
        if self.by_routes:
            return changes  # reconcile_prefix_routes owns the table
        for fam in (INET, INET6):
            if fam not in self.routes:
                self.routes.add(fam)
                changes.append(
                    f"route table {self.table}: add {fam} default dev {self.ifname} mtu {self.mtu}"
                )
        return changes

    async def reconcile_rules(self) -> list[str]:
        self.calls.append(("reconcile_rules", None))
        self._maybe_fail("reconcile_rules")
        changes = []
        for fam in (INET, INET6):
            if fam not in self.rules:
                self.rules.add(fam)
                mark = f"{'not ' if self.by_routes else ''}fwmark {self.fwmark:#x}/{self.fwmask:#x}"
                changes.append(f"rule: add {fam} priority {self.priority} {mark} lookup {self.table}")
        return changes

    async def reconcile_prefix_routes(
        self, desired: Mapping[int, Sequence[IPNetwork]], *, trust_cache: bool = False
    ) -> list[str]:
        """Steering "routes": the table's routes per peer prefix, as one counted change."""
        self.calls.append(("reconcile_prefix_routes", {v: tuple(n) for v, n in desired.items()}))
        self._maybe_fail("reconcile_prefix_routes")
        self._require_link()
        want = {v: set(desired.get(v, ())) for v in (4, 6)}
        added = sum(len(want[v] - self.prefix_routes[v]) for v in want)
        deleted = sum(len(self.prefix_routes[v] - want[v]) for v in want) + len(self.routes)
        self.routes.clear()  # the marking layout's default routes go too
        self.prefix_routes = want
        if not (added or deleted):
            return []
        return [f"routes in table {self.table} dev {self.ifname}: add {added}, delete {deleted}"]

    async def teardown(self, remove_link: bool = False) -> None:
        self.calls.append(("teardown", remove_link))
        self._maybe_fail("teardown")
        self.rules.clear()
        self.routes.clear()
        self.prefix_routes = {4: set(), 6: set()}
        self.addresses.clear()
        if remove_link:
            self.link_exists, self.link_mtu, self.link_up = False, None, False

    @property
    def healthy(self) -> bool:
        """Everything a full reconcile installs is present."""
        return (
            self.link_exists
            and self.link_up
            and self.link_mtu == self.mtu
            and self.routes == (set() if self.by_routes else {INET, INET6})
            and self.rules == {INET, INET6}
        )


class FakeNftManager(_Failures):
    """The table as ``{set name: set of prefixes}`` (``None`` = no table); same change strings."""

    what = "nftables"

    def __init__(
        self,
        table_name: str = C.NFT_TABLE,
        *,
        netns: str | None = None,
        params: RulesetParams | None = None,
        **loose: Any,
    ) -> None:
        super().__init__()
        self.params = params or RulesetParams.of(table_name, **loose)
        self.netns = netns
        self.sets: dict[str, set[IPNetwork]] | None = None
        self.transactions: list[Transaction] = []
        self.all_transactions: list[Transaction] = []
        self.calls: list[tuple[str, Any]] = []
        self.fail_diffs = 0  # how many upcoming diff transactions fail (drives the fallback)
        self.reads = 0  # how often the table was listed
        self._known: dict[str, set[IPNetwork]] | None = None  # as NftManager: what we last read/wrote

    @classmethod
    def from_config(cls, cfg: C.MeshConfig, *, netns: str | None = None) -> FakeNftManager:
        return cls(netns=netns, params=RulesetParams.from_config(cfg))

    @property
    def table(self) -> str:
        return self.params.table

    def remove_table(self) -> None:
        """Someone ran ``nft delete table``."""
        self.sets = None

    def _record(self, t: Transaction) -> None:
        self.transactions.append(t)
        self.all_transactions.append(t)

    async def read_sets(self) -> dict[str, list[IPNetwork]] | None:
        if self.sets is None:
            return None
        return {
            n: sorted(v, key=lambda x: (int(x.network_address), x.prefixlen)) for n, v in self.sets.items()
        }

    async def reconcile(
        self,
        desired_sets: Mapping[str, Iterable[Any]],
        *,
        trust_cache: bool = False,
        normalized: bool = False,
    ) -> list[str]:
        desired = normalize_desired(desired_sets)
        self.calls.append(("reconcile", {n: tuple(v) for n, v in desired.items()}))
        self.transactions = []
        self._maybe_fail("reconcile")
        try:
            if trust_cache and self._known is not None:
                changes = self._diff_known(desired)
                if changes is not None:
                    return changes
            self.reads += 1
            return self._reconcile_read(desired)
        finally:
            self._known = None if self.sets is None else {n: set(v) for n, v in self.sets.items()}

    def _diff_known(self, desired: Mapping[str, list[IPNetwork]]) -> list[str] | None:
        """The diff against what we last knew, applied as nft would (None: the transaction failed)."""
        assert self._known is not None
        diffs = diff_sets(self._known, desired)
        if not diffs:
            return []
        ok = self.sets is not None and all(
            set(d.delete) <= self.sets.get(name, set()) for name, d in diffs.items()
        )
        self._record(Transaction("diff", render_diff(self.table, diffs), ok))
        if not ok or self.sets is None:
            return None
        for name, d in diffs.items():
            s = self.sets.setdefault(name, set())
            s.difference_update(d.delete)
            s.update(d.add)
        return [f"nft set {name}: add {len(d.add)}, delete {len(d.delete)}" for name, d in diffs.items()]

    def _reconcile_read(self, desired: Mapping[str, list[IPNetwork]]) -> list[str]:
        if self.sets is None:
            self._record(Transaction("create", render_replace(self.params, desired), True))
            self.sets = {n: set(v) for n, v in desired.items()}
            return [f"nft table {FAMILY} {self.table}: created"]
        diffs = diff_sets(self.sets, desired)
        if not diffs:
            return []
        if self.fail_diffs > 0:
            self.fail_diffs -= 1
            err = NftError("nft transaction (diff) failed", stderr="Error: injected by FakeNftManager")
            self._record(Transaction("diff", render_diff(self.table, diffs), False, str(err)))
            self._record(Transaction("flush", {"nftables": []}, True))
            for name in diffs:
                self.sets[name] = set(desired[name])
            return [f"nft set {name}: flushed and re-added {len(desired[name])}" for name in diffs]
        self._record(Transaction("diff", render_diff(self.table, diffs), True))
        for name, d in diffs.items():
            s = self.sets.setdefault(name, set())
            s.difference_update(d.delete)
            s.update(d.add)
        return [f"nft set {name}: add {len(d.add)}, delete {len(d.delete)}" for name, d in diffs.items()]

    async def teardown(self) -> None:
        self.calls.append(("teardown", None))
        self._maybe_fail("teardown")
        self.sets = None
        self._known = None


__all__ = ["SET_IPV4", "SET_IPV6", "FakeLinkManager", "FakeNftManager"]
