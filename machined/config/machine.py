"""``MachineConfig``: a validated multi-document machine config and the views derived from it.

Parsing checks every document and the rules between them and raises one
:class:`ConfigValidationError` listing every problem, so an invalid config never gets further than
this constructor. A ``MachineConfig`` is immutable: patches return a new one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubespan.constants import ConfigError, MeshConfig
from kubespan.wireguard.types import AddrPort
from machined.config import documents as d
from machined.config import talos_keys
from machined.config.documents import (
    AgentSettings,
    DiscoveryEndpoint,
    DocRef,
    KubeSpanSettings,
    ServiceSpec,
    V1Alpha1,
)
from machined.config.errors import ConfigValidationError, ConfigWarning, Problem
from machined.config.reader import Reader, Sink
from machined.config.redact import redact, redacted_pair, unified_diff
from machined.config.yamlio import dump_documents, load_documents
from spanutil.ipcodec import IPNetwork

if TYPE_CHECKING:
    from kubespan.engine import MeshOptions
    from machined.config.patch import Patch


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Everything the mesh needs, derived from the whole config (``MachineConfig.mesh()``)."""

    enabled: bool
    cluster_id: str
    cluster_secret: bytes = field(repr=False)
    discovery: tuple[DiscoveryEndpoint, ...]
    config: MeshConfig
    state_dir: Path
    nodename: str | None = None
    backend: str = "auto"
    wireguard_go: str = "wireguard-go"
    socket_dir: Path = d.DEFAULT_SOCKET_DIR
    discovery_ca: Path | None = None
    advertise: tuple[IPNetwork, ...] = ()
    advertise_kubernetes_networks: bool = False
    exclude: tuple[IPNetwork, ...] = ()
    endpoint_filters: tuple[str, ...] = ()
    extra_endpoints: tuple[AddrPort, ...] = ()
    publish_learned: bool = False  # harvestExtraEndpoints; unset = off, as Talos
    mac: bytes | None = None
    machine_type: str = ""  # machine.type, published in the affiliate (workers find trustd by it)
    # control planes: cluster.controlPlane.localAPIServerPort, published as the affiliate's control_plane (as
    # Talos); None on workers
    api_server_port: int | None = None
    stun_servers: tuple[tuple[str, int], ...] = ()  # AgentConfig mesh.stunServers
    relay: bool = False  # AgentConfig mesh.relay
    punch_retry_initial: float = 60.0  # AgentConfig mesh.punchRetryInitial
    punch_retry_max: float = 600.0  # AgentConfig mesh.punchRetryMax

    @property
    def discovery_urls(self) -> tuple[str, ...]:
        return tuple(e.url for e in self.discovery)

    def options(self, hostname: str) -> MeshOptions:
        """``kubespan.engine.MeshOptions`` for this node (``nodename`` defaults to ``hostname``)."""
        from kubespan.engine import MeshOptions
        from kubespan.nat.punch import PunchTimings

        return MeshOptions(
            cluster_id=self.cluster_id,
            cluster_secret=self.cluster_secret,
            state_dir=self.state_dir,
            nodename=self.nodename or hostname,
            hostname=hostname,
            config=self.config,
            advertise=self.advertise,
            exclude=self.exclude,
            endpoint_filters=self.endpoint_filters,
            extra_endpoints=self.extra_endpoints,
            mac=self.mac,
            publish_learned=self.publish_learned,
            machine_type=self.machine_type,
            api_server_port=self.api_server_port,
            stun_servers=self.stun_servers,
            relay=self.relay,
            punch_timings=PunchTimings(
                retry_initial=self.punch_retry_initial, retry_max=self.punch_retry_max
            ),
        )


def only_negated(filters: Sequence[str]) -> bool:
    return bool(filters) and all(f.startswith("!") for f in filters)


