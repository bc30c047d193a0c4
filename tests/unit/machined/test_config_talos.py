"""A Talos controlplane.yaml (as ``talosctl gen config demo https://10.5.0.2:6443 --with-kubespan`` writes
it, v1.9 schema) loads: what machined uses is read, the rest is accepted with one warning listing the paths.

The fixture was written from the documented v1alpha1 schema; its certificates and keys were generated for
this test (Ed25519 OS CA with Talos's ``ED25519 PRIVATE KEY`` PEM type, ECDSA Kubernetes/etcd CAs).
"""

from __future__ import annotations

import base64

import pytest

from machined.config import DEFAULT_DISCOVERY_ENDPOINT, ConfigValidationError, MachineConfig
from machined.config.redact import REDACTED, secret_values
from machined.config.yamlio import load_documents

CONTROLPLANE_YAML = """\
version: v1alpha1 # Indicates the schema used to decode the contents.
debug: false # Enable verbose logging to the console.
persist: true
# Provides machine specific configuration options.
machine:
    type: controlplane # Defines the role of the machine within the cluster.
    token: hntnht.o33h4xtp4oa6jome # The `token` is used by a machine to join the PKI of the cluster.
    # The root certificate authority of the PKI.
    ca:
        crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSDBNSUdub0FNQ0FRSUNGRDJMeTJzMHU1QTY3bDE5UEhjVUZPTER0cGM0TUFVR0F5dGxjREFRTVE0d0RBWUQKVlFRS0RBVjBZV3h2Y3pBZUZ3MHlOVEF4TURFd01EQXdNREJhRncwek5ERXlNekF3TURBd01EQmFNQkF4RGpBTQpCZ05WQkFvTUJYUmhiRzl6TUNvd0JRWURLMlZ3QXlFQWxmcHYzZ0hWVGIvbmVTWUlNZmV2czdUaXJOek9WTHN4CkhwclFJK3Rnd0JhakV6QVJNQThHQTFVZEV3RUIvd1FGTUFNQkFmOHdCUVlESzJWd0EwRUFTZUJmT09Ua1Q2QXQKWnkyNjJvbkFEN3RlTmQyYmtIWUFRckt5VzRxWjRJdW90MU13RVkrT1ducFpRUytmd3BTREJ0VEY4NWwrZWRBRgpXdzdXOHp5bUNRPT0KLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=
        key: LS0tLS1CRUdJTiBFRDI1NTE5IFBSSVZBVEUgS0VZLS0tLS0KTUM0Q0FRQXdCUVlESzJWd0JDSUVJR2RWNlV4YW9GYlllTTVLRXhMbWk5N1U0MHlGcXRLcktMQWkwaVNrVzhwegotLS0tLUVORCBFRDI1NTE5IFBSSVZBVEUgS0VZLS0tLS0K
    # Extra certificate subject alternative names for the machine's certificate.
    certSANs:
        - 10.5.0.2
        - cp1.example.internal
    # Used to provide additional options to the kubelet.
    kubelet:
        image: ghcr.io/siderolabs/kubelet:v1.32.0 # The `image` field is an optional reference to an alternative kubelet image.
        defaultRuntimeSeccompProfileEnabled: true # Enable container runtime default Seccomp profile.
        disableManifestsDirectory: true # The `disableManifestsDirectory` field configures the kubelet to get static pod manifests from the /etc/kubernetes/manifests directory.
    # Provides machine specific network configuration options.
    network:
        hostname: cp1 # Used to statically set the hostname for the machine.
        # `interfaces` is used to define the network interface configuration.
        interfaces:
            - interface: eth0 # The interface name.
              dhcp: true # Indicates if DHCP should be used to configure the interface.
        # KubeSpan configuration.
        kubespan:
            enabled: true # Enable the KubeSpan feature.
            filters:
                # Filter node addresses which will be advertised as KubeSpan endpoints for peer-to-peer Wireguard connections.
                endpoints:
                    - 0.0.0.0/0
                    - '!192.168.0.0/16'
    # Used to provide instructions for installations.
    install:
        disk: /dev/sda # The disk used for installations.
        image: ghcr.io/siderolabs/installer:v1.9.0 # Allows for supplying the image used to perform the installation.
        wipe: false # Indicates if the installation disk should be wiped at installation time.
    # Used to configure the machine's container image registry mirrors.
    registries: {}
    # Features describe individual Talos features that can be switched on or off.
    features:
        rbac: true # Enable role-based access control (RBAC).
        stableHostname: true # Enable stable default hostname.
        apidCheckExtKeyUsage: true # Enable checks for extended key usage of client certificates in apid.
        diskQuotaSupport: true # Enable XFS project quota support for EPHEMERAL partition and user disks.
        # KubePrism - local proxy/load balancer on defined port that will distribute
        kubePrism:
            enabled: true # Enable KubePrism support - will start local load balancing proxy.
            port: 7445 # KubePrism port.
        # Configures host DNS caching resolver.
        hostDNS:
            enabled: true # Enable host DNS caching resolver.
            forwardKubeDNSToHost: true # Use the host DNS resolver as upstream for Kubernetes CoreDNS pods.
    # Configures the node labels for the machine.
    nodeLabels:
        node.kubernetes.io/exclude-from-external-load-balancers: ""
# Provides cluster specific configuration options.
cluster:
    id: /sHfzhUEo9ajXjMUYEniAI089Q8gjDCnUXgnryM1UUQ= # Globally unique identifier for this cluster (base64 encoded random 32 bytes).
    secret: Q7qiOPRFrYsvcBRWyqCTq4PlcZ6VzOwSdrj+4wjUn9k= # Shared secret of cluster (base64 encoded random 32 bytes).
    # Provides control plane specific configuration options.
    controlPlane:
        endpoint: https://10.5.0.2:6443 # Endpoint is the canonical controlplane endpoint, which can be an IP address or a DNS hostname.
    clusterName: demo # Configures the cluster's name.
    # Provides cluster specific network configuration options.
    network:
        dnsDomain: cluster.local # The domain used by Kubernetes DNS.
        # The pod subnet CIDR.
        podSubnets:
            - 10.244.0.0/16
        # The service subnet CIDR.
        serviceSubnets:
            - 10.96.0.0/12
    token: br4uv0.2855coux7ouh8wn7 # The [bootstrap token](https://kubernetes.io/docs/reference/access-authn-authz/bootstrap-tokens/) used to join the cluster.
    secretboxEncryptionSecret: eVu71mK09lqtlyF2urWEZRY+/CSPWbyRqF0glePlFAI= # A key used for the [encryption of secret data at rest](https://kubernetes.io/docs/tasks/administer-cluster/encrypt-data/).
    # The base64 encoded root certificate authority used by Kubernetes.
    ca:
        crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJQakNCNWFBREFnRUNBaFFCZVdlL01Wd2RoaWJuekM2TTRocWwzWWxTaURBS0JnZ3Foa2pPUFFRREFqQVYKTVJNd0VRWURWUVFLREFwcmRXSmxjbTVsZEdWek1CNFhEVEkxTURFd01UQXdNREF3TUZvWERUTTBNVEl6TURBdwpNREF3TUZvd0ZURVRNQkVHQTFVRUNnd0thM1ZpWlhKdVpYUmxjekJaTUJNR0J5cUdTTTQ5QWdFR0NDcUdTTTQ5CkF3RUhBMElBQkV4dkRoV0QvTytvZkFIeWw4QWhyMy9mTlYwbzNKc3pkTllhMzM4ck5CUTFjS21iOHhzblNQMTIKWTJTNmJzWk5HbHRsVEV3RXdMaUo2bHhJcUxKQ0ZxU2pFekFSTUE4R0ExVWRFd0VCL3dRRk1BTUJBZjh3Q2dZSQpLb1pJemowRUF3SURTQUF3UlFJaEFOKzBEM1BGV0E2a0xZbG5VTm9wQVJxYWdrcEdITjhXd2tSVVlkbks3ZlBECkFpQWNXK3JjYXhZV253dFpLNnpsTklVVjZ1Zll1aUtNQ1JDWGdMZDJxaXFaT1E9PQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==
        key: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCk1IY0NBUUVFSVB6cDRTejZ2QS9VVFNMZHpNN1hnNGticTFRK0w2czRYaUZ5Z213dFh5VzhvQW9HQ0NxR1NNNDkKQXdFSG9VUURRZ0FFVEc4T0ZZUDg3Nmg4QWZLWHdDR3ZmOTgxWFNqY216TjAxaHJmZnlzMEZEVndxWnZ6R3lkSQovWFpqWkxwdXhrMGFXMlZNVEFUQXVJbnFYRWlvc2tJV3BBPT0KLS0tLS1FTkQgRUMgUFJJVkFURSBLRVktLS0tLQo=
    # The base64 encoded aggregator certificate authority used by Kubernetes for front-proxy certificate generation.
    aggregatorCA:
        crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJVekNCKzZBREFnRUNBaFIyalR6Si9FM3E1dE1zWHhQTmJKOHdWUFp3MXpBS0JnZ3Foa2pPUFFRREFqQWcKTVI0d0hBWURWUVFLREJWcmRXSmxjbTVsZEdWekxXRm5aM0psWjJGMGIzSXdIaGNOTWpVd01UQXhNREF3TURBdwpXaGNOTXpReE1qTXdNREF3TURBd1dqQWdNUjR3SEFZRFZRUUtEQlZyZFdKbGNtNWxkR1Z6TFdGblozSmxaMkYwCmIzSXdXVEFUQmdjcWhrak9QUUlCQmdncWhrak9QUU1CQndOQ0FBVGcwTkNiNGxyZHdCQi9CeEF1TWttdGZKMHUKVkJiOXIxS0FEaGUvQ1YyQk9FRVJkUWd4TXJMTlRJOEdHWXNZYnMyVUFsamQ0TXNDdmo2VzhRZXNSWUkwb3hNdwpFVEFQQmdOVkhSTUJBZjhFQlRBREFRSC9NQW9HQ0NxR1NNNDlCQU1DQTBjQU1FUUNJRlV0SHc2eVhob0JKdnBRCmtUS2NkY1FrRDluTVI4TTFsRmRhMDVmNGhzdVdBaUFDSlJCbXloSjVwSVdRTGRXWUdzQVUrM1NsS01JQ1BkbXAKUXV6RVA2UlUzUT09Ci0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K
        key: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCk1IY0NBUUVFSUtkeEMwSVRnUlhDQVplZUhyVUplTkZseGRBM1ZsWWl2Q1VCN3JtS2tFdURvQW9HQ0NxR1NNNDkKQXdFSG9VUURRZ0FFNE5EUW0rSmEzY0FRZndjUUxqSkpyWHlkTGxRVy9hOVNnQTRYdndsZGdUaEJFWFVJTVRLeQp6VXlQQmhtTEdHN05sQUpZM2VETEFyNCtsdkVIckVXQ05BPT0KLS0tLS1FTkQgRUMgUFJJVkFURSBLRVktLS0tLQo=
    # The base64 encoded private key for service account token generation.
    serviceAccount:
        key: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCk1IY0NBUUVFSUJnd3ZRU29GRkk5dTJkOEZrQ1NFNUZvcXRBNnovZytGZ3lNT2VVbkZLYU9vQW9HQ0NxR1NNNDkKQXdFSG9VUURRZ0FFQjlEMElRQjNCQjlLUVBZbm91RjZxYjZ2dUl2RUtDeENTWjNTYW9nWkVLb3B3a1JLbmZ4YwpvUnFvRHpVVmpjbDJaQnQvRUhvWXhzcWtJb2tPV0laemhnPT0KLS0tLS1FTkQgRUMgUFJJVkFURSBLRVktLS0tLQo=
    # API server specific configuration options.
    apiServer:
        image: registry.k8s.io/kube-apiserver:v1.32.0 # The container image used in the API server manifest.
        # Extra certificate subject alternative names for the API server's certificate.
        certSANs:
            - 10.5.0.2
        disablePodSecurityPolicy: true # Disable PodSecurityPolicy in the API server and default manifests.
        # Configure the API server admission plugins.
        admissionControl:
            - name: PodSecurity # Name is the name of the admission controller.
              # Configuration is an embedded configuration object to be used as the plugin's
              configuration:
                apiVersion: pod-security.admission.config.k8s.io/v1alpha1
                defaults:
                    audit: restricted
                    audit-version: latest
                    enforce: baseline
                    enforce-version: latest
                    warn: restricted
                    warn-version: latest
                exemptions:
                    namespaces:
                        - kube-system
                    runtimeClasses: []
                    usernames: []
                kind: PodSecurityConfiguration
        # Configure the API server audit policy.
        auditPolicy:
            apiVersion: audit.k8s.io/v1
            kind: Policy
            rules:
                - level: Metadata
    # Controller manager server specific configuration options.
    controllerManager:
        image: registry.k8s.io/kube-controller-manager:v1.32.0 # The container image used in the controller manager manifest.
    # Kube-proxy server-specific configuration options
    proxy:
        image: registry.k8s.io/kube-proxy:v1.32.0 # The container image used in the kube-proxy manifest.
    # Scheduler server specific configuration options.
    scheduler:
        image: registry.k8s.io/kube-scheduler:v1.32.0 # The container image used in the scheduler manifest.
    # Configures cluster member discovery.
    discovery:
        enabled: true # Enable the cluster membership discovery feature.
        # Configure registries used for cluster member discovery.
        registries:
            # Kubernetes registry uses Kubernetes API server to discover cluster members and stores additional information
            kubernetes:
                disabled: true # Disable Kubernetes discovery registry.
            # Service registry is using an external service to push and pull information about cluster members.
            service: {}
    # Etcd specific configuration options.
    etcd:
        # The `ca` is the root certificate authority of the PKI.
        ca:
            crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJNakNCMmFBREFnRUNBaFFnbTVQWE0yQnlRTlQzUUVYK1h5cmxzTndlNWpBS0JnZ3Foa2pPUFFRREFqQVAKTVEwd0N3WURWUVFLREFSbGRHTmtNQjRYRFRJMU1ERXdNVEF3TURBd01Gb1hEVE0wTVRJek1EQXdNREF3TUZvdwpEekVOTUFzR0ExVUVDZ3dFWlhSalpEQlpNQk1HQnlxR1NNNDlBZ0VHQ0NxR1NNNDlBd0VIQTBJQUJKdFVMWmVMClZDL2N3RExjd2gzUXdWRUJtV3JqY0RmcG5xNXo0YUVMekhCR1BwQ2tWeVhjdWJuL2l4akNncENDai9jdVJubXgKMm1sS0R1TU11S1VDQU5TakV6QVJNQThHQTFVZEV3RUIvd1FGTUFNQkFmOHdDZ1lJS29aSXpqMEVBd0lEU0FBdwpSUUlnUEp2a0ZTWC80bjhrSXUvMkh5Snhyd0ZSWE1LTnBZTjh6b3VMWGsyTEZQUUNJUURrc3VoRmkxSXdLTStnClhrYmFuRSs1WXlFWkZJTDNKdE05M2RvUEhTaWVBQT09Ci0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K
            key: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCk1IY0NBUUVFSUpBNkFYZGsyTGU0bE5zTmMyUkVGcUM0dVI0T0Fmd0NIYXppWTFMY01iZGxvQW9HQ0NxR1NNNDkKQXdFSG9VUURRZ0FFbTFRdGw0dFVMOXpBTXR6Q0hkREJVUUdaYXVOd04rbWVyblBob1F2TWNFWStrS1JYSmR5NQp1ZitMR01LQ2tJS1A5eTVHZWJIYWFVb080d3k0cFFJQTFBPT0KLS0tLS1FTkQgRUMgUFJJVkFURSBLRVktLS0tLQo=
    extraManifests: []
    inlineManifests: []
"""

