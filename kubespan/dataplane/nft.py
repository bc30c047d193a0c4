"""The mesh's nftables table, through nft's official JSON interface (``nft -j -f -``).

One dedicated ``inet`` table (default ``kubespan``) holds:

- two **named interval sets**, ``targets_ipv4`` and ``targets_ipv6``: the
  destinations that must go through the mesh;
- chain ``prerouting`` (filter, hook prerouting, priority 0) and chain
  ``output`` (type **route**, hook output, priority 0, so the kernel re-routes
  after the mark changes), with Talos' semantics: a packet whose mark has the
  WireGuard bit (``mark & 0x60 == 0x20``) is accepted untouched; ``oifname lo``
  is accepted (output only); a TCP SYN to a target gets its MSS clamped down to
  MTU-52 (IPv4) / MTU-72 (IPv6) (output only); a packet to a target gets
  ``mark = (mark & ~0x60) | 0x40`` and is accepted. Only the mask bits are
  ever changed;
- chain ``forward`` (filter, hook forward, priority mangle) clamping the MSS of
  forwarded TCP SYNs leaving through the mesh link (Talos does not; optional).

Every rule carries a comment ``kubespan:<chain>:<what> <hash>`` where the hash
covers the rule's own JSON, so a reconcile can tell from one ``nft -j list
table`` whether the live structure is exactly what this configuration renders
(also across restarts and configuration changes) without re-sending it.

Each reconcile reads the table and then writes at most one transaction:

1. table missing, or its sets/chains/rules differ from the rendering -> one
   transaction that (re)creates the whole table with its elements;
2. otherwise the set elements are diffed (desired prefixes are collapsed
   first, since an overlapping add fails) and sent as deletes + adds in one
   transaction;
3. if that fails (drift between read and write, an overlap) -> ``flush set`` +
   re-add everything for the changed sets, in one transaction;
4. if that fails too -> the full re-create of step 1.

Nothing is written when nothing changed. The rendering and parsing functions
are pure and unit-tested; :class:`NftManager` is the thin edge that runs the
commands: in this process through libnftables (the library the ``nft`` command
is built on, same commands, same JSON, same error text) when it is installed
and no namespace or runner is given, which saves a fork and exec of ``nft``
(10-20 ms) per command; otherwise as ``nft`` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from kubespan import constants as C
from kubespan.ipset import IPSet, canonical_network, range_to_prefixes
from spanutil.ipcodec import IPNetwork

log = logging.getLogger("kubespan.dataplane.nft")

Runner = Callable[[Sequence[str], bytes | None, float], Awaitable[tuple[int, bytes, bytes]]]

FAMILY = "inet"
SET_IPV4 = "targets_ipv4"
SET_IPV6 = "targets_ipv6"
SET_VERSIONS = {SET_IPV4: 4, SET_IPV6: 6}
SET_TYPES = {SET_IPV4: "ipv4_addr", SET_IPV6: "ipv6_addr"}
SET_FLAGS = ("interval",)
CHAIN_PREROUTING = "prerouting"
CHAIN_OUTPUT = "output"
CHAIN_FORWARD = "forward"
PRIO_FILTER = 0
PRIO_MANGLE = -150
DEFAULT_TIMEOUT = 10.0
COMMENT_PREFIX = "kubespan:"


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


# --- Rendering -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RulesetParams:
    """Everything the ruleset depends on (set elements aside)."""

    table: str = C.NFT_TABLE
    ifname: str = C.LINK_NAME
    mtu: int = C.MTU
    fwmark_wireguard: int = C.FWMARK_WIREGUARD
    fwmark_force: int = C.FWMARK_FORCE
    fwmark_mask: int = C.FWMARK_MASK
    clamp_forwarded_mss: bool = True

    def __post_init__(self) -> None:
        # Reuse MeshConfig's validation (names the field and the limit).
        C.MeshConfig(
            link_name=self.ifname,
            mtu=self.mtu,
            fwmark_wireguard=self.fwmark_wireguard,
            fwmark_force=self.fwmark_force,
            fwmark_mask=self.fwmark_mask,
            nft_table=self.table,
        )

    @classmethod
    def from_config(cls, cfg: C.MeshConfig) -> RulesetParams:
        return cls(
            table=cfg.nft_table,
            ifname=cfg.link_name,
            mtu=cfg.mtu,
            fwmark_wireguard=cfg.fwmark_wireguard,
            fwmark_force=cfg.fwmark_force,
            fwmark_mask=cfg.fwmark_mask,
            clamp_forwarded_mss=cfg.clamp_forwarded_mss,
        )

    @property
    def mss_ipv4(self) -> int:
        return self.mtu - C.MSS_OVERHEAD_IPV4

    @property
    def mss_ipv6(self) -> int:
        return self.mtu - C.MSS_OVERHEAD_IPV6

    @property
    def mark_clear(self) -> int:
        return ~self.fwmark_mask & C.FWMARK_MAX


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


_MSS = {"tcp option": {"name": "maxseg", "field": "size"}}
_ACCEPT = {"accept": None}


def _daddr_in(version: int) -> dict[str, Any]:
    proto = "ip" if version == 4 else "ip6"
    name = SET_IPV4 if version == 4 else SET_IPV6
    return _match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{name}")


def _wg_accept(p: RulesetParams) -> list[dict[str, Any]]:
    return [_match({"&": [_meta("mark"), p.fwmark_mask]}, p.fwmark_wireguard), _ACCEPT]


def _set_mark(p: RulesetParams) -> list[dict[str, Any]]:
    value = {"|": [{"&": [_meta("mark"), p.mark_clear]}, p.fwmark_force]}
    return [{"mangle": {"key": _meta("mark"), "value": value}}, _ACCEPT]


def _clamp(mss: int) -> list[dict[str, Any]]:
    """TCP SYN (not RST) with an MSS above ``mss`` -> MSS ``mss`` (never raises a smaller one)."""
    return [
        _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]}, "syn"),
        _match(_MSS, mss, ">"),
        {"mangle": {"key": _MSS, "value": mss}},
    ]


@dataclass(frozen=True, slots=True)
class ChainSpec:
    name: str
    type: str
    hook: str
    prio: int
    rules: tuple[tuple[str, tuple[dict[str, Any], ...]], ...]  # (what, expr)


def _rules(*items: tuple[str, list[dict[str, Any]]]) -> tuple[tuple[str, tuple[dict[str, Any], ...]], ...]:
    return tuple((what, tuple(expr)) for what, expr in items)


def chain_specs(p: RulesetParams) -> list[ChainSpec]:
    chains = [
        ChainSpec(
            CHAIN_PREROUTING,
            "filter",
            "prerouting",
            PRIO_FILTER,
            _rules(
                ("wireguard", _wg_accept(p)),
                ("mark-ipv4", [_daddr_in(4), *_set_mark(p)]),
                ("mark-ipv6", [_daddr_in(6), *_set_mark(p)]),
            ),
        ),
        ChainSpec(
            CHAIN_OUTPUT,
            "route",
            "output",
            PRIO_FILTER,
            _rules(
                ("wireguard", _wg_accept(p)),
                ("loopback", [_match(_meta("oifname"), "lo"), _ACCEPT]),
                ("mss-ipv4", [_daddr_in(4), *_clamp(p.mss_ipv4)]),
                ("mss-ipv6", [_daddr_in(6), *_clamp(p.mss_ipv6)]),
                ("mark-ipv4", [_daddr_in(4), *_set_mark(p)]),
                ("mark-ipv6", [_daddr_in(6), *_set_mark(p)]),
            ),
        ),
    ]
    if p.clamp_forwarded_mss:
        oif = _match(_meta("oifname"), p.ifname)
        chains.append(
            ChainSpec(
                CHAIN_FORWARD,
                "filter",
                "forward",
                PRIO_MANGLE,
                _rules(
                    ("mss-ipv4", [oif, _match(_meta("nfproto"), "ipv4"), *_clamp(p.mss_ipv4)]),
                    ("mss-ipv6", [oif, _match(_meta("nfproto"), "ipv6"), *_clamp(p.mss_ipv6)]),
                ),
            )
        )
    return chains


def rule_comment(chain: str, what: str, expr: Sequence[dict[str, Any]]) -> str:
    digest = hashlib.sha256(json.dumps([chain, list(expr)], sort_keys=True).encode()).hexdigest()[:12]
    return f"{COMMENT_PREFIX}{chain}:{what} {digest}"


def element_json(net: IPNetwork) -> str | dict[str, Any]:
    """A set element: a bare address for a host prefix, else ``{"prefix": ...}`` (never a CIDR string,
    which nft would take for a host name)."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set_ref(table: str, name: str) -> dict[str, Any]:
    return {"family": FAMILY, "table": table, "name": name}


