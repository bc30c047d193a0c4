"""The documents of a machine config: value types, and how each document is read and checked.

Talos documents (the ``version: v1alpha1`` document, ``KubeSpanConfig``, ``KubeSpanEndpointsConfig``,
``DiscoveryServiceConfig``, ``DiscoveryIdentityConfig``) accept fields Talos knows that we do not use, with
one warning per document listing their paths; a key Talos does not know is an error, as on a Talos node,
unless parsing is lenient (:mod:`machined.config.talos_keys`). Our own documents (``AgentConfig``,
``ServiceConfig``) reject unknown fields; a Talos node refuses them whole (kinds it does not register).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from discovery.crypto import SecretError, parse_secret
from discovery.limits import CLUSTER_ID_MAX
from kubespan.affiliate import EndpointFilter
from kubespan.constants import MTU
from kubespan.wireguard.types import AddrPort
from machined.config.errors import Problem
from machined.config.reader import MISSING, Reader, Sink
from spanutil.hostport import HostPortError, split_host_port
from spanutil.ipcodec import IPNetwork

log = logging.getLogger("machined.config")

V1ALPHA1 = "v1alpha1"
KUBESPAN_CONFIG = "KubeSpanConfig"
KUBESPAN_ENDPOINTS_CONFIG = "KubeSpanEndpointsConfig"
DISCOVERY_SERVICE_CONFIG = "DiscoveryServiceConfig"
DISCOVERY_IDENTITY_CONFIG = "DiscoveryIdentityConfig"  # Talos 1.14: clusterID, clusterSecret
AGENT_CONFIG = "AgentConfig"
SERVICE_CONFIG = "ServiceConfig"

TALOS_KINDS = frozenset(
    {KUBESPAN_CONFIG, KUBESPAN_ENDPOINTS_CONFIG, DISCOVERY_SERVICE_CONFIG, DISCOVERY_IDENTITY_CONFIG}
)
OUR_KINDS = frozenset({AGENT_CONFIG, SERVICE_CONFIG})
NAMED_KINDS = frozenset({DISCOVERY_SERVICE_CONFIG, SERVICE_CONFIG})
# top-level keys that make an untyped document the v1alpha1 one (Talos's decoder: no kind, one of these)
V1ALPHA1_KEYS = ("version", "machine", "cluster", "debug", "persist")

DEFAULT_DISCOVERY_ENDPOINT = "https://discovery.talos.dev/"
DEFAULT_API_SERVER_PORT = 6443  # Talos's DefaultControlPlanePort
LEGACY_DISCOVERY_NAME = "legacy"  # the v1alpha1 cluster.discovery block, as Talos names it
DEFAULT_STATE_DIR = Path("/var/lib/machined")
DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
DEFAULT_HTTP_STATUS_ADDR = ("127.0.0.1", 51821)
MACHINE_TYPES = ("controlplane", "worker")
BACKENDS = ("auto", "kernel", "userspace")
RESTART_POLICIES = ("always", "on-failure", "never")
MESH_DEGRADED_POLICIES = ("ignore", "stop", "restart")
RESERVED_SERVICE_NAMES = frozenset({"machined", "controller-runtime"})  # log ids of the agent itself

UNUSED_MESSAGE = "fields not used by machined (accepted and ignored)"

# The MeshConfig fields an AgentConfig sets, and where (mtu and allow_down_peer_bypass come from the
# KubeSpan settings). The reader checks only the YAML type; MeshConfig checks the values, once.
AGENT_MESH_INTS = {
    "listen_port": "wireguard.listenPort",
    "persistent_keepalive": "wireguard.persistentKeepalive",
    "routing_table": "routing.table",
    "rule_priority": "routing.rulePriority",
    "fwmark_wireguard": "routing.fwmarkWireguard",
    "fwmark_force": "routing.fwmarkForce",
    "fwmark_mask": "routing.fwmarkMask",
}
AGENT_MESH_STRINGS = {
    "link_name": "wireguard.linkName",
    "nft_table": "routing.nftTable",
    "steering": "routing.steering",
}
AGENT_MESH_PATHS = {**AGENT_MESH_STRINGS, **AGENT_MESH_INTS}
KUBESPAN_MESH_PATHS = {"mtu": "mtu", "allow_down_peer_bypass": "allowDownPeerBypass"}

_TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]* )?PRIVATE KEY-----.+-----END ([A-Z0-9 ]* )?PRIVATE KEY-----", re.S
)


# --- value types -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """``machine.ca``: PEM certificate and (control-plane nodes only) PEM key."""

    crt: bytes
    key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class KubeSpanSettings:
    """``machine.network.kubespan`` or a ``KubeSpanConfig`` document; defaults are Talos's.

    ``mtu`` is checked by the ``MeshConfig`` the machine config builds from it (a ``MachineConfig``
    with a bad one is never made)."""

    enabled: bool = False
    advertise_kubernetes_networks: bool = False
    allow_down_peer_bypass: bool = False
    harvest_extra_endpoints: bool = False  # unset = false, as Talos
    mtu: int = MTU
    endpoint_filters: tuple[str, ...] = ()
    exclude_advertised_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class V1Alpha1:
    """What machined uses of the ``version: v1alpha1`` document."""

    machine_type: str = "worker"
    token: str | None = field(default=None, repr=False)
    ca: CertificateAuthority | None = None
    cert_sans: tuple[str, ...] = ()
    cluster_id: str | None = None
    cluster_secret: bytes | None = field(default=None, repr=False)
    cluster_name: str | None = None
    discovery_enabled: bool = False
    discovery_service_disabled: bool = False
    discovery_service_endpoint: str | None = None
    kubespan: KubeSpanSettings | None = None  # None when machine.network.kubespan is absent
    control_plane_endpoint: str | None = None  # the Kubernetes API URL: checked, not otherwise used
    # cluster.controlPlane.localAPIServerPort (0 or unset: 6443, as Talos); control planes publish it
    local_api_server_port: int = DEFAULT_API_SERVER_PORT


@dataclass(frozen=True, slots=True)
class DiscoveryEndpoint:
    """One discovery service the node registers with (a ``DiscoveryServiceConfig``)."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class DiscoveryIdentity:
    """A ``DiscoveryIdentityConfig`` document: the cluster id and secret (None: missing or invalid)."""

    cluster_id: str | None
    cluster_secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Our ``AgentConfig`` document: what a Linux agent needs besides the Talos settings.

    The document's mesh settings (``wireguard.linkName``, ``routing.*`` ...) are not here: they go
    into the one ``MeshConfig`` (``MachineConfig.mesh().config``), see :data:`AGENT_MESH_PATHS`."""

    state_dir: Path = DEFAULT_STATE_DIR
    nodename: str | None = None  # label shown to peers; None = the hostname
    http_status_addr: tuple[str, int] | None = DEFAULT_HTTP_STATUS_ADDR  # None = not served
    backend: str = "auto"
    wireguard_go: str = "wireguard-go"
    socket_dir: Path = DEFAULT_SOCKET_DIR
    advertised_networks: tuple[IPNetwork, ...] = ()
    mac: bytes | None = None
    discovery_ca: Path | None = None
    stun_servers: tuple[tuple[str, int], ...] = ()  # mesh.stunServers: endpoint discovery (HOST:PORT)
    relay: bool = False  # mesh.relay: relay for peers that cannot connect directly (a public node)
    punch_retry_initial: float = 60.0  # mesh.punchRetryInitial: retry direct this long after a failed punch
    punch_retry_max: float = 600.0  # mesh.punchRetryMax: … doubling up to this


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How the supervisor decides a running service is healthy (Talos's timing defaults)."""

    kind: str  # "exec" | "tcp" | "http"
    command: tuple[str, ...] = ()  # exec: argv; exit status 0 = healthy
    address: tuple[str, int] | None = None  # tcp: host and port; a completed connect = healthy
    url: str = ""  # http: GET; a 2xx/3xx status = healthy
    interval: float = 5.0
    timeout: float = 0.5
    initial_delay: float = 1.0
    tls_verify: bool = True  # https: verify the server certificate


