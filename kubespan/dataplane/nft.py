"""The mesh's nftables table kept in line: :class:`NftManager`, through nft's JSON interface.

The ruleset and its set diffs are rendered by :mod:`kubespan.dataplane.ruleset`. Each reconcile
reads the table and then writes at most one transaction:

1. table missing, or its sets/chains/rules differ from the rendering -> one
   transaction that (re)creates the whole table with its elements;
2. otherwise the set elements are diffed (desired prefixes are collapsed
   first, since an overlapping add fails) and sent as deletes + adds in one
   transaction;
3. if that fails (drift between read and write, an overlap) -> ``flush set`` +
   re-add everything for the changed sets, in one transaction;
4. if that fails too -> the full re-create of step 1.

Nothing is written when nothing changed. Commands run in this process through
:mod:`kubespan.dataplane.libnftables` when it is installed and no namespace or runner is
given; otherwise as ``nft`` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubespan import constants as C
from kubespan.dataplane.libnftables import libnftables
from kubespan.dataplane.ruleset import (
    FAMILY,
    SET_VERSIONS,
    LiveTable,
    RulesetParams,
    diff_sets,
    normalize_desired,
    parse_table,
    render_delete_table,
    render_diff,
    render_flush_readd,
    render_replace,
    structure_mismatch,
)
from spanutil.ipcodec import IPNetwork

log = logging.getLogger("kubespan.dataplane.nft")

Runner = Callable[[Sequence[str], bytes | None, float], Awaitable[tuple[int, bytes, bytes]]]

DEFAULT_TIMEOUT = 10.0


class NftError(RuntimeError):
    """``nft`` failed; carries the command, its exit status and its stderr."""

    def __init__(
        self, message: str, *, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = ""
    ) -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{message}{detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


# --- Subprocess edge -------------------------------------------------------------------------------


async def run_subprocess(
    argv: Sequence[str], stdin: bytes | None, time_limit: float
) -> tuple[int, bytes, bytes]:
    """Run a command with a timeout; kill it when the timeout passes."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as e:
        raise NftError(f"{argv[0]} not found (install nftables/iproute2)", argv=argv) from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), time_limit)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await proc.wait()
        raise
    return proc.returncode or 0, out, err


@dataclass(frozen=True, slots=True)
class Transaction:
    """One ``nft -j -f -`` document sent, and what became of it."""

    kind: str  # "create", "replace", "diff", "flush", "teardown"
    document: dict[str, Any]
    ok: bool
    error: str | None = None