# Mesh settings whose change means the old kernel objects / discovery entry must be removed when the
# mesh is rebuilt (they name the link, table, rule, marks, nft table or cluster); any other mesh change
# rebuilds the engine keeping them (kubespan's keep-on-exit restart).
MESH_CLEANUP_FIELDS = frozenset(
    {
        "enabled",
        "cluster_id",
        "cluster_secret",
        "backend",
        "wireguard_go",
        "socket_dir",
        "config.link_name",
        "config.routing_table",
        "config.rule_priority",
        "config.fwmark_wireguard",
        "config.fwmark_force",
        "config.fwmark_mask",
        "config.nft_table",
        "config.steering",
    }
)


@dataclass(frozen=True, slots=True)
class ChangeEffects:
    """What a config change means for the running agent (nothing here needs a reboot).

    * ``mesh_restart``: mesh settings that changed. The engine takes its options at construction,
      so the mesh is rebuilt with the new ones; peers' traffic resumes once WireGuard is re-synced.
    * ``mesh_cleanup``: one of them names kernel objects or the cluster (link name, routing table,
      rule priority, fwmarks, nft table, backend, cluster id/secret, mesh on/off): stop the old mesh
      *with* cleanup (leave the cluster, remove link/rules/nft table) before starting the new one.
    * ``services_*``: ServiceConfig documents added, removed or changed (restart only those).
    * ``next_start``: AgentConfig ``stateDir`` and ``httpStatusAddr``, read once at agent start.
    """

    mesh_restart: tuple[str, ...] = ()
    mesh_cleanup: bool = False
    services_added: tuple[str, ...] = ()
    services_removed: tuple[str, ...] = ()
    services_changed: tuple[str, ...] = ()
    next_start: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.mesh_restart
            or self.services_added
            or self.services_removed
            or self.services_changed
            or self.next_start
        )

    def describe(self) -> str:
        """One line for logs and ``mode_details`` (names only, never values)."""
        parts: list[str] = []
        if self.mesh_restart:
            how = "with cleanup" if self.mesh_cleanup else "keeping kernel state"
            parts.append(f"mesh restarts {how} ({', '.join(self.mesh_restart)})")
        for what, names in (
            ("services added", self.services_added),
            ("services removed", self.services_removed),
            ("services restarted", self.services_changed),
        ):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        if self.next_start:
            parts.append(f"at the next agent start: {', '.join(self.next_start)}")
        return "; ".join(parts) if parts else "no effect on the running agent"


def _mesh_diff(old: MeshSettings, new: MeshSettings) -> list[str]:
    changed: list[str] = []
    for f in fields(MeshSettings):
        if f.name == "state_dir":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "config":
            changed += [
                f"config.{c.name}" for c in fields(MeshConfig) if getattr(a, c.name) != getattr(b, c.name)
            ]
        elif a != b:
            changed.append(f.name)
    return changed


