"""Strict decoding of Talos's documents (issue 16 item 8): a key Talos's config types do not have fails the
config, as on a Talos node (Talos runs siderolabs/gen ``xyaml.CheckUnknownKeys`` on every document), naming
the document and the key path; lenient mode (``--config-lenient`` / ``MACHINED_CONFIG_LENIENT``) lists the
same keys in a warning. Keys Talos knows but machined does not use stay accepted (one warning); our own
kinds keep rejecting unknown fields in both modes; Talos kinds machined does not parse are not checked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from machined.config import ConfigValidationError, MachineConfig, talos_keys
from machined.config.testing import config_yaml
from machined.config.yamlio import load_documents

SECRET = "0s0kXnX3mC5vX1tVYt2m4o8Rz7kqYw2m5c8l0a3b6dE="
Docs = list[dict[str, Any]]


def base() -> Docs:
    return load_documents(
        config_yaml(
            secret=SECRET,
            agent={"stateDir": "/var/lib/m"},
            services=[{"name": "app", "command": "/bin/true"}],
        )
    )


def kind_doc(docs: Docs, kind: str) -> dict[str, Any]:
    return next(d for d in docs if d.get("kind", "v1alpha1" if "version" in d else None) == kind)


def setting(kind: str, path: str, value: Any) -> Callable[[Docs], None]:
    """Set ``path`` (dots; ``[N]`` not needed: lists are given whole) in the document of ``kind``."""

    def edit(docs: Docs) -> None:
        node = kind_doc(docs, kind)
        *head, last = path.split(".")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = copy.deepcopy(value)

    return edit


def adding(document: dict[str, Any]) -> Callable[[Docs], None]:
    def edit(docs: Docs) -> None:
        docs.append(copy.deepcopy(document))

    return edit


def removing(kind: str) -> Callable[[Docs], None]:
    def edit(docs: Docs) -> None:
        docs.remove(kind_doc(docs, kind))

    return edit


def both(*edits: Callable[[Docs], None]) -> Callable[[Docs], None]:
    def edit(docs: Docs) -> None:
        for e in edits:
            e(docs)

    return edit


# (case id, edit, the unknown paths as reported: "<document>.<path>", the hint expected in the first rule)
REFUSED: list[tuple[str, Callable[[Docs], None], list[str], str]] = [
    (
        "top-level typo",
        setting("v1alpha1", "machines", {"type": "worker"}),
        ["v1alpha1.machines"],
        "'machine'",
    ),
    (
        "nested typo under a field machined ignores",
        setting("v1alpha1", "machine.kubelet", {"image": "k", "imagee": "x"}),
        ["v1alpha1.machine.kubelet.imagee"],
        "'image'",
    ),
    (
        "in a list item",
        setting(
            "v1alpha1",
            "machine.network.interfaces",
            [{"interface": "eth0"}, {"interface": "eth1", "dhpc": True}],
        ),
        ["v1alpha1.machine.network.interfaces[1].dhpc"],
        "'dhcp'",
    ),
    (
        "below a map entry (registry mirrors)",
        setting("v1alpha1", "machine.registries.mirrors", {"docker.io": {"endpoint": ["https://m"]}}),
        ["v1alpha1.machine.registries.mirrors.docker.io.endpoint"],
        "'endpoints'",
    ),
    ("a null value counts too", setting("v1alpha1", "cluster.foo", None), ["v1alpha1.cluster.foo"], ""),
    (
        "in the KubeSpan block of v1alpha1",
        both(
            removing("KubeSpanConfig"),
            setting("v1alpha1", "machine.network.kubespan", {"enabled": True, "mut": 1400}),
        ),
        ["v1alpha1.machine.network.kubespan.mut"],
        "'mtu'",
    ),
    (
        "two at once, in document order",
        setting(
            "v1alpha1",
            "machine.features",
            {"rbac": True, "kubePrism": {"enabled": True, "prot": 7445}, "x": 1},
        ),
        ["v1alpha1.machine.features.kubePrism.prot", "v1alpha1.machine.features.x"],
        "'port'",
    ),
    (
        "KubeSpanConfig",
        setting("KubeSpanConfig", "filters.endpoint", ["0.0.0.0/0"]),
        ["KubeSpanConfig.filters.endpoint"],
        "'endpoints'",
    ),
    (
        "KubeSpanEndpointsConfig",
        adding({"apiVersion": "v1alpha1", "kind": "KubeSpanEndpointsConfig", "extraAnnouncedEndpoint": []}),
        ["KubeSpanEndpointsConfig.extraAnnouncedEndpoint"],
        "'extraAnnouncedEndpoints'",
    ),
    (
        "DiscoveryServiceConfig (named)",
        setting("DiscoveryServiceConfig", "caFile", "/etc/ca.pem"),
        ["DiscoveryServiceConfig[ds0].caFile"],
        "",
    ),
    (
        "DiscoveryIdentityConfig",
        both(
            setting("v1alpha1", "cluster", {"clusterName": "test"}),
            adding(
                {
                    "apiVersion": "v1alpha1",
                    "kind": "DiscoveryIdentityConfig",
                    "clusterID": "c",
                    "clusterSecret": SECRET,
                    "clusterName": "x",
                }
            ),
        ),
        ["DiscoveryIdentityConfig.clusterName"],
        "'clusterID'",
    ),
]

# keys Talos knows (machined ignores them: one warning), or whose values Talos does not check by key
ACCEPTED: list[tuple[str, Callable[[Docs], None]]] = [
    (
        "any key in a map (kubelet.extraArgs)",
        setting("v1alpha1", "machine.kubelet.extraArgs", {"any-flag": "1"}),
    ),
    (
        "any key in a map of structs (registries.config)",
        setting("v1alpha1", "machine.registries.config", {"r.io": {"auth": {"username": "u"}}}),
    ),
    (
        "Unstructured values (machine.pods)",
        setting("v1alpha1", "machine.pods", [{"apiVersion": "v1", "kind": "Pod", "spec": {"x": 1}}]),
    ),
    (
        "Unstructured values (kubelet.extraConfig)",
        setting("v1alpha1", "machine.kubelet.extraConfig", {"anything": {"deep": 1}}),
    ),
    ("deprecated fields Talos still decodes", setting("v1alpha1", "cluster.allowSchedulingOnMasters", True)),
    (
        "machine.install.extensions",
        setting("v1alpha1", "machine.install.extensions", [{"image": "ghcr.io/x:1"}]),
    ),
    (
        "cluster.controlPlane.localAPIServerPort",
        setting(
            "v1alpha1", "cluster.controlPlane", {"endpoint": "https://a:6443", "localAPIServerPort": 443}
        ),
    ),
    (
        "a Talos kind machined does not parse is not checked",
        adding({"apiVersion": "v1alpha1", "kind": "HostnameConfig", "hostnamee": "x"}),
    ),
]


@pytest.mark.parametrize(("edit", "paths", "hint"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_unknown_keys_of_talos_documents_are_refused(
    edit: Callable[[Docs], None], paths: list[str], hint: str
) -> None:
    docs = base()
    edit(docs)
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs, strict=True)
    problems = e.value.problems
    assert [p.location for p in problems] == paths
    for p in problems:
        assert p.rule.startswith("unknown field") and "--config-lenient" in p.rule
    if hint:
        assert f"did you mean {hint}?" in problems[0].rule
    else:
        assert "did you mean" not in problems[0].rule
    assert paths[0] in str(e.value)  # the message names the document and the path


@pytest.mark.parametrize(("edit", "paths"), [c[1:3] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_lenient_mode_accepts_them_with_one_warning(edit: Callable[[Docs], None], paths: list[str]) -> None:
    docs = base()
    edit(docs)
    cfg = MachineConfig.from_documents(docs, strict=False)
    unknown = [w for w in cfg.warnings if "unknown to Talos" in w.message]
    assert [p for w in unknown for p in w.paths] == paths
    assert "a Talos node refuses this document" in str(unknown[0])
    # not listed a second time among the fields machined does not use
    others = [p for w in cfg.warnings if w not in unknown for p in w.paths]
    assert not set(paths) & set(others)


@pytest.mark.parametrize("edit", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_keys_talos_knows_are_accepted_in_strict_mode(edit: Callable[[Docs], None]) -> None:
    docs = base()
    edit(docs)
    cfg = MachineConfig.from_documents(docs, strict=True)
    assert not [w for w in cfg.warnings if "unknown to Talos" in w.message]


@pytest.mark.parametrize("strict", [True, False])
def test_our_own_kinds_reject_unknown_fields_in_both_modes(strict: bool) -> None:
    docs = base()
    kind_doc(docs, "AgentConfig")["stateDirr"] = "/x"
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs, strict=strict)
    (p,) = e.value.problems
    assert p.location == "AgentConfig.stateDirr" and p.rule.startswith("unknown field")


def test_the_process_default_comes_from_the_environment_or_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = base()
    kind_doc(docs, "KubeSpanConfig")["enabeld"] = True
    text = config_yaml(secret=SECRET)  # valid, no unknown keys
    monkeypatch.delenv(talos_keys.LENIENT_ENV, raising=False)
    monkeypatch.setattr(talos_keys, "_strict_override", None)
    assert talos_keys.strict_default() is True
    with pytest.raises(ConfigValidationError):
        MachineConfig.from_documents(docs)
    monkeypatch.setenv(talos_keys.LENIENT_ENV, "1")
    assert talos_keys.strict_default() is False
    assert MachineConfig.from_documents(docs).warnings
    assert MachineConfig.parse(text).warnings == ()
    talos_keys.set_strict_default(True)  # machined without --config-lenient wins over the environment
    try:
        with pytest.raises(ConfigValidationError):
            MachineConfig.from_documents(docs)
        # an explicit argument wins over both
        assert MachineConfig.from_documents(docs, strict=False).warnings
    finally:
        talos_keys.set_strict_default(None)
    assert talos_keys.strict_default() is False  # back to the environment


def test_suggestions_look_at_the_keys_beside_the_unknown_one() -> None:
    tree = talos_keys.V1ALPHA1
    assert talos_keys.suggestion(tree, ("machine", "network", "interfaces", 0, "adresses")) == (
        "did you mean 'addresses'?"
    )
    assert talos_keys.suggestion(tree, ("cluster", "etcd", "zzz")) == ""
    assert talos_keys.known_siblings(tree, ("machine", "registries", "mirrors", "x", "y")) == (
        "endpoints",
        "overridePath",
        "skipFallback",
    )