class NftManager:
    """The mesh's nftables table: created when missing, sets kept equal to the desired prefixes."""

    what = "nftables"

    def __init__(
        self,
        table_name: str = C.NFT_TABLE,
        *,
        netns: str | None = None,
        ifname: str = C.LINK_NAME,
        mtu: int = C.MTU,
        fwmark_wireguard: int = C.FWMARK_WIREGUARD,
        fwmark_force: int = C.FWMARK_FORCE,
        fwmark_mask: int = C.FWMARK_MASK,
        clamp_forwarded_mss: bool = True,
        steering: str = C.STEERING_MARKS,
        nft: str = "nft",
        timeout: float = DEFAULT_TIMEOUT,
        runner: Runner | None = None,
        params: RulesetParams | None = None,
    ) -> None:
        # ``params`` (from_config: a checked MeshConfig) replaces the loose values, checked otherwise
        self.params = params or RulesetParams.of(
            table_name,
            ifname=ifname,
            mtu=mtu,
            fwmark_wireguard=fwmark_wireguard,
            fwmark_force=fwmark_force,
            fwmark_mask=fwmark_mask,
            clamp_forwarded_mss=clamp_forwarded_mss,
            steering=steering,
        )
        self.netns = netns
        self.nft = nft
        self.timeout = timeout
        self._runner = runner or run_subprocess
        # in-process libnftables for the plain case (no namespace to enter, no runner to honour)
        self._lib = libnftables() if runner is None and netns is None and nft == "nft" else None
        self._lock = asyncio.Lock()
        # the documents sent by the last reconcile/teardown (tests and debugging read these)
        self.transactions: list[Transaction] = []
        self._normalized: tuple[dict[str, list[Any]], dict[str, list[IPNetwork]]] | None = None
        # The set elements as of our last successful read or write of a table whose structure
        # matched (None: unknown). Only ``reconcile(trust_cache=True)`` uses it instead of a read.
        self._known: dict[str, list[IPNetwork]] | None = None

    @classmethod
    def from_config(cls, cfg: C.MeshConfig, *, netns: str | None = None, **kw: Any) -> NftManager:
        return cls(netns=netns, params=RulesetParams.from_config(cfg), **kw)

    @property
    def table(self) -> str:
        return self.params.table

    @property
    def in_process(self) -> bool:
        """Whether commands run in this process (libnftables), not as ``nft`` subprocesses."""
        return self._lib is not None

    def argv(self, *args: str) -> list[str]:
        """The command line for ``nft args``, inside the namespace when one is set."""
        base = [self.nft, *args]
        if self.netns is None:
            return base
        return ["ip", "netns", "exec", self.netns, *base]

    async def _nft(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        argv = self.argv(*args)
        try:
            if self._lib is not None:
                rc, out, err = await asyncio.wait_for(
                    asyncio.to_thread(self._lib.run, args, stdin), self.timeout
                )
            else:
                rc, out, err = await self._runner(argv, stdin, self.timeout)
        except TimeoutError as e:
            raise NftError(f"{' '.join(argv)} timed out after {self.timeout}s", argv=argv) from e
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    async def _list(self) -> LiveTable | None:
        """The live table, or ``None`` when it does not exist."""
        rc, out, err = await self._nft("-j", "list", "table", FAMILY, self.table)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(
                f"nft list table {FAMILY} {self.table} failed", argv=self.argv(), returncode=rc, stderr=err
            )
        try:
            return parse_table(json.loads(out), self.table)
        except (ValueError, KeyError, TypeError) as e:
            raise NftError(f"cannot parse nft -j output: {e}") from e

    async def _apply(self, kind: str, document: dict[str, Any]) -> NftError | None:
        """Send one transaction; return the error instead of raising (callers decide)."""
        payload = json.dumps(document, separators=(",", ":")).encode()
        rc, _out, err = await self._nft("-j", "-f", "-", stdin=payload)
        if rc != 0:
            error = NftError(
                f"nft transaction ({kind}) failed", argv=self.argv("-j", "-f", "-"), returncode=rc, stderr=err
            )
            self.transactions.append(Transaction(kind, document, False, str(error)))
            log.warning("%s", error)
            return error
        self.transactions.append(Transaction(kind, document, True))
        return None

    async def read_sets(self) -> dict[str, list[IPNetwork]] | None:
        """The live set elements (``None`` when the table is missing)."""
        live = await self._list()
        return None if live is None else {n: list(v) for n, v in live.elements.items()}

    async def reconcile(
        self,
        desired_sets: Mapping[str, Iterable[Any]],
        *,
        trust_cache: bool = False,
        normalized: bool = False,
    ) -> list[str]:
        """Make the table and its sets match; return the changes made (empty: nothing written).

        ``desired_sets`` maps set names (``targets_ipv4``, ``targets_ipv6``; see
        :func:`targets`) to prefixes; a missing name means an empty set.

        With ``trust_cache`` the table is not read when an earlier reconcile of this manager
        read or wrote it successfully: the difference to what it held then is sent, and only
        when that transaction fails is the table read and repaired as usual. For callers that
        know nothing else changed the table since (and check it with a plain reconcile now and
        then). ``normalized`` promises that every set is already a sorted minimal prefix cover
        of the right family (as :func:`normalize_desired` returns), which skips that step.
        """
        desired = self._given(desired_sets) if normalized else self._normalize(desired_sets)
        async with self._lock:
            self.transactions = []
            known = self._known
            if trust_cache and known is not None:
                diffs = diff_sets(known, desired)
                if not diffs:
                    return []
                changes = [
                    f"nft set {name}: add {len(d.add)}, delete {len(d.delete)}" for name, d in diffs.items()
                ]
                if await self._apply("diff", render_diff(self.table, diffs)) is None:
                    self._known = desired
                    self._log(changes)
                    return changes
                self._known = None  # changed behind our back: read it (below)
            live = await self._list()
            self._known = None
            if live is None:
                return await self._replace("create", desired, f"nft table {FAMILY} {self.table}: created")
            reason = structure_mismatch(live, self.params)
            if reason is not None:
                return await self._replace(
                    "replace", desired, f"nft table {FAMILY} {self.table}: replaced ({reason})"
                )
            diffs = diff_sets(live.elements, desired)
            if not diffs:
                self._known = live.elements
                return []
            changes = [
                f"nft set {name}: add {len(d.add)}, delete {len(d.delete)}" for name, d in diffs.items()
            ]
            error = await self._apply("diff", render_diff(self.table, diffs))
            if error is None:
                self._known = desired
                self._log(changes)
                return changes
            error = await self._apply("flush", render_flush_readd(self.table, desired, diffs))
            if error is None:
                self._known = desired
                changes = [f"nft set {name}: flushed and re-added {len(desired[name])}" for name in diffs]
                self._log(changes)
                return changes
            return await self._replace(
                "replace", desired, f"nft table {FAMILY} {self.table}: replaced (set update failed)"
            )

    def _normalize(self, desired_sets: Mapping[str, Iterable[Any]]) -> dict[str, list[IPNetwork]]:
        """:func:`normalize_desired`, reusing the last result when the input lists are equal
        (cheap when they hold the same objects, as the engine's do between passes)."""
        given = {name: list(items) for name, items in desired_sets.items()}
        if self._normalized is not None and self._normalized[0] == given:
            return self._normalized[1]
        desired = normalize_desired(given)
        self._normalized = (given, desired)
        return desired

    @staticmethod
    def _given(desired_sets: Mapping[str, Iterable[Any]]) -> dict[str, list[IPNetwork]]:
        """Already normalized sets, only checked for their names."""
        out: dict[str, list[IPNetwork]] = {name: [] for name in SET_VERSIONS}
        for name, items in desired_sets.items():
            if name not in SET_VERSIONS:
                raise ValueError(f"unknown nftables set {name!r} (known: {', '.join(SET_VERSIONS)})")
            out[name] = list(items)
        return out

    async def _replace(self, kind: str, desired: Mapping[str, Sequence[IPNetwork]], change: str) -> list[str]:
        error = await self._apply(kind, render_replace(self.params, desired))
        if error is not None:
            raise error
        self._known = dict(desired)
        self._log([change])
        return [change]

    async def teardown(self) -> None:
        """Delete the table (idempotent)."""
        async with self._lock:
            self.transactions = []
            self._known = None
            error = await self._apply("teardown", render_delete_table(self.table))
            if error is not None:
                raise error

    def _log(self, changes: list[str]) -> None:
        for c in changes:
            log.info("dataplane change: %s", c)
