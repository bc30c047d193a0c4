"""KubeSpan defaults and the validated mesh configuration.

Every default matches Talos (``pkg/machinery/constants`` and the KubeSpan
adapters) so that our node and a Talos node agree on the wire and in the
kernel; every value is configurable through :class:`MeshConfig`.

WireGuard protocol timers (``WG_*``) are facts of the protocol (the
WireGuard paper, section 6; ``messages.h`` in the Linux module) and are not
configurable: they are what the endpoint state machine reasons about.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

# --- Link and WireGuard device -------------------------------------------------------------------

LINK_NAME = "kubespan"
LINK_NAME_MAX = 15  # IFNAMSIZ - 1
LISTEN_PORT = 51820
MTU = 1420
MTU_MIN = 1280  # the IPv6 minimum link MTU; Talos' KubeSpanLinkMinimumMTU
# WireGuard's own per-packet overhead (outer IPv6 40 + UDP 8 + data header 16 + tag 16); the Linux
# module caps the device MTU at 65535 minus this.
WG_OVERHEAD = 80
MTU_MAX = 65535 - WG_OVERHEAD
PERSISTENT_KEEPALIVE = 25  # seconds
KEEPALIVE_MAX = 65535  # WireGuard stores the interval as u16 seconds; 0 disables it

# --- Policy routing ------------------------------------------------------------------------------

ROUTING_TABLE = 180
RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
TABLE_MAX = 2**32 - 1
RULE_PRIORITY = 32500
RULE_PRIORITY_MIN = 1  # priority 0 is the kernel's "lookup local" rule
RULE_PRIORITY_MAX = 32765  # must come before "lookup main" (32766) to take effect
ROUTE_METRIC = 1

# --- Firewall marks ------------------------------------------------------------------------------

FWMARK_WIREGUARD = 0x20  # set on WireGuard's own (encrypted) UDP packets
FWMARK_FORCE = 0x40  # "send this through the mesh"
FWMARK_MASK = 0x60  # only these bits are ever read or written
FWMARK_MAX = 2**32 - 1

# --- Steering: how traffic for the mesh finds the mesh link ---------------------------------------
# "marks" (Talos's layout): nftables marks packets to a peer's prefixes with fwmark_force and a rule
# sends marked packets to the routing table, whose default route is the link. "routes" (Tailscale's
# layout): no nftables on the path; one rule sends everything but WireGuard's own packets to the
# table, which holds a route per peer prefix (a miss falls through to main). docs/design/nft-ruleset.md
STEERING_MARKS = "marks"
STEERING_ROUTES = "routes"
STEERINGS = (STEERING_MARKS, STEERING_ROUTES)
MAIN_TABLE = 254

# --- nftables ------------------------------------------------------------------------------------

NFT_TABLE = "kubespan"  # a dedicated "inet" table (Talos shares "inet talos")
NFT_NAME_MAX = 64
# TCP MSS clamp: MTU minus IP header, TCP header and 12 bytes of options (Talos' arithmetic).
MSS_OVERHEAD_IPV4 = 20 + 20 + 12
MSS_OVERHEAD_IPV6 = 40 + 20 + 12

# --- Mesh addressing -----------------------------------------------------------------------------

ULA_PURPOSE_BOOTSTRAP = 0x01
ULA_PURPOSE_KUBESPAN = 0x02
ULA_PURPOSE_SIDEROLINK = 0x03
ULA_PURPOSE_VIRTUAL_SIDEROLINK = 0x04
MESH_PREFIX_LEN = 64
IDENTITY_FILE = "kubespan-identity.key"

# --- Discovery -----------------------------------------------------------------------------------

DISCOVERY_TTL = 30 * 60.0  # seconds

# --- WireGuard protocol timers (seconds) ---------------------------------------------------------

WG_REKEY_AFTER_TIME = 120.0  # initiator re-handshakes a session this old when it sends
WG_REJECT_AFTER_TIME = 180.0  # a session this old is dropped
WG_REKEY_TIMEOUT = 5.0  # an unanswered handshake initiation is retried after this
WG_REKEY_TIMEOUT_JITTER = 1.0 / 3.0  # ... plus up to this much random jitter
WG_REKEY_ATTEMPT_TIME = 90.0  # handshake retries stop after this
WG_KEEPALIVE_TIMEOUT = 10.0  # passive keepalive: data received, nothing sent back for this long
# A keepalive as the peer's tx/rx byte counters count it: a transport message without payload (16-byte
# header, 16-byte tag). Any data message is longer (its payload is padded to 16 bytes).
WG_KEEPALIVE_BYTES = 32

# --- Talos' KubeSpan timers, for comparison (seconds) --------------------------------------------

TALOS_ENDPOINT_CONNECTION_TIMEOUT = 15.0
TALOS_PEER_DOWN_INTERVAL = WG_REJECT_AFTER_TIME + WG_REKEY_TIMEOUT + WG_REKEY_ATTEMPT_TIME  # 275
TALOS_PEER_RECONCILE_INTERVAL = 30.0

# --- Our engine's timers (seconds) ---------------------------------------------------------------

POLL_INTERVAL = 1.0  # how often the engine reads WireGuard's peer counters
ACTIVE_POLL_INTERVAL = 0.25  # ... while a peer has traffic in flight (see DetectionTimings)
RECONCILE_INTERVAL = 2.0  # timer-driven reconcile (self-healing within 5 s)
# links, routes and rules are re-read this often while the netlink watch is subscribed, and the
# nftables table while its watch is too: they report every change from outside at once, so the 2 s
# re-read (5 netlink dumps, the table) is only a safety net then
WATCHED_CHECK_INTERVAL = 30.0
LEARNED_ENDPOINTS_MAX = 4  # roamed endpoints remembered (and published) per peer


class ConfigError(ValueError):
    """A configuration value is out of range; names the field and the limit.

    ``rule`` is the message without the field name (callers that know where the field was set, a
    YAML path or a command-line flag, put their own name in front). ``errors`` lists every problem
    the same check found, this one first, so a caller can report them all at once.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.rule = message
        self.errors: tuple[ConfigError, ...] = (self,)