@dataclass(frozen=True, slots=True)
class MeshRequirement:
    """What a service needs from the mesh before it starts.

    ``none``: nothing. ``ready``: the mesh is ready (every known peer up). ``quorum``: at least
    ``quorum`` remote peers up (this node not counted), e.g. 1 for a three-member etcd.
    """

    mode: str = "none"
    quorum: int = 0

    def satisfied(self, *, ready: bool, peers_up: int) -> bool:
        if self.mode == "none":
            return True
        if self.mode == "ready":
            return ready
        return peers_up >= self.quorum


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """Delay before the n-th consecutive restart: ``initial * factor**(n-1)``, at most ``max``; a run
    that lasted ``reset_after`` seconds starts a new streak."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 30.0
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One ``ServiceConfig`` document: a process machined supervises."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values may be secrets
    working_dir: Path | None = None
    user: str | int | None = None
    enabled: bool = True  # false: the service is Skipped (and counts as up for its dependents)
    restart: str = "always"  # always | on-failure | never
    backoff: RestartBackoff = RestartBackoff()
    stop_timeout: float = 10.0  # SIGTERM, then SIGKILL after this long
    depends_on: tuple[str, ...] = ()
    requires_mesh: MeshRequirement = MeshRequirement()
    on_mesh_degraded: str = "ignore"  # ignore | stop | restart
    health_check: HealthCheck | None = None
    log_lines: int = 2000
    log_file: Path | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.command, *self.args)

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def to_service(self) -> Any:
        """The supervisor's definition (``machined.services.spec.Service``) of this service."""
        from machined.services import spec as sv

        health = None
        if (h := self.health_check) is not None:
            timing = {"interval": h.interval, "timeout": h.timeout, "initial_delay": h.initial_delay}
            if h.kind == "exec":
                health = sv.HealthCheck.exec(*h.command, **timing)
            elif h.kind == "tcp":
                assert h.address is not None
                health = sv.HealthCheck.tcp(h.address[0], h.address[1], **timing)
            else:
                health = sv.HealthCheck.http(h.url, tls_verify=h.tls_verify, **timing)
        b = self.backoff
        return sv.Service(
            name=self.name,
            argv=self.argv,
            env=self.environ,
            cwd=str(self.working_dir) if self.working_dir else None,
            user=self.user,
            restart=sv.RestartPolicy(self.restart),
            backoff=sv.Backoff(initial=b.initial, factor=b.factor, max=b.max, reset_after=b.reset_after),
            health=health,
            stop_timeout=self.stop_timeout,
            depends_on=self.depends_on,
            requires_mesh=sv.MeshRequirement(sv.MeshMode(self.requires_mesh.mode), self.requires_mesh.quorum),
            on_mesh_degraded=sv.OnMeshDegraded(self.on_mesh_degraded),
            enabled=self.enabled,
            log_lines=self.log_lines,
            log_file=str(self.log_file) if self.log_file else None,
        )