class MachineConfig:
    """A validated machine config; see the module docstring."""

    __slots__ = (
        "_agent",
        "_canonical",
        "_discovery",
        "_docs",
        "_extra_endpoints",
        "_kubespan",
        "_mesh",
        "_refs",
        "_services",
        "_source",
        "_strict",
        "_v1",
        "_warnings",
    )

    _agent: AgentSettings
    _canonical: str | None
    _discovery: tuple[DiscoveryEndpoint, ...]
    _docs: tuple[dict[str, Any], ...]
    _extra_endpoints: tuple[AddrPort, ...]
    _kubespan: KubeSpanSettings
    _mesh: MeshSettings
    _refs: tuple[DocRef | None, ...]
    _services: tuple[ServiceSpec, ...]
    _source: str | None
    _strict: bool
    _v1: V1Alpha1
    _warnings: tuple[ConfigWarning, ...]

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes, *, strict: bool | None = None) -> MachineConfig:
        """Load multi-document YAML; raises :class:`ConfigValidationError` listing every problem.

        ``strict``: keys Talos does not know in Talos's documents are errors, as on a Talos node
        (:mod:`machined.config.talos_keys`); False lists them in a warning; None (the default) takes
        the process-wide setting (``talos_keys.strict_default()``: strict unless machined runs with
        ``--config-lenient`` or ``MACHINED_CONFIG_LENIENT=1``)."""
        docs = load_documents(text, "config")
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls._build(docs, text, strict)

    @classmethod
    def from_documents(cls, docs: Sequence[Any], *, strict: bool | None = None) -> MachineConfig:
        """Build from already-decoded documents (deep-copied); ``strict`` as for :meth:`parse`."""
        return cls._build([copy.deepcopy(doc) for doc in docs], None, strict)

    @classmethod
    def _build(cls, docs: list[Any], source: str | None, strict: bool | None = None) -> MachineConfig:
        if strict is None:
            strict = talos_keys.strict_default()
        sink = Sink()
        if not docs:
            sink.problem(Problem("config", -1, "", "is empty: a v1alpha1 document is required"))
            raise ConfigValidationError(sink.problems)
        seen: dict[tuple[str, str | None], int] = {}
        refs: list[DocRef | None] = []
        v1: V1Alpha1 | None = None
        v1_ref: DocRef | None = None
        ks_doc: KubeSpanSettings | None = None
        ks_ref: DocRef | None = None
        extra: tuple[AddrPort, ...] = ()
        discos: list[tuple[DocRef, DiscoveryEndpoint]] = []
        agent: AgentSettings | None = None
        agent_mesh: dict[str, int | str] = {}
        agent_ref: DocRef | None = None
        services: list[tuple[DocRef, ServiceSpec]] = []
        discovery_docs: list[str] = []  # every DiscoveryServiceConfig, valid or not: "label (document N)"
        ident: d.DiscoveryIdentity | None = None
        ident_ref: DocRef | None = None

        for i, doc in enumerate(docs):
            ref = d.identify(i, doc, sink)
            refs.append(ref)
            if ref is None:
                if isinstance(doc, dict) and doc.get("kind") == d.DISCOVERY_SERVICE_CONFIG:
                    discovery_docs.append(f"document {i + 1}")  # its header's problem is reported
                continue
            if ref.key in seen:
                sink.problem(
                    Problem(
                        ref.label,
                        i,
                        "",
                        f"duplicates document {seen[ref.key] + 1} (documents are matched by kind and name)",
                    )
                )
                continue
            seen[ref.key] = i
            r = Reader(sink, ref.label, i, ref.kind, doc, known=talos_keys.TREES.get(ref.kind), strict=strict)
            if ref.kind == d.V1ALPHA1:
                v1, v1_ref = d.read_v1alpha1(r), ref
            elif ref.kind == d.KUBESPAN_CONFIG:
                ks_doc, ks_ref = d.read_kubespan_config(r), ref
            elif ref.kind == d.KUBESPAN_ENDPOINTS_CONFIG:
                extra = d.read_kubespan_endpoints(r)
            elif ref.kind == d.DISCOVERY_SERVICE_CONFIG:
                discovery_docs.append(f"{ref.label} (document {i + 1})")
                ep = d.read_discovery_service(r)
                if ep is not None:
                    discos.append((ref, ep))
            elif ref.kind == d.DISCOVERY_IDENTITY_CONFIG:
                ident, ident_ref = d.read_discovery_identity(r), ref
            elif ref.kind == d.AGENT_CONFIG:
                (agent, agent_mesh), agent_ref = d.read_agent(r), ref
            elif ref.kind == d.SERVICE_CONFIG:
                svc = d.read_service(r)
                if svc is not None:
                    services.append((ref, svc))
            else:
                r.warn(f"document kind {ref.kind} is not used by machined (kept as is)")

        if v1 is None or v1_ref is None:
            # as Talos: a multi-document config may leave out the v1alpha1 document
            sink.warn(
                ConfigWarning(
                    d.V1ALPHA1,
                    -1,
                    "no version: v1alpha1 document: machine.type is worker, no machine.ca, machine.token "
                    "or certSANs",
                )
            )
            v1, v1_ref = V1Alpha1(), DocRef(d.V1ALPHA1, None, -1)
        v1_doc = docs[v1_ref.index] if v1_ref.index >= 0 else {}
        agent = agent or AgentSettings()
        agent_index = agent_ref.index if agent_ref else -1

        # KubeSpan: one source only, as Talos
        if ks_doc is not None and v1.kubespan is not None:
            sink.problem(
                Problem(
                    d.V1ALPHA1,
                    v1_ref.index,
                    "machine.network.kubespan",
                    f"must not be set together with a KubeSpanConfig document "
                    f"(document {ks_ref.index + 1 if ks_ref else '?'}); use one of them",
                )
            )
        kubespan = ks_doc or v1.kubespan or KubeSpanSettings()
        ks_label = d.KUBESPAN_CONFIG if ks_doc is not None else "v1alpha1.machine.network.kubespan"
        ks_index = ks_ref.index if ks_doc is not None and ks_ref else v1_ref.index
        if kubespan.advertise_kubernetes_networks:
            sink.warn(
                ConfigWarning(
                    ks_label,
                    ks_index,
                    "advertiseKubernetesNetworks has no effect on a Linux agent (no Kubernetes pod CIDRs); "
                    "list the networks in AgentConfig mesh.advertisedNetworks",
                )
            )

        # discovery: the legacy block (named "legacy", as Talos) or DiscoveryServiceConfig documents, not both
        # (Talos: DiscoveryServiceConfigV1Alpha1.V1Alpha1ConflictValidate refuses any cluster.discovery block)
        discovery: list[DiscoveryEndpoint] = []
        if discovery_docs and _present(v1_doc, "cluster", "discovery"):
            sink.problem(
                Problem(
                    d.V1ALPHA1,
                    v1_ref.index,
                    "cluster.discovery",
                    f"must not be set together with {d.DISCOVERY_SERVICE_CONFIG} documents "
                    f"({', '.join(discovery_docs[:3])}{', ...' if len(discovery_docs) > 3 else ''}), "
                    f"even disabled (Talos refuses the pair): configure discovery in one place, the "
                    f"cluster.discovery block or the documents",
                )
            )
        elif v1.discovery_enabled and not v1.discovery_service_disabled:
            discovery.append(
                DiscoveryEndpoint(
                    d.LEGACY_DISCOVERY_NAME, v1.discovery_service_endpoint or d.DEFAULT_DISCOVERY_ENDPOINT
                )
            )
        for ref, ep in discos:
            if ep.url in {e.url for e in discovery}:
                sink.warn(
                    ConfigWarning(ref.label, ref.index, f"endpoint {ep.url} is listed twice; registered once")
                )
                continue
            discovery.append(ep)
        if kubespan.enabled and not discovery and not discovery_docs:
            sink.problem(
                Problem(
                    d.V1ALPHA1,
                    v1_ref.index,
                    "cluster.discovery.enabled",
                    "must be true (or a DiscoveryServiceConfig document present): KubeSpan finds its peers "
                    "through the discovery service",
                )
            )
        # cluster identity: v1alpha1 cluster.id/cluster.secret (legacy) or a DiscoveryIdentityConfig, never both
        # (Talos: DiscoveryIdentityConfigV1Alpha1.V1Alpha1ConflictValidate)
        legacy_ident = _nonempty(v1_doc, "cluster", "id") or _nonempty(v1_doc, "cluster", "secret")
        if ident is not None and ident_ref is not None and legacy_ident:
            sink.problem(
                Problem(
                    d.DISCOVERY_IDENTITY_CONFIG,
                    ident_ref.index,
                    "",
                    f"must not be set together with v1alpha1 cluster.id/cluster.secret (document "
                    f"{v1_ref.index + 1}): the cluster identity goes in one of them",
                )
            )
        cluster_id, cluster_secret = v1.cluster_id, v1.cluster_secret
        if ident is not None and not legacy_ident:
            cluster_id, cluster_secret = ident.cluster_id, ident.cluster_secret
        needs_cluster = (
            "KubeSpan is enabled" if kubespan.enabled else "discovery is enabled" if discovery else ""
        )
        if needs_cluster and (ident is None or legacy_ident):  # a DiscoveryIdentityConfig checks its own
            either = f"{needs_cluster} (or give a {d.DISCOVERY_IDENTITY_CONFIG} document instead)"
            if v1.cluster_id is None and not _nonempty(v1_doc, "cluster", "id"):
                sink.problem(Problem(d.V1ALPHA1, v1_ref.index, "cluster.id", f"is required: {either}"))
            if v1.cluster_secret is None and not _nonempty(v1_doc, "cluster", "secret"):
                sink.problem(Problem(d.V1ALPHA1, v1_ref.index, "cluster.secret", f"is required: {either}"))

        # the mesh's own settings, from AgentConfig and the KubeSpan settings: checked here, once
        ks_doc_label, ks_prefix = (
            (d.KUBESPAN_CONFIG, "") if ks_doc is not None else (d.V1ALPHA1, "machine.network.kubespan.")
        )
        mesh_config: MeshConfig | None = None
        try:
            mesh_config = MeshConfig(
                **agent_mesh,  # field names and YAML types checked by read_agent
                mtu=kubespan.mtu,
                allow_down_peer_bypass=kubespan.allow_down_peer_bypass,
            )
        except ConfigError as e:
            for err in e.errors:
                if err.field in d.KUBESPAN_MESH_PATHS:
                    where = (ks_doc_label, ks_index, ks_prefix + d.KUBESPAN_MESH_PATHS[err.field])
                else:
                    where = (d.AGENT_CONFIG, agent_index, d.AGENT_MESH_PATHS.get(err.field, err.field))
                sink.problem(Problem(*where, err.rule))

        if only_negated(kubespan.endpoint_filters):
            sink.warn(
                ConfigWarning(
                    ks_label,
                    ks_index,
                    "filters.endpoints has only negated ('!') entries: as in Talos, they select no address, "
                    "so the node announces none of its own; list 0.0.0.0/0 and ::/0 first for 'all but these'",
                )
            )

        services_sorted = _check_services(services, kubespan.enabled, sink)

        if sink.problems or mesh_config is None:
            raise ConfigValidationError(sink.problems, tuple(sink.warnings))

        self = object.__new__(cls)
        self._docs = tuple(docs)
        self._canonical = None
        self._refs = tuple(refs)
        self._source = source
        self._v1 = v1
        self._kubespan = kubespan
        self._extra_endpoints = extra
        self._discovery = tuple(discovery)
        self._agent = agent
        self._services = services_sorted
        self._warnings = tuple(sink.warnings)
        self._strict = strict
        self._mesh = MeshSettings(
            enabled=kubespan.enabled,
            cluster_id=cluster_id or "",
            cluster_secret=cluster_secret or b"",
            discovery=tuple(discovery),
            config=mesh_config,
            state_dir=agent.state_dir,
            nodename=agent.nodename,
            backend=agent.backend,
            wireguard_go=agent.wireguard_go,
            socket_dir=agent.socket_dir,
            discovery_ca=agent.discovery_ca,
            advertise=agent.advertised_networks,
            advertise_kubernetes_networks=kubespan.advertise_kubernetes_networks,
            exclude=kubespan.exclude_advertised_networks,
            endpoint_filters=kubespan.endpoint_filters,
            extra_endpoints=extra,
            publish_learned=kubespan.harvest_extra_endpoints,
            mac=agent.mac,
            machine_type=v1.machine_type,
            api_server_port=v1.local_api_server_port if v1.machine_type == "controlplane" else None,
            stun_servers=agent.stun_servers,
            relay=agent.relay,
            punch_retry_initial=agent.punch_retry_initial,
            punch_retry_max=agent.punch_retry_max,
        )
        return self

    # -- views -------------------------------------------------------------------------------------

    @property
    def v1alpha1(self) -> V1Alpha1:
        """What machined uses of the ``version: v1alpha1`` document."""
        return self._v1

    @property
    def kubespan(self) -> KubeSpanSettings:
        """Effective KubeSpan settings (``KubeSpanConfig`` or ``machine.network.kubespan``)."""
        return self._kubespan

    @property
    def extra_announced_endpoints(self) -> tuple[AddrPort, ...]:
        return self._extra_endpoints

    @property
    def discovery_endpoints(self) -> tuple[DiscoveryEndpoint, ...]:
        """Discovery services to register with; empty when discovery is off."""
        return self._discovery

    @property
    def agent(self) -> AgentSettings:
        """Our ``AgentConfig`` (defaults when the document is absent)."""
        return self._agent

    @property
    def warnings(self) -> tuple[ConfigWarning, ...]:
        return self._warnings

    def mesh(self) -> MeshSettings:
        """What the mesh needs: cluster id and secret, discovery URLs, MeshConfig, networks, endpoints."""
        return self._mesh

    def mesh_options(self, hostname: str) -> MeshOptions:
        """``kubespan.engine.MeshOptions`` for the engine (``MeshSettings.options``)."""
        return self._mesh.options(hostname)

    def services(self) -> tuple[ServiceSpec, ...]:
        """Supervised services, dependencies before dependents (document order otherwise)."""
        return self._services

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self._services if s.name == name), None)

    # -- documents and text ------------------------------------------------------------------------

    def documents(self) -> list[dict[str, Any]]:
        """The raw documents (deep copies; change them and call ``from_documents``)."""
        return copy.deepcopy(list(self._docs))

    def document_kinds(self) -> tuple[str, ...]:
        """Labels of the documents in order (``v1alpha1``, ``ServiceConfig[etcd]``, ...)."""
        return tuple(r.label if r else f"document {i + 1}" for i, r in enumerate(self._refs))

    def to_yaml(self) -> str:
        """The config as text: the original text when parsed from text (comments kept)."""
        return self._source if self._source is not None else self.canonical_yaml()

    def canonical_yaml(self) -> str:
        """The documents as YAML (rendered once: the MachineConfig resource shows it on every read)."""
        if self._canonical is None:
            self._canonical = dump_documents(self._docs)
        return self._canonical

    def redacted_yaml(self) -> str:
        """Canonical YAML with every secret replaced by ``<redacted>``."""
        return dump_documents([redact(_kind(r), doc) for r, doc in zip(self._refs, self._docs, strict=True)])

    def diff(self, new: MachineConfig) -> str:
        """Readable unified diff from this config to ``new`` with secrets redacted (changed ones marked)."""
        return config_diff(self, new)

    def changes(self, new: MachineConfig) -> ChangeEffects:
        """What switching from this config to ``new`` means for the running agent."""
        return change_effects(self, new)

    def patch(self, *patches: Patch | str | bytes) -> MachineConfig:
        """Apply strategic merge and/or JSON patches in order; returns a new validated config."""
        from machined.config.patch import apply_patches

        return MachineConfig.from_documents(apply_patches(self.documents(), patches), strict=self._strict)

    # -- identity ----------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MachineConfig):
            return NotImplemented
        return self._docs == other._docs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MachineConfig({', '.join(self.document_kinds())})"


