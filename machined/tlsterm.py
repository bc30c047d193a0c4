"""TLS outside grpcio: Python's ``ssl`` (OpenSSL) terminates and originates apid's and spanctl's TLS.

Why: grpcio's TLS stack offers no Ed25519 signature scheme (grpc/grpc#24252), and Talos's default PKI
is Ed25519, so a grpcio TLS endpoint cannot talk to a Talos-generated talosconfig or a Talos apid.
OpenSSL (through :mod:`ssl`) does Ed25519 and ECDSA in TLS 1.2 and 1.3. One path serves every key
type: grpcio only ever speaks plaintext HTTP/2 over private unix sockets, and the bytes are spliced.

**Server side** (:class:`TlsTerminator`): accepts TCP, completes the TLS handshake (TLS ≥ 1.2, ALPN
``h2``, client certificate required and verified against the cluster CA when asked), then opens one
unix connection per TLS connection to the local grpc server and splices the two byte streams. Before
connecting, the unix socket is *bound* to a fresh random path in a private directory (0700, this
process's own); grpc reports that path as the call's peer (``context.peer()`` = ``unix:<path>``), and
:class:`PeerRegistry` maps it to the verified identity (:class:`PeerInfo`: the client leaf's DER,
its roles, whether its EKU is exactly clientAuth, the TCP peer). A handler trusts only that registry:
a connection that did not come through the terminator (unbound, or bound to an unknown path) has no
identity. Per-connection mapping passes any role set (certificates may hold several ``O=`` values)
without a listener per combination.

**Client side** (:class:`TlsDialer`): a unix socket in a private directory that grpc dials as an
insecure channel; every connection grpc opens on it becomes one TCP+TLS connection to the target
(client certificate, server verified against the CA and the target's name or IP, ALPN ``h2``).
:class:`ThreadDialer` runs one in a background event loop for synchronous grpc code (spanctl,
trustd requests from a worker thread). Why this design, and what it costs: docs/design/apid-tls.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from machined import pki
from machined.api.roles import parse_roles
from spanutil.hostport import split_host_port
from spanutil.logs import log_event

log = logging.getLogger("tls")

ALPN = ["h2"]
HANDSHAKE_TIMEOUT = 20.0  # seconds for a TLS handshake (a stalled client must not hold a slot for ever)
CONNECT_TIMEOUT = 20.0  # seconds for the TCP connect of an outgoing connection
_MAX_SUN_PATH = 100  # keep unix socket paths well under the kernel's 108 bytes


class TlsSetupError(RuntimeError):
    """A certificate/key that OpenSSL refuses, or a socket that cannot be set up (message says which)."""


# --- identities --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the TLS handshake verified about a client. ``der`` is None without a client certificate
    (trustd); ``roles`` are the leaf's ``O=`` values, one role each (:func:`parse_roles`)."""

    tcp_peer: str
    der: bytes | None = None
    is_client: bool = False
    roles: frozenset[str] = frozenset()


_CERT_CACHE: OrderedDict[bytes, tuple[bool, frozenset[str]]] = OrderedDict()


def cert_identity(der: bytes) -> tuple[bool, frozenset[str]]:
    """``(EKU exactly clientAuth, roles)`` of a verified client leaf (DER); roles = its ``O=`` values,
    each exactly one role, never split (Talos puts ``os:admin``, ``os:reader`` … there). Cached."""
    hit = _CERT_CACHE.get(der)
    if hit is None:
        cert = x509.load_der_x509_certificate(der)
        hit = (pki.is_client_cert(cert), parse_roles(pki.roles_of(cert)))
        _CERT_CACHE[der] = hit
        if len(_CERT_CACHE) > 256:
            _CERT_CACHE.popitem(last=False)
    else:
        _CERT_CACHE.move_to_end(der)
    return hit


def tcp_peer_string(addr: Any) -> str:
    """grpc's peer format for a TCP peer: ``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5``."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return "unknown"
    host, port = addr[0], addr[1]
    if ":" in str(host):
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


class PeerRegistry:
    """Bound unix path → :class:`PeerInfo` for every connection the terminator spliced (and only
    those). :meth:`lookup` takes grpc's ``context.peer()``."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerInfo] = {}

    def add(self, path: str, info: PeerInfo) -> None:
        self._peers[path] = info

    def remove(self, path: str) -> None:
        self._peers.pop(path, None)

    def lookup(self, peer: str | None) -> PeerInfo | None:
        if not peer or not peer.startswith("unix:"):
            return None
        return self._peers.get(peer[len("unix:") :])

    def __len__(self) -> int:
        return len(self._peers)