# --- document identity -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DocRef:
    """Which document this is: kind (``v1alpha1`` for the version document) and name."""

    kind: str
    name: str | None
    index: int

    @property
    def label(self) -> str:
        return label_for(self.kind, self.name)

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.kind, self.name)


def label_for(kind: str, name: str | None) -> str:
    return f"{kind}[{name}]" if name is not None else kind


def doc_key(doc: Any) -> tuple[str, str | None] | None:
    """(kind, name) of a raw document, as documents are matched (patches, diffs); None if unknown."""
    if not isinstance(doc, dict):
        return None
    if "kind" in doc or "apiVersion" in doc:
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind:
            return None
        name = doc.get("name")
        named = kind in NAMED_KINDS or kind not in TALOS_KINDS | OUR_KINDS
        return (kind, name if named and isinstance(name, str) else None)
    return (V1ALPHA1, None)


def identify(index: int, doc: Any, sink: Sink) -> DocRef | None:
    """Check a document's header and say which document it is; problems go to ``sink``."""
    anon = f"document {index + 1}"
    if not isinstance(doc, dict):
        sink.problem(Problem(anon, index, "", "must be a mapping"))
        return None
    if "kind" in doc or "apiVersion" in doc:
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind:
            sink.problem(
                Problem(anon, index, "kind", "is required (a typed document has apiVersion and kind)")
            )
            return None
        name = doc.get("name")
        named = kind in NAMED_KINDS or (kind not in TALOS_KINDS | OUR_KINDS and isinstance(name, str))
        ref = DocRef(kind, name if named and isinstance(name, str) else None, index)
        api = doc.get("apiVersion")
        if api is None:
            sink.problem(Problem(ref.label, index, "apiVersion", "is required"))
        elif kind in TALOS_KINDS | OUR_KINDS and api != V1ALPHA1:
            sink.problem(Problem(ref.label, index, "apiVersion", f"must be v1alpha1 for kind {kind}"))
        if kind in NAMED_KINDS:
            if name is None or name == "":
                sink.problem(Problem(f"{kind} ({anon})", index, "name", "is required"))
                return None
            if kind == DISCOVERY_SERVICE_CONFIG:  # Talos: any non-empty string
                if not isinstance(name, str):
                    sink.problem(Problem(f"{kind} ({anon})", index, "name", "must be a string"))
                    return None
            elif not isinstance(name, str) or not _NAME.fullmatch(name):
                sink.problem(
                    Problem(
                        f"{kind} ({anon})",
                        index,
                        "name",
                        "must be 1..63 characters of a-z, 0-9, '.', '_', '-', "
                        "starting and ending with a letter or digit",
                    )
                )
                return None
        return ref
    if any(k in doc for k in V1ALPHA1_KEYS):  # as Talos: machine:/cluster:/... without version is v1alpha1
        if "version" in doc and doc["version"] != V1ALPHA1:
            sink.problem(Problem(V1ALPHA1, index, "version", "must be v1alpha1"))
        return DocRef(V1ALPHA1, None, index)
    sink.problem(
        Problem(anon, index, "", "must have version: v1alpha1 (or machine:/cluster:), or apiVersion and kind")
    )
    return None