TALOS_SECRETS = secret_values("v1alpha1", load_documents(CONTROLPLANE_YAML)[0])


def test_secret_inventory_covers_every_talos_secret():
    # cluster.secret, machine.token, machine.ca.key, cluster.token, secretbox, 3 CA keys, SA key
    assert len(TALOS_SECRETS) == 9


def test_controlplane_loads_with_one_warning_listing_unused_paths():
    cfg = MachineConfig.parse(CONTROLPLANE_YAML)
    assert len(cfg.warnings) == 1
    w = cfg.warnings[0]
    assert w.document == "v1alpha1"
    assert w.index == 0
    for path in (
        "v1alpha1.debug",
        "v1alpha1.machine.kubelet",
        "v1alpha1.machine.install",
        "v1alpha1.machine.network.interfaces",
        "v1alpha1.machine.features",
        "v1alpha1.cluster.apiServer",
        "v1alpha1.cluster.etcd",
        "v1alpha1.cluster.secretboxEncryptionSecret",
        "v1alpha1.cluster.discovery.registries.kubernetes",
    ):
        assert path in w.paths
    # what we use is not listed as unused
    used_paths = (
        "v1alpha1.cluster.secret",
        "v1alpha1.machine.ca",
        "v1alpha1.machine.network.kubespan",
        "v1alpha1.cluster.controlPlane",  # endpoint: checked (gen config's ENDPOINT), so not "unused"
    )
    for used in used_paths:
        assert not any(p == used or p.startswith(used + ".") for p in w.paths)
    assert cfg.v1alpha1.control_plane_endpoint == "https://10.5.0.2:6443"
    text = str(w)
    assert "not used by machined" in text
    assert not any(s in text for s in TALOS_SECRETS)