def _elements_cmd(op: str, table: str, name: str, nets: Iterable[IPNetwork]) -> dict[str, Any]:
    return {op: {"element": {**_set_ref(table, name), "elem": [element_json(n) for n in nets]}}}


def render_structure(p: RulesetParams) -> list[dict[str, Any]]:
    """Commands that add the sets, chains and rules (the table must exist)."""
    cmds: list[dict[str, Any]] = []
    for name in (SET_IPV4, SET_IPV6):
        cmds.append(
            {"add": {"set": {**_set_ref(p.table, name), "type": SET_TYPES[name], "flags": list(SET_FLAGS)}}}
        )
    for ch in chain_specs(p):
        cmds.append(
            {
                "add": {
                    "chain": {
                        "family": FAMILY,
                        "table": p.table,
                        "name": ch.name,
                        "type": ch.type,
                        "hook": ch.hook,
                        "prio": ch.prio,
                        "policy": "accept",
                    }
                }
            }
        )
        for what, expr in ch.rules:
            cmds.append(
                {
                    "add": {
                        "rule": {
                            "family": FAMILY,
                            "table": p.table,
                            "chain": ch.name,
                            "comment": rule_comment(ch.name, what, expr),
                            "expr": list(expr),
                        }
                    }
                }
            )
    return cmds