# --- field checks ----------------------------------------------------------------------------------


def check_discovery_url(text: str) -> str | None:
    """The rule a discovery endpoint breaks, or None. Never quotes URL credentials."""
    rule = (
        "must be a discovery endpoint URL: http://, https:// or grpc://host[:port] (a path is ignored); "
        "replicas of one registry as a host list, https://host1[:port],host2[:port]"
    )
    try:
        if "@" in urlsplit(text if "://" in text else "//" + text).netloc:
            return "must not contain credentials"
    except ValueError:
        return rule
    from discovery.client.target import parse_endpoint_replicas  # imports grpc: only when needed

    try:
        parse_endpoint_replicas(text)
    except ValueError as e:
        entry = re.search(r": (replica \d+)", str(e))  # which entry of a host list, not its text
        return f"{rule} ({entry.group(1)} is not valid)" if entry else rule
    return None


def drop_endpoint_path(text: str) -> tuple[str, str]:
    """A discovery endpoint without its path, query and fragment, and what was dropped ("" if nothing).

    Talos connects to the endpoint's host and port only (``NormalizeEndpoint``), so a path is ignored, not
    an error; ``https://h/`` (Talos's default form) and ``https://h`` are left as they are."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        return text, ""
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    dropped = rest[cut:]
    if dropped in ("", "/"):
        return text, ""
    return f"{scheme}://{rest[:cut]}/", dropped


def _endpoint(r: Reader, path: str, url: str) -> str | None:
    """A discovery endpoint as used: its path dropped (debug log), then checked (a problem: None)."""
    url, dropped = drop_endpoint_path(url)
    if rule := check_discovery_url(url):
        r.fail(path, rule)
        return None
    if dropped:  # logged once checked (no credentials); the path's text is not logged (it may hold a token)
        log.debug(
            "%s.%s (document %d): the endpoint's path/query (%d characters) is ignored, as Talos does; using %s",
            r.label,
            path,
            r.index + 1,
            len(dropped),
            url,
        )
    return url


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _pem_certificate(text: str) -> bytes:
    from cryptography import x509

    pem = _b64(text)
    try:
        x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    return pem


def _pem_private_key(text: str) -> bytes:
    pem = _b64(text)
    if not _PEM_KEY.search(pem):
        raise ValueError("not a PEM private key")
    return pem


def _cert_san(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if len(text) > 253 or not _DNS_NAME.fullmatch(text):
            raise ValueError("not a SAN") from None
    return text


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text.strip(), strict=False)


def _endpoint_filter(text: str) -> str:
    return str(EndpointFilter.parse(text))


def _mac(text: str) -> bytes:
    raw = text.replace(":", "").replace("-", "")
    if len(raw) != 12:
        raise ValueError("not a MAC")
    return bytes.fromhex(raw)


def _sub(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- Talos documents -------------------------------------------------------------------------------


def read_kubespan(r: Reader, prefix: str) -> KubeSpanSettings:
    """``machine.network.kubespan`` (prefix) or a ``KubeSpanConfig`` document (prefix "")."""
    return KubeSpanSettings(
        enabled=r.boolean(_sub(prefix, "enabled"), False),
        advertise_kubernetes_networks=r.boolean(_sub(prefix, "advertiseKubernetesNetworks"), False),
        allow_down_peer_bypass=r.boolean(_sub(prefix, "allowDownPeerBypass"), False),
        harvest_extra_endpoints=r.boolean(_sub(prefix, "harvestExtraEndpoints"), False),
        # machine.network.kubespan.mtu: 0 is Talos's default there; a KubeSpanConfig's 0 stays an error
        mtu=(r.integer(_sub(prefix, "mtu"), MTU) or MTU) if prefix else r.integer("mtu", MTU),
        endpoint_filters=r.items(
            _sub(prefix, "filters.endpoints"),
            _endpoint_filter,
            "must be a CIDR or IP address, optionally prefixed with '!'",
        ),
        exclude_advertised_networks=r.items(
            _sub(prefix, "filters.excludeAdvertisedNetworks"), _network, "must be a CIDR"
        ),
    )


def read_v1alpha1(r: Reader) -> V1Alpha1:
    r.raw("version")
    machine_type = r.choice("machine.type", "worker", (*MACHINE_TYPES, "init"), required=True)
    if machine_type == "init":
        r.warn("machine.type init is deprecated; treated as controlplane", ["v1alpha1.machine.type"])
        machine_type = "controlplane"
    token = r.string("machine.token") or None  # "" = unset (Talos does not check machine.token)
    if token is not None and not _TOKEN.fullmatch(token):
        r.fail("machine.token", "must be a token of the form [a-z0-9]{6}.[a-z0-9]{16}")
        token = None
    ca: CertificateAuthority | None = None
    if r.mapping("machine.ca") is not None:
        crt = r.string("machine.ca.crt", required=True)
        key = r.string("machine.ca.key") or None  # "" = absent: Talos's stock worker config writes key: ""
        crt_pem = key_pem = None
        if crt is not None:
            try:
                crt_pem = _pem_certificate(crt)
            except ValueError:
                r.fail("machine.ca.crt", "must be base64 of a PEM certificate")
        if key is not None:
            try:
                key_pem = _pem_private_key(key)
            except ValueError:
                r.fail("machine.ca.key", "must be base64 of a PEM private key")
        if crt_pem is not None:
            ca = CertificateAuthority(crt_pem, key_pem)
    cert_sans = r.items("machine.certSANs", _cert_san, "must be an IP address or a DNS name")
    r.raw("machine.network.kubespan")  # reports a machine.network that is not a mapping
    kubespan = read_kubespan(r, "machine.network.kubespan") if r.present("machine.network.kubespan") else None

    # "" = unset: Talos 1.14's gen config leaves them empty and writes a DiscoveryIdentityConfig instead
    cluster_id = _cluster_id(r, "cluster.id")
    secret = _cluster_secret(r, "cluster.secret")
    endpoint = r.string("cluster.discovery.registries.service.endpoint")
    if endpoint is not None:
        endpoint = _endpoint(r, "cluster.discovery.registries.service.endpoint", endpoint)
    v1 = V1Alpha1(
        machine_type=machine_type,
        token=token,
        ca=ca,
        cert_sans=cert_sans,
        cluster_id=cluster_id,
        cluster_secret=secret,
        cluster_name=r.string("cluster.clusterName"),
        discovery_enabled=r.boolean("cluster.discovery.enabled", False),
        discovery_service_disabled=r.boolean("cluster.discovery.registries.service.disabled", False),
        discovery_service_endpoint=endpoint,
        kubespan=kubespan,
        control_plane_endpoint=_control_plane_endpoint(r, "cluster.controlPlane.endpoint"),
        local_api_server_port=r.integer("cluster.controlPlane.localAPIServerPort", 0, 0, 65535)
        or DEFAULT_API_SERVER_PORT,
    )
    r.warn_unused(UNUSED_MESSAGE)
    return v1


def _control_plane_endpoint(r: Reader, path: str) -> str | None:
    """``cluster.controlPlane.endpoint`` (talosctl gen config's ENDPOINT; spanctl's too): a URL with a
    scheme and a host, as Talos parses it. machined runs no Kubernetes: it checks the field, no more."""
    text = r.string(path)
    if text is None:
        return None
    try:
        u = urlsplit(text)
        u.port  # noqa: B018 - raises ValueError on a bad port
        ok = bool(u.scheme and u.hostname) and u.username is None
    except ValueError:
        ok = False
    if not ok:
        r.fail(path, "must be a URL such as https://192.0.2.1:6443 (the Kubernetes API endpoint)")
        return None
    return text


def _cluster_id(r: Reader, path: str) -> str | None:
    cluster_id = r.string(path) or None
    if cluster_id is not None and not 1 <= len(cluster_id.encode()) <= CLUSTER_ID_MAX:
        r.fail(path, f"must be 1..{CLUSTER_ID_MAX} bytes")
        return None
    return cluster_id


def _cluster_secret(r: Reader, path: str) -> bytes | None:
    text = r.string(path) or None
    if text is None:
        return None
    try:
        return parse_secret(text)
    except SecretError:
        r.fail(path, "must be base64 of 32 bytes")
        return None


def read_discovery_identity(r: Reader) -> DiscoveryIdentity:
    """Talos's rules (types/cluster/discovery_identity.go): both fields required, the secret base64 of 32
    bytes; the id's content is not checked beyond our length limit."""
    r.raw("apiVersion")
    r.raw("kind")
    for path in ("clusterID", "clusterSecret"):
        if r.raw(path) in (MISSING, ""):  # absent, null or ""
            r.fail(path, "is required")
    ident = DiscoveryIdentity(_cluster_id(r, "clusterID"), _cluster_secret(r, "clusterSecret"))
    r.warn_unused(UNUSED_MESSAGE)
    return ident