def test_controlplane_values_are_read():
    cfg = MachineConfig.parse(CONTROLPLANE_YAML)
    v1 = cfg.v1alpha1
    assert v1.machine_type == "controlplane"
    assert v1.cluster_name == "demo"
    assert v1.cert_sans == ("10.5.0.2", "cp1.example.internal")
    assert v1.ca is not None and v1.ca.crt.startswith(b"-----BEGIN CERTIFICATE-----")
    assert v1.ca.key is not None and b"ED25519 PRIVATE KEY" in v1.ca.key
    mesh = cfg.mesh()
    assert mesh.enabled
    assert mesh.cluster_id == v1.cluster_id
    assert len(mesh.cluster_secret) == 32
    assert mesh.discovery_urls == (DEFAULT_DISCOVERY_ENDPOINT,)
    assert mesh.discovery[0].name == "legacy"
    assert mesh.endpoint_filters == ("0.0.0.0/0", "!192.168.0.0/16")
    assert mesh.config.mtu == 1420 and mesh.config.link_name == "kubespan"
    assert cfg.services() == ()


def test_reprs_and_redacted_yaml_hide_every_secret():
    cfg = MachineConfig.parse(CONTROLPLANE_YAML)
    shown = "\n".join(
        [repr(cfg), repr(cfg.v1alpha1), repr(cfg.mesh()), cfg.redacted_yaml(), *map(str, cfg.warnings)]
    )
    for s in TALOS_SECRETS:
        assert s not in shown
    assert shown.count(REDACTED) >= len(TALOS_SECRETS)
    # certificates are not secrets and stay visible
    assert load_documents(CONTROLPLANE_YAML)[0]["machine"]["ca"]["crt"] in cfg.redacted_yaml()