def render_replace(p: RulesetParams, elements: Mapping[str, Sequence[IPNetwork]]) -> dict[str, Any]:
    """One transaction that (re)creates the whole table with these elements.

    ``add table; delete table; add table`` works whether or not the table exists.
    """
    table = {"table": {"family": FAMILY, "name": p.table}}
    cmds: list[dict[str, Any]] = [{"add": table}, {"delete": table}, {"add": table}]
    cmds += render_structure(p)
    for name in (SET_IPV4, SET_IPV6):
        if elements.get(name):
            cmds.append(_elements_cmd("add", p.table, name, elements[name]))
    return {"nftables": cmds}


def render_delete_table(table: str) -> dict[str, Any]:
    """Idempotent delete (``add`` first, so a missing table is not an error)."""
    t = {"table": {"family": FAMILY, "name": table}}
    return {"nftables": [{"add": t}, {"delete": t}]}


@dataclass(frozen=True, slots=True)
class SetDiff:
    add: tuple[IPNetwork, ...] = ()
    delete: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)


def diff_sets(
    live: Mapping[str, Iterable[IPNetwork]], desired: Mapping[str, Iterable[IPNetwork]]
) -> dict[str, SetDiff]:
    """Per set: exact elements to delete and to add (only sets that differ)."""
    out: dict[str, SetDiff] = {}
    for name in sorted(set(live) | set(desired)):
        have_items = list(live.get(name, ()))
        want_items = list(desired.get(name, ()))
        if have_items == want_items:  # the usual case, and cheap: shared objects compare by identity
            continue
        # a few elements changed: compare only between the common head and tail (the lists hold
        # no duplicates, and mostly the same objects in the same order)
        head, end_have, end_want = 0, len(have_items), len(want_items)
        while head < min(end_have, end_want) and have_items[head] is want_items[head]:
            head += 1
        while end_have > head and end_want > head and have_items[end_have - 1] is want_items[end_want - 1]:
            end_have -= 1
            end_want -= 1
        have = set(have_items[head:end_have])
        want = set(want_items[head:end_want])
        if have != want:
            out[name] = SetDiff(add=tuple(_sorted(want - have)), delete=tuple(_sorted(have - want)))
    return out