def _kind(ref: DocRef | None) -> str:
    return ref.kind if ref else ""


def _present(doc: Any, *keys: str) -> bool:
    """Whether ``keys`` lead to a non-null value."""
    for k in keys:
        if not isinstance(doc, dict) or doc.get(k) is None:
            return False
        doc = doc[k]
    return True


def _nonempty(doc: Any, *keys: str) -> bool:
    """Whether the value at ``keys`` is set: not absent, null or "" (as Talos's ``!= ""``)."""
    for k in keys:
        if not isinstance(doc, dict) or doc.get(k) is None:
            return False
        doc = doc[k]
    return doc != ""


def _check_services(
    services: list[tuple[DocRef, ServiceSpec]], mesh_enabled: bool, sink: Sink
) -> tuple[ServiceSpec, ...]:
    by_name = {s.name: (ref, s) for ref, s in services}
    for ref, s in services:
        for dep in s.depends_on:
            if dep == s.name:
                sink.problem(Problem(ref.label, ref.index, "dependsOn", "must not name the service itself"))
            elif dep not in by_name:
                sink.problem(
                    Problem(ref.label, ref.index, "dependsOn", f"names {dep!r}, which is not a ServiceConfig")
                )
        if s.requires_mesh.mode != "none" and not mesh_enabled:
            sink.problem(
                Problem(
                    ref.label,
                    ref.index,
                    "requiresMesh",
                    "needs KubeSpan enabled (KubeSpanConfig enabled: true, or machine.network.kubespan.enabled)",
                )
            )
    # stable topological order; a cycle is reported once per service on it
    order: list[ServiceSpec] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2 or name not in by_name:
            return
        if state.get(name) == 1:
            cycle = [*trail[trail.index(name) :], name]
            ref = by_name[name][0]
            sink.problem(
                Problem(ref.label, ref.index, "dependsOn", f"forms a dependency cycle: {' -> '.join(cycle)}")
            )
            return
        state[name] = 1
        for dep in by_name[name][1].depends_on:
            if dep != name:
                visit(dep, [*trail, name])
        state[name] = 2
        order.append(by_name[name][1])

    for _, s in services:
        visit(s.name, [])
    return tuple(order)