def test_worker_variant_has_ca_without_key():
    cfg = MachineConfig.parse(CONTROLPLANE_YAML).patch(
        '[{"op": "replace", "path": "/machine/type", "value": "worker"},'
        ' {"op": "remove", "path": "/machine/ca/key"}]'
    )
    assert cfg.v1alpha1.machine_type == "worker"
    assert cfg.v1alpha1.ca is not None and cfg.v1alpha1.ca.key is None


PATCH_TO_TYPED_DOCUMENTS = """\
machine:
  network:
    kubespan:
      $patch: delete
cluster:
  discovery:
    $patch: delete
---
apiVersion: v1alpha1
kind: KubeSpanConfig
enabled: true
harvestExtraEndpoints: false
mtu: 1380
filters:
  endpoints: ["10.0.0.0/8"]
  excludeAdvertisedNetworks: ["10.96.0.0/12"]
---
apiVersion: v1alpha1
kind: KubeSpanEndpointsConfig
extraAnnouncedEndpoints:
  - 203.0.113.7:51820
  - "[2001:db8::7]:51820"
---
apiVersion: v1alpha1
kind: DiscoveryServiceConfig
name: self-hosted
endpoint: https://discovery.example.net:3000/
"""


def test_typed_kubespan_documents_as_newer_talos_writes_them():
    text = CONTROLPLANE_YAML.replace(
        "        kubespan:\n            enabled: true # Enable the KubeSpan feature.\n",
        "        kubespan:\n            enabled: true\n",
    )
    cfg = MachineConfig.parse(text).patch(PATCH_TO_TYPED_DOCUMENTS)
    mesh = cfg.mesh()
    assert mesh.config.mtu == 1380
    assert mesh.publish_learned is False  # harvestExtraEndpoints: false is honoured
    assert [str(n) for n in mesh.exclude] == ["10.96.0.0/12"]
    assert [str(e) for e in mesh.extra_endpoints] == ["203.0.113.7:51820", "[2001:db8::7]:51820"]
    # cluster.discovery removed: Talos refuses it together with DiscoveryServiceConfig documents
    assert [(e.name, e.url) for e in mesh.discovery] == [
        ("self-hosted", "https://discovery.example.net:3000/")
    ]
    assert not [w for w in cfg.warnings if w.document == "KubeSpanConfig"]