def read_kubespan_config(r: Reader) -> KubeSpanSettings:
    r.raw("apiVersion")
    r.raw("kind")
    ks = read_kubespan(r, "")
    r.warn_unused(UNUSED_MESSAGE)
    return ks


def read_kubespan_endpoints(r: Reader) -> tuple[AddrPort, ...]:
    r.raw("apiVersion")
    r.raw("kind")
    eps = r.items("extraAnnouncedEndpoints", AddrPort.parse, "must be IP:port (IPv6 as [IP]:port)")
    r.warn_unused(UNUSED_MESSAGE)
    return eps


def read_discovery_service(r: Reader) -> DiscoveryEndpoint | None:
    r.raw("apiVersion")
    r.raw("kind")
    name = r.string("name", required=True)
    url = r.string("endpoint", required=True)
    if url is not None:
        url = _endpoint(r, "endpoint", url)
    r.warn_unused(UNUSED_MESSAGE)
    if name is None or url is None:
        return None
    return DiscoveryEndpoint(name, url)


# --- our documents ---------------------------------------------------------------------------------


def read_agent(r: Reader) -> tuple[AgentSettings, dict[str, int | str]]:
    """The document's settings, and the MeshConfig fields it sets (by field name, type-checked only)."""
    r.raw("apiVersion")
    r.raw("kind")
    d = AgentSettings()
    state_dir = r.string("stateDir")
    if state_dir is not None and not state_dir.startswith("/"):
        r.fail("stateDir", "must be an absolute path")
        state_dir = None
    nodename = r.string("nodename")
    if nodename is not None and not nodename.strip():
        r.fail("nodename", "must not be empty")
        nodename = None
    http: tuple[str, int] | None = d.http_status_addr
    http_text = r.string("httpStatusAddr")
    if http_text is not None:
        if http_text == "":
            http = None
        else:
            try:
                http = split_host_port(http_text)
            except HostPortError as e:
                r.fail(
                    "httpStatusAddr",
                    f"must be HOST:PORT or empty (not served), got {http_text!r}: {e.reason}",
                )
    socket_dir = r.string("wireguard.socketDir")
    if socket_dir is not None and not socket_dir.startswith("/"):
        r.fail("wireguard.socketDir", "must be an absolute path")
        socket_dir = None
    mesh: dict[str, int | str] = {}
    for name, path in AGENT_MESH_STRINGS.items():
        if (text := r.string(path)) is not None:
            mesh[name] = text
    for name, path in AGENT_MESH_INTS.items():
        if (number := r.integer(path, None)) is not None:
            mesh[name] = number
    mac_raw = r.raw("mesh.mac")
    mac: bytes | None = None
    if mac_raw is not MISSING:
        if not isinstance(mac_raw, str):
            r.fail("mesh.mac", 'must be a quoted string such as "52:54:00:12:34:56"')
        else:
            try:
                mac = _mac(mac_raw)
            except ValueError:
                r.fail("mesh.mac", f"must be a MAC address such as 52:54:00:12:34:56, got {mac_raw!r}")
    ca = r.string("discovery.caFile")
    if ca is not None and not ca.startswith("/"):
        r.fail("discovery.caFile", "must be an absolute path")
        ca = None
    retry_initial = r.seconds("mesh.punchRetryInitial", 60.0)
    retry_max = r.seconds("mesh.punchRetryMax", 600.0)
    if retry_max < retry_initial:
        r.fail(
            "mesh.punchRetryMax",
            f"must be at least mesh.punchRetryInitial ({retry_initial:g}s), got {retry_max:g}s",
        )
        retry_max = retry_initial
    settings = AgentSettings(
        state_dir=Path(state_dir) if state_dir else d.state_dir,
        nodename=nodename,
        http_status_addr=http,
        backend=r.choice("wireguard.backend", "auto", BACKENDS),
        wireguard_go=r.string("wireguard.wireguardGo", d.wireguard_go) or d.wireguard_go,
        socket_dir=Path(socket_dir) if socket_dir else d.socket_dir,
        advertised_networks=r.items("mesh.advertisedNetworks", _network, "must be a CIDR"),
        mac=mac,
        discovery_ca=Path(ca) if ca else None,
        stun_servers=r.items(
            "mesh.stunServers", split_host_port, "must be HOST:PORT (IPv6 as [IP]:PORT, port 1-65535)"
        ),
        relay=bool(r.boolean("mesh.relay", False)),
        punch_retry_initial=retry_initial,
        punch_retry_max=retry_max,
    )
    r.reject_unknown()
    return settings, mesh