def _sorted(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


def render_diff(table: str, diffs: Mapping[str, SetDiff]) -> dict[str, Any]:
    """Deletes before adds (so a replacing, overlapping prefix can go in), one transaction."""
    cmds = [_elements_cmd("delete", table, n, d.delete) for n, d in diffs.items() if d.delete]
    cmds += [_elements_cmd("add", table, n, d.add) for n, d in diffs.items() if d.add]
    return {"nftables": cmds}


def render_flush_readd(
    table: str, desired: Mapping[str, Sequence[IPNetwork]], names: Iterable[str]
) -> dict[str, Any]:
    cmds: list[dict[str, Any]] = []
    for name in names:
        cmds.append({"flush": {"set": _set_ref(table, name)}})
        if desired.get(name):
            cmds.append(_elements_cmd("add", table, name, desired[name]))
    return {"nftables": cmds}


def normalize_desired(desired_sets: Mapping[str, Iterable[Any]]) -> dict[str, list[IPNetwork]]:
    """Validate set names and families, collapse overlapping/adjacent prefixes (minimal cover)."""
    out: dict[str, list[IPNetwork]] = {name: [] for name in SET_VERSIONS}
    for name, items in desired_sets.items():
        if name not in SET_VERSIONS:
            raise ValueError(f"unknown nftables set {name!r} (known: {', '.join(SET_VERSIONS)})")
        version = SET_VERSIONS[name]
        nets = []
        for item in items:
            net = (
                item
                if isinstance(item, IPv4Network | IPv6Network)
                else ipaddress.ip_network(item, strict=False)
            )
            if net.version != version:
                raise ValueError(f"set {name}: {net} is not an IPv{version} prefix")
            nets.append(net)
        out[name] = IPSet(nets).prefixes(version)  # type: ignore[assignment]
    return out


def targets(prefixes: Iterable[Any]) -> dict[str, list[IPNetwork]]:
    """Split mixed-family prefixes into the ``{set name: prefixes}`` that :meth:`NftManager.reconcile` takes."""
    out: dict[str, list[IPNetwork]] = {SET_IPV4: [], SET_IPV6: []}
    for item in prefixes:
        net = (
            item if isinstance(item, IPv4Network | IPv6Network) else ipaddress.ip_network(item, strict=False)
        )
        out[SET_IPV4 if net.version == 4 else SET_IPV6].append(net)
    return out


# --- Parsing ``nft -j list table`` -----------------------------------------------------------------


@dataclass(slots=True)
class LiveTable:
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"type", "flags"}
    elements: dict[str, list[IPNetwork]] = field(default_factory=dict)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"type","hook","prio","policy"}
    rules: dict[str, list[str | None]] = field(default_factory=dict)  # chain -> [comment]


# Listed elements parsed before, by their text: every reconcile lists the same elements, and
# parsing an address with ipaddress costs microseconds. The objects are the shared ones of
# kubespan.ipset, so an unchanged listing compares with the desired prefixes by identity.
_ELEMENTS_MAX = 1 << 15
_elements: dict[str, IPNetwork] = {}


def _element(text: str) -> IPNetwork:
    net = _elements.get(text)
    if net is None:
        net = canonical_network(ipaddress.ip_network(text))
        if len(_elements) >= _ELEMENTS_MAX:
            _elements.clear()
        _elements[text] = net
    return net


def parse_element(elem: Any, version: int) -> list[IPNetwork]:
    """One element of an interval set as listed by nft: address, prefix or range."""
    if isinstance(elem, dict) and "elem" in elem:  # element with options (timeout, counter, ...)
        return parse_element(elem["elem"].get("val"), version)
    if isinstance(elem, str):
        return [_element(elem)]
    if isinstance(elem, dict) and "prefix" in elem:
        pfx = elem["prefix"]
        return [_element(f"{pfx['addr']}/{pfx['len']}")]
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(x) for x in elem["range"])
        return list(range_to_prefixes(int(lo), int(hi), version))
    raise ValueError(f"unexpected nftables set element {elem!r}")


def parse_table(listing: Mapping[str, Any], table: str) -> LiveTable:
    live = LiveTable()
    for obj in listing.get("nftables", []):
        if "set" in obj:
            s = obj["set"]
            if s.get("table") != table or s.get("family") != FAMILY:
                continue
            name = s["name"]
            live.sets[name] = {"type": s.get("type"), "flags": sorted(s.get("flags", []))}
            version = 6 if s.get("type") == "ipv6_addr" else 4
            nets: list[IPNetwork] = []
            for e in s.get("elem", []):
                nets.extend(parse_element(e, version))
            live.elements[name] = nets
        elif "chain" in obj:
            c = obj["chain"]
            if c.get("table") != table or c.get("family") != FAMILY:
                continue
            live.chains[c["name"]] = {k: c.get(k) for k in ("type", "hook", "prio", "policy")}
            live.rules.setdefault(c["name"], [])
        elif "rule" in obj:
            r = obj["rule"]
            if r.get("table") != table or r.get("family") != FAMILY:
                continue
            live.rules.setdefault(r["chain"], []).append(r.get("comment"))
    return live