def config_diff(old: MachineConfig | None, new: MachineConfig) -> str:
    """Unified diff of the canonical YAML with secrets redacted; documents are paired by kind and name."""
    old_pairs = {}
    if old is not None:
        old_pairs = {
            (r.key if r else ("", str(i))): (r, doc)
            for i, (r, doc) in enumerate(zip(old._refs, old._docs, strict=True))
        }
    new_out: list[Any] = []
    old_red: dict[Any, Any] = {}
    for i, (r, doc) in enumerate(zip(new._refs, new._docs, strict=True)):
        key = r.key if r else ("", str(i))
        if key in old_pairs:
            o, n = redacted_pair(_kind(r), old_pairs[key][1], doc)
            old_red[key] = o
            new_out.append(n)
        else:
            new_out.append(redact(_kind(r), doc))
    old_out = []
    if old is not None:
        for key, (r, doc) in old_pairs.items():
            old_out.append(old_red[key] if key in old_red else redact(_kind(r), doc))
    old_text = dump_documents(old_out) if old_out else ""
    return unified_diff(old_text, dump_documents(new_out))


def change_effects(old: MachineConfig | None, new: MachineConfig) -> ChangeEffects:
    if old is None:
        return ChangeEffects(
            mesh_restart=("enabled",) if new.mesh().enabled else (),
            services_added=tuple(s.name for s in new.services()),
        )
    mesh_changed = _mesh_diff(old.mesh(), new.mesh())
    old_svc = {s.name: s for s in old.services()}
    new_svc = {s.name: s for s in new.services()}
    next_start = []
    if old.agent.state_dir != new.agent.state_dir:
        next_start.append("AgentConfig.stateDir")
    if old.agent.http_status_addr != new.agent.http_status_addr:
        next_start.append("AgentConfig.httpStatusAddr")
    return ChangeEffects(
        mesh_restart=tuple(mesh_changed),
        mesh_cleanup=any(f in MESH_CLEANUP_FIELDS for f in mesh_changed),
        services_added=tuple(n for n in new_svc if n not in old_svc),
        services_removed=tuple(n for n in old_svc if n not in new_svc),
        services_changed=tuple(n for n in new_svc if n in old_svc and old_svc[n] != new_svc[n]),
        next_start=tuple(next_start),
    )
