"""spanctl apply-config and patch: the machine configuration."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import duration_pb2

from spanapi.talos.cosi import state_pb2
from spanapi.talos.machine import machine_pb2

from ..app import APPLY_MODES, MACHINE_CONFIG_ID, MACHINE_CONFIG_TYPE, App, UsageError
from ..client import describe_rpc_error, node_of, split_messages

MACHINE_CONFIG_NAMESPACE = "config"  # the MachineConfig's default namespace (patch --namespace)


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _apply_request(data: bytes, ns: argparse.Namespace) -> machine_pb2.ApplyConfigurationRequest:
    req = machine_pb2.ApplyConfigurationRequest(data=data, mode=APPLY_MODES[ns.mode], dry_run=ns.dry_run)
    if ns.timeout is not None:
        req.try_mode_timeout.CopyFrom(
            duration_pb2.Duration(seconds=int(ns.timeout), nanos=int(ns.timeout % 1 * 1e9))
        )
    return req


def _print_apply(app: App, items: list[Any], several: bool) -> None:
    for item in items:
        node = node_of(item, app.label(None))
        for w in item.warnings:
            print(f"warning from node {node}: {w}", file=app.err)
        details = item.mode_details.rstrip("\n")
        if app.ns.dry_run and not details:
            details = "No changes."
        app.out.write((f"{node}:\n{details}\n" if several else f"{details}\n") if details else "")


#: Why ``apply-config -i/--insecure`` is refused (it is accepted so that a talosctl habit gets this
#: explanation instead of "unrecognized arguments").
INSECURE_REFUSAL = (
    "apply-config: --insecure talks to a node in Talos's maintenance mode, and our nodes have none: "
    "machined starts only with a config (machined --config FILE) and apid always asks for a client "
    "certificate. Apply through apid with a talosconfig (spanctl config new / gen config), or on the "
    "node itself with --socket"
)


def load_patch_arg(text: str) -> str:
    """A patch argument as talosctl takes it: ``@file`` reads the file, anything else is the patch."""
    if text.startswith("@"):
        return read_file(text[1:]).decode()
    return text


def patched_file(data: bytes, patches: list[str], path: str) -> bytes:
    """The config file with ``--config-patch`` patches applied locally, in order (before sending, as
    talosctl does); the file itself is not changed."""
    from machined.config.patch import apply_patches

    texts = [load_patch_arg(p) for p in patches]
    try:
        docs = [d for d in yaml.safe_load_all(data) if d is not None]
    except yaml.YAMLError as e:
        raise UsageError(f"apply-config: {path} is not YAML: {e}") from None
    try:
        new_docs = apply_patches(docs, texts)
    except Exception as e:
        raise UsageError(f"apply-config: --config-patch: {e}") from None
    return yaml.safe_dump_all(new_docs, sort_keys=False).encode()


def cmd_apply_config(app: App) -> None:
    if app.ns.insecure:
        raise UsageError(INSECURE_REFUSAL)
    data = read_file(app.ns.file)
    if not data:
        raise UsageError(f"apply-config: {app.ns.file} is empty")
    if app.ns.config_patch:
        data = patched_file(data, app.ns.config_patch, app.ns.file)
    items = app.unary(app.machine().ApplyConfiguration, _apply_request(data, app.ns))
    _print_apply(app, items, len(items) > 1)


def cmd_patch(app: App) -> None:
    from machined.config.patch import apply_patches

    if app.ns.resource.lower() not in ("machineconfig", "mc", "machineconfigs", MACHINE_CONFIG_TYPE.lower()):
        raise UsageError(f'patch: only "machineconfig" can be patched (got "{app.ns.resource}")')
    args = list(app.ns.patch or ())
    if app.ns.patch_file:
        args.append("@" + app.ns.patch_file)  # after the -p patches, as talosctl
    if not args:
        raise UsageError("patch: either --patch/-p or --patch-file is required")
    patches = [load_patch_arg(p) for p in args]
    namespace = app.ns.namespace or MACHINE_CONFIG_NAMESPACE
    t = app.target
    nodes = t.each_node()
    for node in nodes:
        label = app.label(node)
        md = t.node_metadata(node)
        try:
            r = app.state().Get(
                state_pb2.GetRequest(namespace=namespace, type=MACHINE_CONFIG_TYPE, id=MACHINE_CONFIG_ID),
                metadata=md,
                timeout=t.timeout,
            )
        except grpc.RpcError as e:
            app.errors.add(label, "reading the machine config: " + describe_rpc_error(e, t.where))
            continue
        try:
            docs = [d for d in yaml.safe_load_all(r.resource.spec.yaml_spec) if d is not None]
            new_docs = apply_patches(docs, patches)
        except Exception as e:
            app.errors.add(label, f"patching: {e}")
            continue
        data = yaml.safe_dump_all(new_docs, sort_keys=False).encode()
        try:
            resp = app.machine().ApplyConfiguration(
                _apply_request(data, app.ns), metadata=md, timeout=t.timeout
            )
        except grpc.RpcError as e:
            app.errors.rpc(label, e, t.where)
            continue
        good, errs = split_messages(resp.messages, label)
        app.errors.extend(errs)
        for item in good:
            item.metadata.hostname = item.metadata.hostname or label
        _print_apply(app, good, len(nodes) > 1)