def structure_mismatch(live: LiveTable, p: RulesetParams) -> str | None:
    """Why the live table is not what ``p`` renders (``None`` when it is)."""
    want_sets = {n: {"type": SET_TYPES[n], "flags": sorted(SET_FLAGS)} for n in SET_VERSIONS}
    if live.sets != want_sets:
        return f"sets differ (have {sorted(live.sets)})"
    specs = chain_specs(p)
    want_chains = {
        ch.name: {"type": ch.type, "hook": ch.hook, "prio": ch.prio, "policy": "accept"} for ch in specs
    }
    if live.chains != want_chains:
        return f"chains differ (have {sorted(live.chains)})"
    for ch in specs:
        want = [rule_comment(ch.name, what, expr) for what, expr in ch.rules]
        if live.rules.get(ch.name, []) != want:
            return f"rules of chain {ch.name} differ"
    return None


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


class LibNftables:
    """``nft -j ...`` commands run by libnftables in this process (one context, one at a time).

    The context (and its netlink socket) is created at the first command, in the network
    namespace the process is in then. Commands run in a worker thread (ctypes releases the GIL).
    """

    _JSON_OUTPUT = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> LibNftables | None:
        """None when libnftables is missing or ``KUBESPAN_NFT_EXEC=1`` asks for the ``nft`` command."""
        if os.environ.get("KUBESPAN_NFT_EXEC") == "1":
            return None
        # the soname first: find_library runs ldconfig (a fork and exec) and is only the fallback
        for find in (lambda: "libnftables.so.1", lambda: ctypes.util.find_library("nftables")):
            name = find()
            if not name:
                continue
            try:
                return cls(ctypes.CDLL(name))
            except (OSError, AttributeError):
                continue
        return None

    def run(self, args: Sequence[str], stdin: bytes | None) -> tuple[int, bytes, bytes]:
        """``args`` as given to ``nft`` (``-j`` first): ``-j -f -`` runs ``stdin``, else the command words."""
        if list(args[:1]) != ["-j"]:
            raise ValueError(f"only JSON commands run in-process, not {list(args)}")
        rest = list(args[1:])
        buf = (stdin or b"") if rest == ["-f", "-"] else " ".join(rest).encode()
        with self._lock:
            if self._ctx is None:
                ctx = self._lib.nft_ctx_new(0)
                if not ctx:
                    raise OSError("nft_ctx_new failed")
                self._lib.nft_ctx_output_set_flags(ctx, self._JSON_OUTPUT)
                self._lib.nft_ctx_buffer_output(ctx)
                self._lib.nft_ctx_buffer_error(ctx)
                self._ctx = ctx
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, buf)
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return (0 if rc == 0 else 1), out, err


_libnft: LibNftables | None = None
_libnft_loaded = False


def libnftables() -> LibNftables | None:
    """The process's shared :class:`LibNftables` (None: not available)."""
    global _libnft, _libnft_loaded
    if not _libnft_loaded:
        _libnft, _libnft_loaded = LibNftables.load(), True
    return _libnft


@dataclass(frozen=True, slots=True)
class Transaction:
    """One ``nft -j -f -`` document sent, and what became of it."""

    kind: str  # "create", "replace", "diff", "flush", "teardown"
    document: dict[str, Any]
    ok: bool
    error: str | None = None


class NftManager:
    """The mesh's nftables table: created when missing, sets kept equal to the desired prefixes."""

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
        nft: str = "nft",
        timeout: float = DEFAULT_TIMEOUT,
        runner: Runner | None = None,
    ) -> None:
        self.params = RulesetParams(
            table=table_name,
            ifname=ifname,
            mtu=mtu,
            fwmark_wireguard=fwmark_wireguard,
            fwmark_force=fwmark_force,
            fwmark_mask=fwmark_mask,
            clamp_forwarded_mss=clamp_forwarded_mss,
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
        args = asdict(RulesetParams.from_config(cfg))
        return cls(args.pop("table"), netns=netns, **args, **kw)

    @property
    def table(self) -> str:
        return self.params.table

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
