"""Which keys Talos accepts in its documents, and the keys of a document that it would refuse.

Talos decodes its config documents strictly: after decoding, every key of the YAML must be a field of
the document's Go type (``xyaml.CheckUnknownKeys`` in siderolabs/gen, called by the config loader's
decoder), else the whole config is refused ("unknown keys found during decoding"). Mappings typed as
Go maps take any key; ``meta.Unstructured`` values (``machine.pods``, ``kubelet.extraConfig`` ...)
take anything; values are not checked here, only key names.

:data:`TREES` holds the key trees of the Talos document kinds machined parses. A tree is a ``dict``
of known keys (a Go struct); a key's value is the subtree: ``None`` for a value whose keys are not
checked (scalars, lists of scalars, ``Unstructured``), a one-element ``list`` for a list of that
subtree, and ``{"*": subtree}`` for a map with any key. The key names are facts taken from the
``yaml`` tags of Talos v1.14's config types (branch release-1.14, commit 7a84d742,
``pkg/machinery/config/types/{v1alpha1,network,cluster}``); fields Talos marks deprecated are still
decoded by Talos, so they are here too.

Strict mode (the default) makes such keys errors, as on a Talos node; ``machined --config-lenient``
or ``MACHINED_CONFIG_LENIENT=1`` turns them into one warning per document, for migrating configs.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

KeyTree = dict[str, Any]  # see the module docstring
ANY_KEY = "*"
LENIENT_ENV = "MACHINED_CONFIG_LENIENT"

_META = {"apiVersion": None, "kind": None}

# version: v1alpha1 (v1alpha1.Config)
V1ALPHA1: KeyTree = {
    "version": None,
    "debug": None,
    "persist": None,
    "machine": {
        "type": None,
        "token": None,
        "ca": {"crt": None, "key": None},
        "acceptedCAs": [{"crt": None}],
        "certSANs": None,
        "controlPlane": {"controllerManager": {"disabled": None}, "scheduler": {"disabled": None}},
        "kubelet": {
            "image": None,
            "clusterDNS": None,
            "extraArgs": {"*": None},
            "extraMounts": [
                {
                    "destination": None,
                    "type": None,
                    "source": None,
                    "options": None,
                    "uidMappings": [{"containerID": None, "hostID": None, "size": None}],
                    "gidMappings": [{"containerID": None, "hostID": None, "size": None}],
                }
            ],
            "extraConfig": None,
            "credentialProviderConfig": None,
            "defaultRuntimeSeccompProfileEnabled": None,
            "registerWithFQDN": None,
            "nodeIP": {"validSubnets": None},
            "skipNodeRegistration": None,
            "disableManifestsDirectory": None,
        },
        "pods": None,
        "network": {
            "hostname": None,
            "interfaces": [
                {
                    "interface": None,
                    "deviceSelector": {
                        "busPath": None,
                        "hardwareAddr": None,
                        "permanentAddr": None,
                        "pciID": None,
                        "driver": None,
                        "physical": None,
                    },
                    "addresses": None,
                    "cidr": None,
                    "routes": [
                        {"network": None, "gateway": None, "source": None, "metric": None, "mtu": None}
                    ],
                    "bond": {
                        "interfaces": None,
                        "deviceSelectors": [
                            {
                                "busPath": None,
                                "hardwareAddr": None,
                                "permanentAddr": None,
                                "pciID": None,
                                "driver": None,
                                "physical": None,
                            }
                        ],
                        "arpIPTarget": None,
                        "mode": None,
                        "xmitHashPolicy": None,
                        "lacpRate": None,
                        "adActorSystem": None,
                        "arpValidate": None,
                        "arpAllTargets": None,
                        "primary": None,
                        "primaryReselect": None,
                        "failOverMac": None,
                        "adSelect": None,
                        "miimon": None,
                        "updelay": None,
                        "downdelay": None,
                        "arpInterval": None,
                        "resendIgmp": None,
                        "minLinks": None,
                        "lpInterval": None,
                        "packetsPerSlave": None,
                        "numPeerNotif": None,
                        "tlbDynamicLb": None,
                        "allSlavesActive": None,
                        "useCarrier": None,
                        "adActorSysPrio": None,
                        "adUserPortKey": None,
                        "peerNotifyDelay": None,
                    },
                    "bridge": {"interfaces": None, "stp": {"enabled": None}, "vlan": {"vlanFiltering": None}},
                    "bridgePort": {"master": None},
                    "vlans": [
                        {
                            "addresses": None,
                            "cidr": None,
                            "routes": [
                                {
                                    "network": None,
                                    "gateway": None,
                                    "source": None,
                                    "metric": None,
                                    "mtu": None,
                                }
                            ],
                            "dhcp": None,
                            "vlanId": None,
                            "mtu": None,
                            "vip": {
                                "ip": None,
                                "equinixMetal": {"apiToken": None},
                                "hcloud": {"apiToken": None},
                            },
                            "dhcpOptions": {"routeMetric": None, "ipv4": None, "ipv6": None, "duidv6": None},
                        }
                    ],
                    "mtu": None,
                    "dhcp": None,
                    "ignore": None,
                    "dummy": None,
                    "dhcpOptions": {"routeMetric": None, "ipv4": None, "ipv6": None, "duidv6": None},
                    "wireguard": {
                        "privateKey": None,
                        "listenPort": None,
                        "firewallMark": None,
                        "peers": [
                            {
                                "publicKey": None,
                                "endpoint": None,
                                "persistentKeepaliveInterval": None,
                                "allowedIPs": None,
                            }
                        ],
                    },
                    "vip": {"ip": None, "equinixMetal": {"apiToken": None}, "hcloud": {"apiToken": None}},
                }
            ],
            "nameservers": None,
            "searchDomains": None,
            "extraHostEntries": [{"ip": None, "aliases": None}],
            "kubespan": {
                "enabled": None,
                "advertiseKubernetesNetworks": None,
                "allowDownPeerBypass": None,
                "harvestExtraEndpoints": None,
                "mtu": None,
                "filters": {"endpoints": None, "excludeAdvertisedNetworks": None},
            },
            "disableSearchDomain": None,
        },
        "disks": [{"device": None, "partitions": [{"size": None, "mountpoint": None}]}],
        "install": {
            "disk": None,
            "diskSelector": {
                "size": None,
                "name": None,
                "model": None,
                "serial": None,
                "modalias": None,
                "uuid": None,
                "wwid": None,
                "type": None,
                "busPath": None,
            },
            "extraKernelArgs": None,
            "image": None,
            "extensions": [{"image": None}],
            "bootloader": None,
            "wipe": None,
            "legacyBIOSSupport": None,
            "grubUseUKICmdline": None,
        },
        "files": [{"content": None, "permissions": None, "path": None, "op": None}],
        "env": {"*": None},
        "time": {"disabled": None, "servers": None, "bootTimeout": None},
        "sysctls": {"*": None},
        "sysfs": {"*": None},
        "registries": {
            "mirrors": {"*": {"endpoints": None, "overridePath": None, "skipFallback": None}},
            "config": {
                "*": {
                    "tls": {
                        "clientIdentity": {"crt": None, "key": None},
                        "ca": None,
                        "insecureSkipVerify": None,
                    },
                    "auth": {"username": None, "password": None, "auth": None, "identityToken": None},
                }
            },
        },
        "systemDiskEncryption": {
            "state": {
                "provider": None,
                "keys": [
                    {
                        "static": {"passphrase": None},
                        "nodeID": {},
                        "kms": {"endpoint": None},
                        "slot": None,
                        "tpm": {"checkSecurebootStatusOnEnroll": None},
                    }
                ],
                "cipher": None,
                "keySize": None,
                "blockSize": None,
                "options": None,
            },
            "ephemeral": {
                "provider": None,
                "keys": [
                    {
                        "static": {"passphrase": None},
                        "nodeID": {},
                        "kms": {"endpoint": None},
                        "slot": None,
                        "tpm": {"checkSecurebootStatusOnEnroll": None},
                    }
                ],
                "cipher": None,
                "keySize": None,
                "blockSize": None,
                "options": None,
            },
        },
        "features": {
            "rbac": None,
            "stableHostname": None,
            "kubernetesTalosAPIAccess": {
                "enabled": None,
                "allowedRoles": None,
                "allowedKubernetesNamespaces": None,
            },
            "apidCheckExtKeyUsage": None,
            "diskQuotaSupport": None,
            "kubePrism": {"enabled": None, "port": None},
            "hostDNS": {"enabled": None, "forwardKubeDNSToHost": None, "resolveMemberNames": None},
            "imageCache": {"localEnabled": None},
            "nodeAddressSortAlgorithm": None,
        },
        "udev": {"rules": None},
        "logging": {"destinations": [{"endpoint": None, "format": None, "extraTags": {"*": None}}]},
        "kernel": {"modules": [{"name": None, "parameters": None}]},
        "seccompProfiles": [{"name": None, "value": None}],
        "baseRuntimeSpecOverrides": None,
        "nodeLabels": {"*": None},
        "nodeAnnotations": {"*": None},
        "nodeTaints": {"*": None},
    },
    "cluster": {
        "id": None,
        "secret": None,
        "controlPlane": {"endpoint": None, "localAPIServerPort": None},
        "clusterName": None,
        "network": {
            "cni": {
                "name": None,
                "urls": None,
                "flannel": {"extraArgs": None, "kubeNetworkPoliciesEnabled": None},
            },
            "dnsDomain": None,
            "podSubnets": None,
            "serviceSubnets": None,
        },
        "token": None,
        "aescbcEncryptionSecret": None,
        "secretboxEncryptionSecret": None,
        "ca": {"crt": None, "key": None},
        "acceptedCAs": [{"crt": None}],
        "aggregatorCA": {"crt": None, "key": None},
        "serviceAccount": {"key": None},
        "apiServer": {
            "image": None,
            "extraArgs": {"*": None},
            "extraVolumes": [{"hostPath": None, "mountPath": None, "readonly": None}],
            "env": {"*": None},
            "certSANs": None,
            "disablePodSecurityPolicy": None,
            "admissionControl": [{"name": None, "configuration": None}],
            "auditPolicy": None,
            "resources": {"requests": None, "limits": None},
            "authorizationConfig": [{"type": None, "name": None, "webhook": None}],
        },
        "controllerManager": {
            "image": None,
            "extraArgs": {"*": None},
            "extraVolumes": [{"hostPath": None, "mountPath": None, "readonly": None}],
            "env": {"*": None},
            "resources": {"requests": None, "limits": None},
        },
        "proxy": {"disabled": None, "image": None, "mode": None, "extraArgs": {"*": None}},
        "scheduler": {
            "image": None,
            "extraArgs": {"*": None},
            "extraVolumes": [{"hostPath": None, "mountPath": None, "readonly": None}],
            "env": {"*": None},
            "resources": {"requests": None, "limits": None},
            "config": None,
        },
        "discovery": {
            "enabled": None,
            "registries": {"kubernetes": {"disabled": None}, "service": {"disabled": None, "endpoint": None}},
        },
        "etcd": {
            "image": None,
            "ca": {"crt": None, "key": None},
            "extraArgs": {"*": None},
            "subnet": None,
            "advertisedSubnets": None,
            "listenSubnets": None,
        },
        "coreDNS": {"disabled": None, "image": None},
        "externalCloudProvider": {"enabled": None, "manifests": None},
        "extraManifests": None,
        "extraManifestHeaders": {"*": None},
        "inlineManifests": [{"name": None, "contents": None}],
        "adminKubeconfig": {"certLifetime": None},
        "allowSchedulingOnMasters": None,
        "allowSchedulingOnControlPlanes": None,
    },
}

# KubeSpanConfig (network.KubeSpanConfigV1Alpha1)
KUBESPAN_CONFIG: KeyTree = {
    **_META,
    "enabled": None,
    "advertiseKubernetesNetworks": None,
    "allowDownPeerBypass": None,
    "harvestExtraEndpoints": None,
    "mtu": None,
    "filters": {"endpoints": None, "excludeAdvertisedNetworks": None},
}
# KubeSpanEndpointsConfig (network.KubespanEndpointsConfigV1Alpha1)
KUBESPAN_ENDPOINTS_CONFIG: KeyTree = {**_META, "extraAnnouncedEndpoints": None}
# DiscoveryServiceConfig (cluster.DiscoveryServiceConfigV1Alpha1)
DISCOVERY_SERVICE_CONFIG: KeyTree = {**_META, "name": None, "endpoint": None}
# DiscoveryIdentityConfig (cluster.DiscoveryIdentityConfigV1Alpha1, Talos 1.14)
DISCOVERY_IDENTITY_CONFIG: KeyTree = {**_META, "clusterID": None, "clusterSecret": None}

TREES: dict[str, KeyTree] = {
    "v1alpha1": V1ALPHA1,
    "KubeSpanConfig": KUBESPAN_CONFIG,
    "KubeSpanEndpointsConfig": KUBESPAN_ENDPOINTS_CONFIG,
    "DiscoveryServiceConfig": DISCOVERY_SERVICE_CONFIG,
    "DiscoveryIdentityConfig": DISCOVERY_IDENTITY_CONFIG,
}

Path = tuple[str | int, ...]


def unknown_paths(tree: KeyTree, data: Any) -> list[Path]:
    """Paths of the keys in ``data`` that ``tree`` does not know, in document order (the key
    itself, not what is below it; list items by index). A key is unknown whatever its value, null
    included, as for Talos. A value of another shape than the tree expects (a scalar for a mapping)
    is not this check's business."""
    out: list[Path] = []

    def walk(node: Any, value: Any, path: Path) -> None:
        if isinstance(node, list):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    walk(node[0], item, (*path, i))
            return
        if not isinstance(node, dict) or not isinstance(value, dict):
            return
        for key, sub in value.items():
            if ANY_KEY in node:
                walk(node[ANY_KEY], sub, (*path, key))
            elif key in node:
                walk(node[key], sub, (*path, key))
            else:
                out.append((*path, key))

    walk(tree, data, ())
    return out


