"""``apid``: the mTLS gateway to machined's API.

    apid --config FILE --machined-socket PATH [--listen :50000] [--hostname NAME] [--address IP ...]
         [--trustd-listen :50001] [--trustd-endpoint HOST:PORT ...]
         [--backend-channels 256] [--backend-idle 300]

``--config`` is the node's machine config: apid uses ``machine.ca``, ``machine.token`` and
``machine.certSANs``. On a control-plane node (CA key present) it issues its own server certificate
(SANs: ``--address`` values, the addresses machined reports in ``NodeAddresses/current`` — including
the mesh address —, certSANs, the hostname, loopback) and an ``os:impersonator`` client certificate
for forwarding, both 24 h and re-issued at half-life without a restart, and serves trustd on
``--trustd-listen``. On a worker (no CA key) it obtains its server certificate from a control-plane
node's trustd with a CSR and the machine token: the ``--trustd-endpoint`` values, or else the
addresses of the control-plane members machined learnt from cluster discovery (as Talos workers find
their control plane). TLS is Python's ``ssl`` in front of a private grpc server (:mod:`.tlsterm`), so
Ed25519 CAs and certificates (Talos's default) work as ECDSA ones do. Exit status 2 with a message on a
config it cannot serve with (no CA, a CA key that is not the certificate's, a worker that found no
trustd in time). See ``machined/apid/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from discovery.version import version_string
from machined import pki, tlsterm
from machined.config import ConfigValidationError, MachineConfig
from machined.config.documents import V1Alpha1
from spanapi.talos.cosi import state_pb2, state_pb2_grpc
from spanapi.talos.security import security_pb2_grpc
from spanutil.hostport import split_listen
from spanutil.logs import log_event, setup

from . import trustd
from .channels import DEFAULT_IDLE, DEFAULT_MAX_CHANNELS
from .proxy import APID_PORT, Proxy
from .tls import Identity

log = logging.getLogger("apid")

ADDRESS_POLL = 30.0  # seconds between checks of machined's NodeAddresses without a watch event (safety net)
WATCH_RETRY = 1.0  # seconds before re-opening a broken NodeAddresses watch (machined restarting)
ADDRESS_SETTLE = 0.2  # seconds to let a burst of address changes settle before re-issuing once


class StartError(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apid", description="mTLS gateway to machined's machine API.")
    p.add_argument("--version", action="version", version=version_string("apid"))
    p.add_argument("--config", type=Path, required=True, help="machine config (uses machine.ca crt+key)")
    p.add_argument("--machined-socket", type=Path, required=True, help="machined's API unix socket")
    p.add_argument("--listen", default=f":{APID_PORT}", help="address:port to listen on (default :50000)")
    p.add_argument("--hostname", default=None, help="node name for the certificate (default: hostname)")
    p.add_argument(
        "--address", action="append", default=[], help="extra address for the server certificate (repeatable)"
    )
    p.add_argument(
        "--node-port", type=int, default=APID_PORT, help="port of other nodes' apid (default 50000)"
    )
    p.add_argument(
        "--cert-ttl", type=float, default=pki.SERVER_TTL.total_seconds(), help="certificate lifetime, seconds"
    )
    p.add_argument(
        "--trustd-listen",
        default=f":{trustd.TRUSTD_PORT}",
        help="control-plane nodes: address:port of trustd (default :50001; 'off' disables)",
    )
    p.add_argument(
        "--trustd-endpoint",
        action="append",
        default=[],
        help="workers: a control-plane node's trustd, HOST[:PORT] (repeatable; default: the "
        "control-plane members machined knows from cluster discovery)",
    )
    p.add_argument(
        "--trustd-wait",
        type=float,
        default=60.0,
        help="workers: seconds to keep trying trustd at start before giving up (default 60)",
    )
    p.add_argument(
        "--backend-channels",
        type=_positive_int,
        default=DEFAULT_MAX_CHANNELS,
        help=f"most channels to other nodes' apid kept open for reuse (default {DEFAULT_MAX_CHANNELS})",
    )
    p.add_argument(
        "--backend-idle",
        type=_positive_float,
        default=DEFAULT_IDLE,
        help=f"seconds a channel to another node may stay unused before it is closed (default {DEFAULT_IDLE:g})",
    )
    p.add_argument("--debug", action="store_true")
    return p


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return x


def listen_address(value: str) -> str:
    """``:50000`` → ``[::]:50000``; ``127.0.0.1:1`` and ``[::1]:1`` kept."""
    return f"[::]{value}" if value.startswith(":") else value


def read_config(path: Path) -> V1Alpha1:
    """The machine config's v1alpha1 document with a CA; :class:`StartError` says why not."""
    try:
        mc = MachineConfig.parse(path.read_bytes())
    except OSError as e:
        raise StartError(f"cannot read {path}: {e.strerror}") from None
    except ConfigValidationError as e:
        raise StartError(f"{path} is not a valid machine config: {e}") from None
    v1 = mc.v1alpha1
    if v1.ca is None:
        raise StartError(f"{path}: machine.ca is missing; apid needs the cluster CA")
    return v1