_NFT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LINK_NAME_BAD = re.compile(r"[\s/:]")


@dataclass(frozen=True, slots=True)
class DetectionTimings:
    """Thresholds of the per-peer endpoint state machine (see ``kubespan.endpoints``)."""

    poll_interval: float = POLL_INTERVAL
    # While the peer's tx grows (something was sent since the last look), during an episode and
    # during a trial, the peer is observed this often: a stalled rx shows within two of these.
    # A device read, no packet; idle peers keep poll_interval (the smaller of the two applies).
    active_poll_interval: float = ACTIVE_POLL_INTERVAL
    # Awaiting a reply (we sent, nothing came back) for this long starts active probing.
    probe_after: float = 0.0
    # During an episode (and a fast trial) at most one probe per this interval: up to 5 probes a
    # second per peer, only while it owes us a reply.
    probe_interval: float = 0.2
    # A probe-answering peer is dead after this long without a reply and this many probes.
    # 5 probe round trips all lost at 5 % loss per packet and direction: 8.8e-6 per episode.
    dead_after: float = 1.0
    dead_min_probes: int = 5
    # Outside fast detection (a trial after the fast round, a peer not known to answer probes)
    # at most one probe per this.
    slow_probe_interval: float = 1.0
    # While it is unknown whether the peer answers probes, one calibration probe per this.
    calibrate_interval: float = 5.0
    # A peer that does not answer probes is dead after this long: two passive keepalives
    # (WG_KEEPALIVE_TIMEOUT each) plus WireGuard's own re-handshake, with slack.
    passive_dead_after: float = 2 * WG_KEEPALIVE_TIMEOUT + 3.0
    # A freshly chosen candidate gets this long to show a reply: one rate-limited handshake
    # initiation (REKEY_TIMEOUT + jitter) and one retransmission, plus a poll.
    trial_timeout: float = 2 * (WG_REKEY_TIMEOUT + WG_REKEY_TIMEOUT_JITTER) + 1.5
    # A peer never up: its candidates in private networks (LAN, CGNAT, loopback) get this long each in
    # the first sweep. On its own LAN a handshake answers within a round trip of the re-created peer's
    # initiation, and first contact re-creates at most retry + recheck (2 s) after the add; another
    # site's private address never answers, and a full trial each delayed the public ones behind it.
    private_trial_timeout: float = 3.0
    # After each full sweep of the candidates without success the trial time doubles up to this.
    trial_timeout_max: float = 60.0
    # A session older than this is dead even if bytes arrive (they can only be handshakes).
    # REJECT_AFTER_TIME + one keepalive interval (a responder re-handshakes only when it next
    # sends) + two handshake attempts.
    session_dead_after: float = WG_REJECT_AFTER_TIME + PERSISTENT_KEEPALIVE + 2 * WG_REKEY_TIMEOUT
    learned_max: int = LEARNED_ENDPOINTS_MAX

    def __post_init__(self) -> None:
        positive = (
            "poll_interval",
            "active_poll_interval",
            "probe_interval",
            "slow_probe_interval",
            "calibrate_interval",
            "dead_after",
            "passive_dead_after",
            "trial_timeout",
            "private_trial_timeout",
            "trial_timeout_max",
            "session_dead_after",
        )
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(name, f"{value!r} must be greater than 0")
        if not self.probe_after >= 0:
            raise ConfigError("probe_after", f"{self.probe_after!r} must be at least 0")
        if self.dead_min_probes < 1:
            raise ConfigError("dead_min_probes", f"{self.dead_min_probes} must be at least 1")
        if self.learned_max < 0:
            raise ConfigError("learned_max", f"{self.learned_max} must be at least 0")
        if self.dead_after > self.passive_dead_after:
            raise ConfigError(
                "dead_after",
                f"{self.dead_after} must not exceed passive_dead_after ({self.passive_dead_after})",
            )
        if self.trial_timeout > self.trial_timeout_max:
            raise ConfigError(
                "trial_timeout",
                f"{self.trial_timeout} must not exceed trial_timeout_max ({self.trial_timeout_max})",
            )
        if self.private_trial_timeout > self.trial_timeout:
            raise ConfigError(
                "private_trial_timeout",
                f"{self.private_trial_timeout} must not exceed trial_timeout ({self.trial_timeout})",
            )
        if self.session_dead_after <= WG_REJECT_AFTER_TIME:
            raise ConfigError(
                "session_dead_after",
                f"{self.session_dead_after} must exceed WireGuard's REJECT_AFTER_TIME ({WG_REJECT_AFTER_TIME})",
            )


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Everything about the local mesh that is configurable; defaults are Talos'."""

    link_name: str = LINK_NAME
    listen_port: int = LISTEN_PORT
    mtu: int = MTU
    persistent_keepalive: int = PERSISTENT_KEEPALIVE
    routing_table: int = ROUTING_TABLE
    rule_priority: int = RULE_PRIORITY
    fwmark_wireguard: int = FWMARK_WIREGUARD
    fwmark_force: int = FWMARK_FORCE
    fwmark_mask: int = FWMARK_MASK
    steering: str = STEERING_MARKS
    nft_table: str = NFT_TABLE
    # Talos' allowDownPeerBypass (fail open): only peers that are up are routed into the mesh;
    # traffic to a peer that is down or not connected yet (unknown) takes the normal routes.
    allow_down_peer_bypass: bool = False
    clamp_forwarded_mss: bool = True
    reconcile_interval: float = RECONCILE_INTERVAL
    timings: DetectionTimings = field(default_factory=DetectionTimings)

    def __post_init__(self) -> None:
        # The one validation of the mesh settings: the machine config, ``kubespan run`` and the
        # data-plane adapters' loose-value constructors all come through these rules, once.
        check_mesh_fields(**{name: getattr(self, name) for name in _CHECKED})

    @property
    def mss_ipv4(self) -> int:
        """TCP MSS clamp for IPv4 through the mesh."""
        return self.mtu - MSS_OVERHEAD_IPV4

    @property
    def mss_ipv6(self) -> int:
        """TCP MSS clamp for IPv6 through the mesh."""
        return self.mtu - MSS_OVERHEAD_IPV6

    @property
    def fwmark_clear(self) -> int:
        """AND-mask that clears our mark bits and keeps everyone else's."""
        return ~self.fwmark_mask & FWMARK_MAX

    def as_dict(self) -> dict[str, object]:
        """Plain values, for status output and logs (nothing here is secret)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DetectionTimings):
                out[f.name] = {t.name: getattr(value, t.name) for t in fields(value)}
            else:
                out[f.name] = value
        return out


# MeshConfig's checked fields in the order problems are reported; integers with their range.
_RANGES = {
    "listen_port": (1, 65535),
    "mtu": (MTU_MIN, MTU_MAX),
    "persistent_keepalive": (0, KEEPALIVE_MAX),
    "routing_table": (1, TABLE_MAX),
    "rule_priority": (RULE_PRIORITY_MIN, RULE_PRIORITY_MAX),
    "fwmark_mask": (1, FWMARK_MAX),
    "fwmark_wireguard": (1, FWMARK_MAX),
    "fwmark_force": (1, FWMARK_MAX),
}
_CHECKED = ("link_name", *_RANGES, "steering", "nft_table", "reconcile_interval")


def check_mesh_fields(**values: object) -> None:
    """Check the given MeshConfig fields by MeshConfig's rules; a rule that spans fields applies when
    they are all given. For MeshConfig itself and for adapters built from loose values rather than a
    MeshConfig (the link manager sets no WireGuard mark). Raises the first :class:`ConfigError`, with
    every problem in ``errors``."""
    errors = list(_mesh_problems(values))
    if errors:
        errors[0].errors = tuple(errors)
        raise errors[0]


def _mesh_problems(v: Mapping[str, object]) -> Iterator[ConfigError]:
    """Every rule the values in ``v`` break, in field order; a rule that spans fields runs only when
    the fields it reads are present and valid themselves."""
    if "link_name" in v and (problem := link_name_problem(v["link_name"])) is not None:
        yield ConfigError("link_name", problem)
    valid: dict[str, int] = {}
    for name, (low, high) in _RANGES.items():
        if name not in v:
            continue
        value = v[name]
        bad = list(_range(name, value, low, high))
        yield from bad
        if not bad and isinstance(value, int):
            valid[name] = value
            if name == "routing_table" and value in RESERVED_TABLES:
                yield ConfigError(name, f"{value} is reserved (reserved: {sorted(RESERVED_TABLES)})")
            mask = valid.get("fwmark_mask")
            if name in ("fwmark_wireguard", "fwmark_force") and mask is not None and value & ~mask:
                yield ConfigError(name, f"{value:#x} has bits outside fwmark_mask {mask:#x}")
    marks = (valid.get("fwmark_wireguard"), valid.get("fwmark_force"))
    if None not in marks and marks[0] == marks[1]:
        yield ConfigError("fwmark_force", f"{marks[1]:#x} must differ from fwmark_wireguard")
    steering = v.get("steering", STEERING_MARKS)
    if steering not in STEERINGS:
        yield ConfigError("steering", f"{steering!r} must be one of: {', '.join(STEERINGS)}")
    elif steering == STEERING_ROUTES and valid.get("rule_priority") == RULE_PRIORITY_MIN:
        # the WireGuard port's exemption rule sits one priority before ours
        yield ConfigError(
            "rule_priority", f"{RULE_PRIORITY_MIN} leaves no room for the exemption rule of steering 'routes'"
        )
    nft = v.get("nft_table", NFT_TABLE)
    if not isinstance(nft, str) or not _NFT_NAME.fullmatch(nft) or len(nft) > NFT_NAME_MAX:
        yield ConfigError(
            "nft_table",
            f"{nft!r} must be 1..{NFT_NAME_MAX} characters of [A-Za-z0-9_], not starting with a digit",
        )
    interval = v.get("reconcile_interval", RECONCILE_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        yield ConfigError("reconcile_interval", f"{interval!r} must be greater than 0")


def _range(name: str, value: object, low: int, high: int) -> Iterator[ConfigError]:
    """The problem with an integer field, if any: the message has the limit broken and the range."""
    if not isinstance(value, int) or isinstance(value, bool):
        yield ConfigError(name, f"{value!r} must be an integer between {low} and {high}")
    elif value < low:
        yield ConfigError(name, f"{value} is below the minimum {low}: must be between {low} and {high}")
    elif value > high:
        yield ConfigError(name, f"{value} is above the maximum {high}: must be between {low} and {high}")


def link_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be our link's name, or None: the one rule for the config, the WireGuard
    backends and the link manager. The kernel's (IFNAMSIZ: at most 15 bytes; no '/', ':' or
    whitespace; not '.' or '..'), restricted to printable ASCII as the kernel backend needs it."""
    if (
        isinstance(name, str)
        and 0 < len(name) <= LINK_NAME_MAX
        and name.isascii()
        and name.isprintable()
        and not _LINK_NAME_BAD.search(name)
        and name not in (".", "..")
    ):
        return None
    return (
        f"{name!r} must be 1..{LINK_NAME_MAX} characters of printable ASCII without whitespace, "
        "'/' or ':', and not '.' or '..'"
    )


def check_link_name(name: object, field_name: str = "link_name") -> None:
    """Raise :class:`ConfigError` (a ValueError) naming ``field_name`` when ``name`` breaks the rule."""
    problem = link_name_problem(name)
    if problem is not None:
        raise ConfigError(field_name, problem)