def known_siblings(tree: KeyTree, path: Path) -> tuple[str, ...]:
    """The keys ``tree`` knows beside the last element of ``path`` (for "did you mean")."""
    node: Any = tree
    for part in path[:-1]:
        if isinstance(node, list):
            node = node[0]
            continue
        if not isinstance(node, dict):
            return ()
        node = node.get(ANY_KEY, node.get(part)) if isinstance(part, str) else node
    if isinstance(node, list):
        node = node[0]
    if not isinstance(node, dict) or ANY_KEY in node:
        return ()
    return tuple(node)


def suggestion(tree: KeyTree, path: Path) -> str:
    """``did you mean 'x'?`` for an unknown key close to a known one beside it, or ""."""
    last = path[-1]
    if not isinstance(last, str):
        return ""
    close = difflib.get_close_matches(last, known_siblings(tree, path), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


# -- strict or lenient ------------------------------------------------------------------------------

_strict_override: bool | None = None


def strict_default() -> bool:
    """Whether configs are parsed strictly when the caller does not say: the value set by
    :func:`set_strict_default` (machined's ``--config-lenient``), else not ``$MACHINED_CONFIG_LENIENT``."""
    if _strict_override is not None:
        return _strict_override
    return os.environ.get(LENIENT_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def set_strict_default(strict: bool | None) -> None:
    """Set the process-wide default (None: back to the environment variable)."""
    global _strict_override
    _strict_override = strict