def load_ca(path: Path) -> tuple[pki.KeyPair, tuple[str, ...]]:
    """The CA key pair and certSANs from a machine config; :class:`StartError` says why it cannot serve."""
    v1 = read_config(path)
    assert v1.ca is not None
    if v1.ca.key is None:
        raise StartError(
            f"{path}: machine.ca has no key (a worker config): a worker obtains its certificate from a "
            "control-plane node's trustd (--trustd-endpoint HOST:PORT)"
        )
    ca = pki.KeyPair(v1.ca.crt, v1.ca.key)
    try:
        pki.check_tls_usable(ca.crt, ca.key)
    except pki.PKIError as e:
        raise StartError(f"{path}: refusing to serve: {e}") from None
    return ca, v1.cert_sans


async def _list_specs(socket_path: Path, namespace: str, type_: str, wait: float) -> list[tuple[str, Any]]:
    """``(id, spec)`` of every resource of ``type_`` machined has (raises on gRPC/YAML errors)."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as ch:
        stub = state_pb2_grpc.StateStub(ch)
        stream = stub.List(state_pb2.ListRequest(namespace=namespace, type=type_), timeout=wait)
        return [(r.resource.metadata.id, yaml.safe_load(r.resource.spec.yaml_spec)) async for r in stream]


async def control_plane_endpoints(socket_path: Path, wait: float = 2.0) -> list[str]:
    """Addresses of the control-plane ``Members`` machined knows (cluster discovery), in member-id
    order then each member's address order, to try as trustd endpoints; [] when none or unavailable."""
    try:
        members = await _list_specs(socket_path, "cluster", "Members.cluster.talos.dev", wait)
    except (grpc.aio.AioRpcError, yaml.YAMLError) as e:
        log_event(log, "cluster members unavailable", logging.DEBUG, error=str(e)[:200])
        return []
    out: list[str] = []
    for _id, spec in sorted(members, key=lambda m: m[0]):
        if not isinstance(spec, dict) or spec.get("machineType") not in ("controlplane", "init"):
            continue
        for a in spec.get("addresses") or []:
            try:
                ip = ipaddress.ip_address(str(a).split("/")[0])
            except ValueError:
                continue
            if ip.is_link_local or ip.is_unspecified or ip.is_multicast or str(ip) in out:
                continue
            out.append(str(ip))
    return out


async def node_addresses(socket_path: Path, wait: float = 2.0, *, quiet: bool = False) -> list[str] | None:
    """``NodeAddresses/current`` from machined (incl. the mesh address); None when unavailable."""
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as ch:
            stub = state_pb2_grpc.StateStub(ch)
            r = await stub.Get(
                state_pb2.GetRequest(namespace="network", type="NodeAddresses.net.talos.dev", id="current"),
                timeout=wait,
            )
        spec = yaml.safe_load(r.resource.spec.yaml_spec) or {}
        out = []
        for a in spec.get("addresses") or []:
            try:
                out.append(str(ipaddress.ip_interface(a).ip))
            except ValueError:
                continue
        return out
    except (grpc.aio.AioRpcError, yaml.YAMLError, AttributeError) as e:
        level = logging.DEBUG if quiet else logging.WARNING
        log_event(log, "node addresses unavailable", level, error=str(e)[:200])
        return None


async def watch_node_addresses(socket_path: Path, changed: asyncio.Event, retry: float = WATCH_RETRY) -> None:
    """Set ``changed`` whenever machined reports ``NodeAddresses/current`` (its first state included),
    so the certificates follow the node's addresses within a moment, not at the next poll: at start
    machined may not have published them yet (a control-plane certificate without the node address
    turns the workers' trustd requests away). Re-opens the watch ``retry`` seconds after it breaks."""
    req = state_pb2.WatchRequest(
        namespace="network",
        type="NodeAddresses.net.talos.dev",
        id="current",
        api_version=1,
        options=state_pb2.WatchOptions(bootstrap_contents=True),
    )
    while True:
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_path}") as ch:
                async for resp in state_pb2_grpc.StateStub(ch).Watch(req):
                    if any(ev.event_type != state_pb2.BOOTSTRAPPED for ev in resp.event):
                        changed.set()
        except grpc.aio.AioRpcError as e:
            log_event(log, "node addresses watch broke; re-opening", logging.DEBUG, error=str(e)[:200])
        changed.set()  # something may have changed while the watch was down
        await asyncio.sleep(retry)