def _read_requirement(r: Reader) -> MeshRequirement:
    v = r.raw("requiresMesh")
    rule = "must be none, ready, or {quorum: N} (N remote peers up, N >= 1)"
    if v is MISSING:
        return MeshRequirement()
    if v in ("none", "ready"):
        return MeshRequirement(v)
    if isinstance(v, dict):
        for k in v:
            if k != "quorum":
                r.fail(f"requiresMesh.{k}", "unknown field (only quorum)")
        n = v.get("quorum")
        if n is None:
            r.fail("requiresMesh.quorum", "is required")
            return MeshRequirement()
        quorum = r.check_int(("requiresMesh", "quorum"), n, 0, 1, 1024)
        return MeshRequirement("quorum", quorum) if quorum else MeshRequirement()
    r.fail("requiresMesh", f"{rule}, {r.show(('requiresMesh',), v)}")
    return MeshRequirement()


def _read_health(r: Reader) -> HealthCheck | None:
    if r.mapping("healthCheck") is None:
        return None
    kinds = [k for k in ("exec", "tcp", "http") if r.present(f"healthCheck.{k}")]
    interval = r.seconds("healthCheck.interval", 5.0)
    timeout = r.seconds("healthCheck.timeout", 0.5)
    initial = r.seconds("healthCheck.initialDelay", 1.0, allow_zero=True)
    tls_verify = r.boolean("healthCheck.tlsVerify", True)
    command = r.strings("healthCheck.exec")
    tcp = r.string("healthCheck.tcp")
    url = r.string("healthCheck.http")
    if len(kinds) != 1:
        r.fail("healthCheck", "must have exactly one of exec, tcp or http")
        return None
    kind = kinds[0]
    if kind == "exec":
        if not command:
            r.fail("healthCheck.exec", "must be a non-empty list: [command, args...]")
            return None
        return HealthCheck("exec", command=command, interval=interval, timeout=timeout, initial_delay=initial)
    if kind == "tcp":
        try:
            address = split_host_port(tcp or "")
        except HostPortError as e:
            r.fail("healthCheck.tcp", f"must be HOST:PORT, got {tcp!r}: {e.reason}")
            return None
        return HealthCheck("tcp", address=address, interval=interval, timeout=timeout, initial_delay=initial)
    try:
        parts = urlsplit(url or "")
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok:
        r.fail("healthCheck.http", "must be an http:// or https:// URL with a host")
        return None
    if parts.username is not None or parts.password is not None:
        r.fail("healthCheck.http", "must not contain credentials")
        return None
    return HealthCheck(
        "http",
        url=url or "",
        interval=interval,
        timeout=timeout,
        initial_delay=initial,
        tls_verify=tls_verify,
    )