def test_a_field_talos_does_not_know_is_refused_unless_lenient():
    """Talos decodes strictly (a key its types lack fails the config); --config-lenient warns instead."""
    patch = PATCH_TO_TYPED_DOCUMENTS.replace(
        "  excludeAdvertisedNetworks:", '  peerEndpoints: ["!100.64.0.0/10"]\n  excludeAdvertisedNetworks:'
    )
    base = MachineConfig.parse(CONTROLPLANE_YAML)
    with pytest.raises(ConfigValidationError) as e:
        base.patch(patch)
    (p,) = e.value.problems
    assert (p.location, p.index) == ("KubeSpanConfig.filters.peerEndpoints", 1)
    assert p.rule.startswith("unknown field") and "--config-lenient" in p.rule
    lenient = MachineConfig.parse(CONTROLPLANE_YAML, strict=False).patch(patch)  # patches keep the mode
    (w,) = [w for w in lenient.warnings if w.document == "KubeSpanConfig"]
    assert w.paths == ("KubeSpanConfig.filters.peerEndpoints",)
    assert "a Talos node refuses this document" in w.message


def test_kubespan_in_both_places_is_an_error_as_in_talos():
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(
            CONTROLPLANE_YAML + "---\napiVersion: v1alpha1\nkind: KubeSpanConfig\nenabled: true\n"
        )
    (p,) = e.value.problems
    assert p.location == "v1alpha1.machine.network.kubespan"
    assert "KubeSpanConfig" in p.rule and "document 2" in p.rule