class Apid:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.hostname = ns.hostname or socket.gethostname()
        self.server: grpc.aio.Server | None = None
        self.proxy: Proxy | None = None
        self.identity: Identity | None = None
        self.trustd_server: grpc.aio.Server | None = None
        self.terminator: tlsterm.TlsTerminator | None = None
        self.trustd_terminator: tlsterm.TlsTerminator | None = None
        self.peers = tlsterm.PeerRegistry()
        self.sockdir: Path | None = None
        self.port = 0
        self.trustd_port = 0
        self.worker = False

    async def _terminate(
        self, server: grpc.aio.Server, name: str, listen: str, require_client: bool
    ) -> tuple[tlsterm.TlsTerminator, int]:
        """The private unix listener of ``server`` and Python-ssl TLS on ``listen`` in front of it."""
        assert self.sockdir is not None and self.identity is not None
        backend = self.sockdir / f"{name}.sock"
        if server.add_insecure_port(f"unix:{backend}") == 0:
            raise StartError(f"{name}: cannot listen on the private socket {backend}")
        await server.start()
        identity, sockdir = self.identity, self.sockdir
        try:
            host, port = split_listen(listen)
            term = tlsterm.TlsTerminator(
                lambda: identity.server_context(sockdir, require_client=require_client),
                backend,
                self.peers,
                sockdir,
                name=name,
            )
            bound = await term.start(host, port)
        except (ValueError, tlsterm.TlsSetupError) as e:
            raise StartError(f"{name}: {e}") from None
        return term, bound

    def _san_list(self, cert_sans: Sequence[str], found: Sequence[str]) -> list[str]:
        return [*self.ns.address, *found, *cert_sans, "127.0.0.1", "::1", "localhost"]

    async def _sans(self, cert_sans: Sequence[str], *, quiet: bool = False) -> list[str] | None:
        """The server certificate's SANs; None when machined's addresses are unavailable."""
        found = await node_addresses(self.ns.machined_socket, quiet=quiet)
        return None if found is None else self._san_list(cert_sans, found)

    async def _start_sans(self, cert_sans: Sequence[str]) -> list[str]:
        """SANs to start with: without machined's addresses for now (the renew loop adds them)."""
        return await self._sans(cert_sans) or self._san_list(cert_sans, [])

    async def _trustd_endpoints(self) -> tuple[list[str], str]:
        """The trustd endpoints to try and where they came from."""
        given = list(getattr(self.ns, "trustd_endpoint", None) or [])
        if given:
            return given, "--trustd-endpoint"
        return await control_plane_endpoints(self.ns.machined_socket), "discovered control-plane members"

    async def _worker_identity(self, v1: V1Alpha1) -> Identity:
        assert v1.ca is not None
        path = self.ns.config
        if not v1.token:
            raise StartError(f"{path}: machine.token is missing; a worker needs it to ask trustd")
        try:
            pki.check_tls_usable(v1.ca.crt)
        except pki.PKIError as e:
            raise StartError(f"{path}: refusing to serve: {e}") from None
        sans = await self._start_sans(v1.cert_sans)
        wait = float(getattr(self.ns, "trustd_wait", 60.0))
        deadline = asyncio.get_running_loop().time() + wait
        last = ""
        while True:
            endpoints, source = await self._trustd_endpoints()
            if endpoints:
                try:
                    identity = await asyncio.to_thread(
                        trustd.WorkerIdentity, v1.ca.crt, self.hostname, sans, v1.token, endpoints
                    )
                    log_event(log, "server certificate from trustd", endpoints=endpoints, source=source)
                    return identity
                except trustd.TrustdError as e:
                    error = str(e)
            else:
                error = "machined reports no control-plane member yet (cluster discovery)"
            if error != last:  # once per distinct reason, not once a second
                log_event(
                    log, "trustd: no certificate yet", logging.WARNING, error=error[:300], source=source
                )
                last = error
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                if not endpoints:
                    raise StartError(
                        f"{path}: machine.ca has no key (a worker config) and no trustd endpoint was "
                        f"found within {wait:g} s: pass --trustd-endpoint HOST:PORT of a control-plane "
                        "node, or enable cluster discovery so machined learns the control-plane members"
                    )
                raise StartError(
                    f"no server certificate: trustd unreachable or refused within {wait:g} s ({error})"
                )
            await asyncio.sleep(min(1.0, left))

    async def _start_trustd(self, ca: pki.KeyPair, token: str | None) -> None:
        listen = getattr(self.ns, "trustd_listen", None)
        if not listen or listen == "off":
            return
        assert self.identity is not None
        ttl = dt.timedelta(seconds=self.ns.cert_ttl)
        self.trustd_server = grpc.aio.server()
        security_pb2_grpc.add_SecurityServiceServicer_to_server(
            trustd.SecurityService(ca, token, ttl, self.peers), self.trustd_server
        )
        self.trustd_terminator, self.trustd_port = await self._terminate(
            self.trustd_server, "trustd", listen, require_client=False
        )
        log_event(log, "trustd serving", listen=listen, port=self.trustd_port)

    async def start(self) -> None:
        self.sockdir = tlsterm.private_dir("apid-")
        v1 = read_config(self.ns.config)
        assert v1.ca is not None
        self._cert_sans = v1.cert_sans
        if v1.ca.key is None:
            self.worker = True
            self.identity = await self._worker_identity(v1)
        else:
            ca, cert_sans = load_ca(self.ns.config)
            ttl = dt.timedelta(seconds=self.ns.cert_ttl)
            self.identity = Identity(
                ca, self.hostname, await self._start_sans(cert_sans), server_ttl=ttl, client_ttl=ttl
            )
            await self._start_trustd(ca, v1.token)
        self.proxy = Proxy(
            str(self.ns.machined_socket),
            None if self.worker else self.identity,
            node_port=self.ns.node_port,
            name=self.hostname,
            max_channels=getattr(self.ns, "backend_channels", DEFAULT_MAX_CHANNELS),
            channel_idle=getattr(self.ns, "backend_idle", DEFAULT_IDLE),
            peers=self.peers,
            sockdir=self.sockdir,
        )
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 32 << 20),
                ("grpc.max_send_message_length", 32 << 20),
            ]
        )
        self.server.add_generic_rpc_handlers((self.proxy,))
        self.terminator, self.port = await self._terminate(self.server, "apid", self.ns.listen, True)
        log_event(log, "apid serving", listen=self.ns.listen, port=self.port, sans=self.identity.addresses)

    async def renew_loop(self, poll: float = ADDRESS_POLL) -> None:
        """Re-issue at half-life, and as soon as the node's addresses change (the node address when
        machined publishes it after apid started, the mesh address when the mesh comes up): machined's
        NodeAddresses watch wakes the loop, ``poll`` is the safety net."""
        assert self.identity is not None
        changed = asyncio.Event()
        watch = asyncio.create_task(watch_node_addresses(self.ns.machined_socket, changed))
        try:
            await self._renew_loop(poll, changed)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _renew_loop(self, poll: float, changed: asyncio.Event) -> None:
        assert self.identity is not None
        while True:
            wait = (self.identity.next_renewal() - dt.datetime.now(dt.UTC)).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(min(1.0, poll), min(wait, poll)))
                await asyncio.sleep(ADDRESS_SETTLE)
            changed.clear()
            found = await self._sans(self._cert_sans, quiet=True)
            # machined unavailable (restarting): keep the addresses we have, not a certificate without them
            sans = found if found is not None else list(self.identity.addresses)
            reason = None
            if self.identity.needs_renewal():
                reason = "half-life"
            elif set(sans) != set(self.identity.addresses):
                reason = "addresses changed"
            if reason is not None:
                if isinstance(self.identity, trustd.WorkerIdentity):
                    endpoints, _ = await self._trustd_endpoints()
                    if endpoints:  # the control plane may have moved since the last certificate
                        self.identity.endpoints = endpoints
                try:
                    await asyncio.to_thread(self.identity.renew, sans)
                except (trustd.TrustdError, pki.PKIError) as e:
                    log_event(
                        log,
                        "certificate renewal failed; serving with the current one",
                        logging.WARNING,
                        reason=reason,
                        error=str(e)[:300],
                    )
                    continue
                log_event(
                    log,
                    "certificates renewed",
                    reason=reason,
                    sans=sans,
                    expires_at=self.identity.server.certificate.not_valid_after_utc.isoformat(),
                )

    async def stop(self) -> None:
        for term in (self.trustd_terminator, self.terminator):
            if term is not None:
                await term.close()
        if self.trustd_server is not None:
            await self.trustd_server.stop(0.5)
        if self.server is not None:
            await self.server.stop(0.5)
        if self.proxy is not None:
            await self.proxy.close()
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)


async def run(ns: argparse.Namespace) -> int:
    apid = Apid(ns)
    try:
        await apid.start()
    except StartError as e:
        log_event(log, "apid cannot start", logging.ERROR, error=str(e))
        print(f"apid: {e}", file=sys.stderr)
        await apid.stop()  # what did start (the private socket directory, a trustd listener)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    renew = asyncio.create_task(apid.renew_loop())
    try:
        await stop.wait()
    finally:
        renew.cancel()
        await apid.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup(debug=ns.debug)
    return asyncio.run(run(ns))


if __name__ == "__main__":
    sys.exit(main())