def read_service(r: Reader) -> ServiceSpec | None:
    r.raw("apiVersion")
    r.raw("kind")
    name = r.string("name", required=True) or ""
    if name in RESERVED_SERVICE_NAMES:
        r.fail(
            "name", f"is reserved ({', '.join(sorted(RESERVED_SERVICE_NAMES))} are the agent's own log ids)"
        )
    command = r.string("command", required=True)
    if command is not None and not command.strip():
        r.fail("command", "must not be empty")
    args = r.strings("args")
    env: list[tuple[str, str]] = []
    env_map = r.mapping("env")
    for k, v in (env_map or {}).items():
        if not _ENV_NAME.fullmatch(k):
            r.fail(("env", k), "must be a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        elif isinstance(v, bool) or not isinstance(v, str | int):
            r.fail(("env", k), "must be a string (quote it)")
        else:
            env.append((k, str(v)))
    working_dir = r.string("workingDir")
    if working_dir is not None and not working_dir.startswith("/"):
        r.fail("workingDir", "must be an absolute path")
        working_dir = None
    user_raw = r.raw("user")
    user: str | int | None = None
    if user_raw is not MISSING:
        if isinstance(user_raw, bool) or not isinstance(user_raw, str | int) or user_raw in ("", -1):
            r.fail("user", f"must be a user name or uid, {r.show(('user',), user_raw)}")
        elif isinstance(user_raw, int):
            user = r.check_int(("user",), user_raw, 0, 0, 2**32 - 2)
        else:
            user = user_raw
    backoff = RestartBackoff(
        initial=r.seconds("backoff.initial", 1.0),
        factor=_factor(r),
        max=r.seconds("backoff.max", 30.0),
        reset_after=r.seconds("backoff.resetAfter", 60.0, allow_zero=True),
    )
    if backoff.max < backoff.initial:
        r.fail("backoff.max", f"must be at least backoff.initial ({backoff.initial:g}s)")
        backoff = RestartBackoff(backoff.initial, backoff.factor, backoff.initial, backoff.reset_after)
    log_file = r.string("logFile")
    if log_file is not None and not log_file.startswith("/"):
        r.fail("logFile", "must be an absolute path")
        log_file = None
    depends_on = r.strings("dependsOn")
    if len(set(depends_on)) != len(depends_on):
        r.fail("dependsOn", "lists a service twice")
    spec = ServiceSpec(
        name=name,
        command=command or "",
        args=args,
        env=tuple(env),
        working_dir=Path(working_dir) if working_dir else None,
        user=user,
        enabled=r.boolean("enabled", True),
        restart=r.choice("restart", "always", RESTART_POLICIES),
        backoff=backoff,
        stop_timeout=r.seconds("stopTimeout", 10.0),
        depends_on=tuple(dict.fromkeys(depends_on)),
        requires_mesh=_read_requirement(r),
        on_mesh_degraded=r.choice("onMeshDegraded", "ignore", MESH_DEGRADED_POLICIES),
        health_check=_read_health(r),
        log_lines=r.integer("logLines", 2000, 1, 1_000_000),
        log_file=Path(log_file) if log_file else None,
    )
    r.reject_unknown()
    return spec if name and command else None


def _factor(r: Reader) -> float:
    v = r.raw("backoff.factor")
    if v is MISSING:
        return 2.0
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 100:
        r.fail("backoff.factor", f"must be a number from 1 to 100, {r.show(('backoff', 'factor'), v)}")
        return 2.0
    return float(v)