def test_unknown_talos_document_kind_is_kept_with_a_warning():
    extra = "---\napiVersion: v1alpha1\nkind: ExampleFutureConfig\nname: x\nsetting: 1\n"
    cfg = MachineConfig.parse(CONTROLPLANE_YAML + extra)
    assert cfg.document_kinds()[-1] == "ExampleFutureConfig[x]"
    assert any("ExampleFutureConfig" in str(w) and "not used" in str(w) for w in cfg.warnings)
    assert "setting: 1" in cfg.canonical_yaml()


def test_invalid_secrets_in_the_talos_file_are_reported_without_their_values():
    bad_secret = base64.b64encode(b"0123456789abcdef").decode()  # 16 bytes
    docs = load_documents(CONTROLPLANE_YAML)
    docs[0]["cluster"]["secret"] = bad_secret
    docs[0]["machine"]["token"] = "NOT-A-VALID-TOKEN-xyz"
    docs[0]["machine"]["ca"]["key"] = base64.b64encode(b"hunter2-not-a-pem").decode()
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.from_documents(docs)
    text = str(e.value)
    assert {p.location for p in e.value.problems} == {
        "v1alpha1.cluster.secret",
        "v1alpha1.machine.token",
        "v1alpha1.machine.ca.key",
    }
    assert "must be base64 of 32 bytes" in text
    for s in (bad_secret, "NOT-A-VALID-TOKEN-xyz", docs[0]["machine"]["ca"]["key"], "hunter2"):
        assert s not in text