# --- private directories and contexts ------------------------------------------------------------------


def private_dir(prefix: str) -> Path:
    """A new 0700 directory for unix sockets (short enough for ``sun_path``): under systemd's
    ``$RUNTIME_DIRECTORY`` (``/run/apid`` for the apid unit) when set, else the temp directory."""
    runtime = (os.environ.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    base = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(d, 0o700)
    return d


def _load_chain(ctx: ssl.SSLContext, crt: bytes, key: bytes, workdir: Path) -> None:
    """``load_cert_chain`` from PEM bytes: OpenSSL reads files, so the pair goes into 0600 files in
    the private directory for the call, then is removed. Talos's ``ED25519 PRIVATE KEY`` label is
    rewritten as standard PKCS#8 first."""
    key = pki.normalize_key_pem(key)
    name = secrets.token_hex(8)
    cpath, kpath = workdir / f"{name}.crt", workdir / f"{name}.key"
    try:
        pki.write_secret_file(cpath, crt)
        pki.write_secret_file(kpath, key)
        ctx.load_cert_chain(str(cpath), str(kpath))
    except ssl.SSLError as e:
        raise TlsSetupError(f"OpenSSL refused the certificate or key ({e.reason or e})") from None
    finally:
        for p in (cpath, kpath):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _base(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


def server_context(
    crt: bytes, key: bytes, workdir: Path, *, ca: bytes | None = None, sni: Any = None
) -> ssl.SSLContext:
    """A server context: TLS ≥ 1.2, ALPN h2, our certificate; with ``ca`` a client certificate is
    required and verified against it (OpenSSL also checks the leaf may be used for client auth)."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, crt, key, workdir)
    if ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=ca.decode())
        except (ssl.SSLError, ValueError) as e:
            raise TlsSetupError(f"OpenSSL refused the CA certificate ({e})") from None
    if sni is not None:
        ctx.sni_callback = sni
    return ctx


def client_context(
    ca: bytes, workdir: Path | None = None, crt: bytes | None = None, key: bytes | None = None
) -> ssl.SSLContext:
    """A client context: TLS ≥ 1.2, ALPN h2, the server verified against ``ca`` and the name or IP
    we dial; with ``crt``/``key`` our client certificate."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    try:
        ctx.load_verify_locations(cadata=ca.decode())
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as e:
        raise TlsSetupError(f"OpenSSL refused the CA certificate ({e})") from None
    if crt and key:
        tmp = workdir or private_dir("tlskey-")
        try:
            _load_chain(ctx, crt, key, tmp)
        finally:
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    return ctx


# --- splicing --------------------------------------------------------------------------------------


class _Pipe(asyncio.Protocol):
    """One side of a splice: what it receives goes to ``peer``; write back-pressure on one side
    pauses reading on the other; either side closing closes both."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def attach(self, peer: _Pipe) -> None:
        """Join with ``peer`` (both connected): flush what arrived before."""
        self.peer, peer.peer = peer, self
        for side in (self, peer):
            if side.pending and side.peer is not None and side.peer.transport is not None:
                side.peer.transport.write(b"".join(side.pending))
            side.pending.clear()
        if self.closed:
            peer.close()
        elif peer.closed:
            self.close()

    def data_received(self, data: bytes) -> None:
        p = self.peer
        if p is not None and p.transport is not None and not p.closed:
            p.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None:
            self.peer.close()
        return False

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.close()
        if self._on_lost is not None:
            cb, self._on_lost = self._on_lost, None
            cb()


# --- server side -----------------------------------------------------------------------------------


class TlsTerminator:
    """TLS on ``host:port`` (Python ssl), spliced to the grpc server on unix socket ``backend``.

    ``contexts()`` returns the current server :class:`ssl.SSLContext` (it may change when the
    certificate is renewed: new handshakes use the new one, live connections keep theirs).
    ``registry`` learns each connection's verified :class:`PeerInfo` under its bound path."""

    def __init__(
        self,
        contexts: Callable[[], ssl.SSLContext],
        backend: Path,
        registry: PeerRegistry,
        sockdir: Path,
        *,
        name: str = "apid",
    ) -> None:
        self.contexts = contexts
        self.backend = backend
        self.registry = registry
        self.sockdir = sockdir
        self.name = name
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._conns: set[_Pipe] = set()
        self.handshakes_failed = 0

    def _sni(self, sslobj: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.contexts()
        if sslobj.context is not current:
            sslobj.context = current  # a renewed certificate, from this handshake on
        return None

    async def start(self, host: str | None, port: int) -> int:
        loop = asyncio.get_running_loop()
        base = self.contexts()
        base.sni_callback = self._sni  # type: ignore[assignment]
        try:
            self.server = await loop.create_server(
                self._front,
                host=host,
                port=port,
                ssl=base,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                reuse_address=True,
            )
        except OSError as e:
            raise TlsSetupError(f"cannot listen on {host or '*'}:{port}: {e.strerror}") from None
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def _front(self) -> _Pipe:
        front = _Front(self)
        return front

    async def _connect(self, front: _Front, info: PeerInfo) -> None:
        """The unix leg for one TLS connection, bound to a fresh path the registry maps to ``info``."""
        path = str(self.sockdir / f"c-{secrets.token_hex(12)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def lost() -> None:
            self.registry.remove(path)
            self._conns.discard(back)

        back = _Pipe(on_lost=lost)
        try:
            sock.bind(path)
            os.unlink(path)  # the address stays the socket's (and grpc's peer string); no file left
            sock.setblocking(False)
            self.registry.add(path, info)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, str(self.backend))
            await loop.create_unix_connection(lambda: back, sock=sock)
        except (OSError, asyncio.CancelledError) as e:
            self.registry.remove(path)
            sock.close()
            front.close()
            if not isinstance(e, asyncio.CancelledError):
                log_event(log, "backend unreachable", logging.WARNING, server=self.name, error=str(e))
            return
        if front.closed:
            back.close()
            return
        self._conns.add(back)
        back.attach(front)
        if front.transport is not None:
            front.transport.resume_reading()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self._conns):
            c.close()
            if c.peer is not None:
                c.peer.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)


class _Front(_Pipe):
    """The TLS side: on connection (handshake done), read the verified peer and connect the unix leg."""

    def __init__(self, term: TlsTerminator) -> None:
        super().__init__()
        self.term = term

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        t = self.transport
        assert t is not None
        t.pause_reading()
        sslobj = t.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        tcp = tcp_peer_string(t.get_extra_info("peername"))
        if der:
            try:
                is_client, roles = cert_identity(der)
            except ValueError:
                t.close()
                return
            info = PeerInfo(tcp, der, is_client, roles)
        else:
            info = PeerInfo(tcp)
        asyncio.get_running_loop().create_task(self.term._connect(self, info))


# --- client side -----------------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` → ``(host, port)``; ValueError names a bad target."""
    return split_host_port(target, what="target")


_DIALERS: weakref.WeakValueDictionary[str, TlsDialer] = weakref.WeakValueDictionary()


def explain(details: str, unavailable: bool) -> str:
    """grpc's error ``details`` for a call through a :class:`TlsDialer`, made readable: when the call
    was UNAVAILABLE and the dialer knows why (refused, unreachable, certificate not accepted …), that
    reason; else the details with the private unix socket named as the real target."""
    for key, d in list(_DIALERS.items()):
        if key in details or d.path.name in details:
            if unavailable and d.last_error:
                return d.last_error
            return details.replace(key, d.target).replace(str(d.path), d.target)
    return details


class TlsDialer:
    """A unix socket that grpc dials (insecure); each connection on it is spliced to a new TLS
    connection to ``target`` made with ``ctx``. ``last_error`` keeps why the last attempt failed
    (refused, unreachable, certificate not trusted …), since grpc only sees a closed socket."""

    def __init__(self, target: str, ctx: ssl.SSLContext, *, sockdir: Path | None = None) -> None:
        self.target = target
        self.host, self.port = split_target(target)
        self.ctx = ctx
        self._own_dir = sockdir is None
        self.sockdir = sockdir or private_dir("tlsdial-")
        self.path = self.sockdir / f"d-{secrets.token_hex(8)}.sock"
        self.server: asyncio.AbstractServer | None = None
        self.last_error: str | None = None
        self._conns: set[_Pipe] = set()
        self._dials: set[asyncio.Task[None]] = set()  # connections being dialled (close() cancels them)
        self._starting: asyncio.Task[None] | None = None
        _DIALERS[self.grpc_target] = self

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> str:
        self.start_soon()
        assert self._starting is not None
        await self._starting
        return self.grpc_target

    def start_soon(self) -> str:
        """Bind and listen now (connections wait in the backlog), serve from the next loop turn: for
        callers that cannot await (apid's channel cache factory)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._starting = loop.create_task(self._serve(sock))
        return self.grpc_target

    async def _serve(self, sock: socket.socket) -> None:
        self.server = await asyncio.get_running_loop().create_unix_server(self._local, sock=sock)

    def _local(self) -> _Pipe:
        local = _Pipe()
        asyncio.get_running_loop().call_soon(self._open, local)
        return local

    def _open(self, local: _Pipe) -> None:
        if local.transport is not None:
            local.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._dial(local))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, local: _Pipe) -> None:
        remote = _Pipe()
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: remote,
                    self.host,
                    self.port,
                    ssl=self.ctx,
                    server_hostname=self.host,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                ),
                CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:  # close() while dialling
            local.close()
            raise
        except ssl.SSLCertVerificationError as e:
            self.last_error = f"{self.target}: server certificate not accepted ({e.verify_message})"
            local.close()
            return
        except ssl.SSLError as e:
            self.last_error = f"{self.target}: TLS handshake failed ({e.reason or e})"
            local.close()
            return
        except TimeoutError:
            self.last_error = f"{self.target}: connection timed out"
            local.close()
            return
        except OSError as e:
            self.last_error = f"{self.target}: {e.strerror or e}"
            local.close()
            return
        self.last_error = None
        self._conns.add(remote)
        remote._on_lost = lambda: self._conns.discard(remote)
        remote.attach(local)
        if local.transport is not None and not local.closed:
            local.transport.resume_reading()

    async def close(self) -> None:
        if self._starting is not None:
            with contextlib.suppress(BaseException):
                await self._starting
        if self.server is not None:
            self.server.close()
        dials = list(self._dials)
        for t in dials:
            t.cancel()
        if dials:  # a dial in flight would otherwise be destroyed pending when its loop ends
            await asyncio.gather(*dials, return_exceptions=True)
        for c in list(self._conns):
            c.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._own_dir:
            shutil.rmtree(self.sockdir, ignore_errors=True)


class TlsChannel:
    """A grpc.aio channel through a :class:`TlsDialer` (what apid's channel cache holds, and what an
    asyncio client such as spanctl's dashboard uses for mTLS): the channel's methods, and ``close()``
    closing both."""

    def __init__(self, dialer: TlsDialer, channel: grpc.aio.Channel) -> None:
        self.dialer = dialer
        self.channel = channel

    @classmethod
    def create(
        cls, target: str, ctx: ssl.SSLContext, options: list[tuple[str, Any]], *, sockdir: Path | None = None
    ) -> TlsChannel:
        """Needs a running loop (the dialer serves on it)."""
        d = TlsDialer(target, ctx, sockdir=sockdir)
        d.start_soon()
        opts = [*options, ("grpc.default_authority", target)]
        return cls(d, grpc.aio.insecure_channel(d.grpc_target, options=opts))

    async def __aenter__(self) -> grpc.aio.Channel:
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def unary_unary(self, method: str, **kw: Any) -> Any:
        return self.channel.unary_unary(method, **kw)

    def unary_stream(self, method: str, **kw: Any) -> Any:
        return self.channel.unary_stream(method, **kw)

    def __getattr__(self, name: str) -> Any:
        """Everything else a ``grpc.aio.Channel`` has (``stream_unary``, ``get_state``,
        ``channel_ready`` …), so a TlsChannel can stand where one is expected."""
        if name in ("channel", "dialer"):
            raise AttributeError(name)
        return getattr(self.channel, name)

    async def close(self, grace: float | None = None) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close(grace)
        await self.dialer.close()


class ThreadDialer:
    """A :class:`TlsDialer` served by an event loop in a daemon thread, for synchronous grpc
    (``grpc.insecure_channel(d.grpc_target)``). :meth:`close` stops both."""

    def __init__(self, target: str, ctx: ssl.SSLContext) -> None:
        self.dialer = TlsDialer(target, ctx)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-dialer", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.dialer.start(), self._loop).result(10)
        except Exception:
            self.close()
            raise

    @property
    def grpc_target(self) -> str:
        return self.dialer.grpc_target

    @property
    def last_error(self) -> str | None:
        return self.dialer.last_error

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.dialer.close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ThreadDialer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
