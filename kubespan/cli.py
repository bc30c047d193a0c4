"""``kubespan``: run the mesh standalone, or show a running mesh's peers.

    kubespan run --cluster-id ID --cluster-secret-file FILE --discovery URL --state-dir DIR ...
    kubespan status --http-addr 127.0.0.1:51821

``run`` serves ``/status`` (JSON), ``/metrics`` (Prometheus) and ``/healthz``
on ``--http-addr``; SIGTERM/SIGINT remove everything it created.

Start-up CPU matters (N agents start at once in a cold start: bench/mesh_cold_start.py, issue 18), so
costly imports wait until they are used, each in the one place that needs it:
importlib.metadata (``--version``), urllib.request (``status``) and prometheus_client with
kubespan.metrics (the first ``/metrics`` scrape: :class:`MetricsPage`). The HTTP server is
spanutil.minihttp, not aiohttp (importing aiohttp.web cost ~0.14 s CPU per agent).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from discovery.crypto import SecretError, parse_secret
from kubespan import nodepage
from kubespan.affiliate import EndpointFilter, everything_but
from kubespan.constants import STEERINGS, ConfigError, MeshConfig
from kubespan.engine import Mesh, MeshOptions, MeshStatus
from kubespan.nat.punch import PunchTimings
from kubespan.perms import warn_permissions
from kubespan.wireguard.types import AddrPort
from kubespan.wiring import build_mesh
from spanutil.durations import parse_duration
from spanutil.hostport import split_host_port
from spanutil.ipcodec import IPNetwork
from spanutil.logs import log_event, setup
from spanutil.minihttp import Request, Response, Server

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("kubespan")

DEFAULT_HTTP_ADDR = "127.0.0.1:51821"

# MeshConfig field -> the ``run`` flag that sets it: MeshConfig checks the values (once, in
# :func:`mesh_config`) and its errors are reported under the flag's name.
MESH_FLAGS = {
    "link_name": "--link",
    "listen_port": "--listen-port",
    "mtu": "--mtu",
    "persistent_keepalive": "--keepalive",
    "routing_table": "--table",
    "rule_priority": "--rule-priority",
    "fwmark_wireguard": "--fwmark-wireguard",
    "fwmark_force": "--fwmark-force",
    "fwmark_mask": "--fwmark-mask",
    "nft_table": "--nft-table",
    "steering": "--steering",
    "allow_down_peer_bypass": "--allow-down-peer-bypass",
}


def _cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR: {e}") from None


def _filter(text: str) -> str:
    try:
        EndpointFilter.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text


def _addrport(text: str) -> AddrPort:
    try:
        return AddrPort.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT: {e}") from None


def _hostport(text: str) -> tuple[str, int]:
    host, port = split_host_port(text, what="listen address", empty_host=True, port_zero=True)
    return host or "0.0.0.0", port


def _stun_server(text: str) -> tuple[str, int]:
    return split_host_port(text, what="STUN server")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _mac(text: str) -> bytes:
    raw = text.replace(":", "").replace("-", "")
    if len(raw) != 12:
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address") from None


def _version() -> str:
    """From the installed metadata, like discovery.version (kubespan may not import it; see test_layers)."""
    from importlib import metadata  # deferred: only --version needs it (see the module docstring)

    try:
        return metadata.version("kubespan-mesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _VersionAction(argparse.Action):
    """``--version``: prints ``kubespan VERSION`` and exits, like argparse's ``version`` action, but reads
    the version only when the flag is given (not on every start)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show program's version number and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"kubespan {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubespan", description="KubeSpan-style WireGuard mesh, standalone.")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)
    d = MeshConfig()

    run = sub.add_parser(
        "run",
        help="run the mesh",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__,
    )
    run.add_argument(
        "--cluster-id", required=True, help="cluster id (Talos cluster.id); sent to discovery in clear"
    )
    sec = run.add_mutually_exclusive_group()
    sec.add_argument(
        "--cluster-secret", help="base64 of 32 bytes (prefer --cluster-secret-file or the environment)"
    )
    sec.add_argument("--cluster-secret-file", type=Path, help="file holding the base64 cluster secret")
    run.add_argument(
        "--discovery",
        action="append",
        required=True,
        metavar="URL",
        help="discovery service (http:// = h2c, https:// = TLS); repeat for independent registries. "
        "Replicas of one registry go in one URL: a host list (https://10.0.0.1:3000,10.0.0.2:3000,"
        "[fd00::3]:3000; one scheme, a port per host) or a name with several A/AAAA records; "
        "the node moves to another replica within ~2 s when its replica dies",
    )
    run.add_argument("--discovery-ca", type=Path, help="CA bundle for TLS discovery endpoints")
    run.add_argument("--state-dir", type=Path, required=True, help="where the key and node id are kept")
    run.add_argument("--nodename", default=socket.gethostname(), help="label shown to peers")
    run.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto")
    run.add_argument("--wireguard-go", default="wireguard-go", help="userspace backend binary")
    run.add_argument(
        "--socket-dir", type=Path, default=Path("/var/run/wireguard"), help="wireguard-go UAPI socket dir"
    )
    run.add_argument("--link", default=d.link_name, help="WireGuard link name")
    run.add_argument("--listen-port", type=int, default=d.listen_port)
    run.add_argument("--mtu", type=int, default=d.mtu, help="link MTU (minimum 1280)")
    run.add_argument(
        "--keepalive", type=int, default=d.persistent_keepalive, help="persistent keepalive, seconds"
    )
    run.add_argument("--table", type=int, default=d.routing_table, help="routing table for marked traffic")
    run.add_argument("--rule-priority", type=int, default=d.rule_priority)
    run.add_argument("--fwmark-wireguard", type=lambda s: int(s, 0), default=d.fwmark_wireguard)
    run.add_argument("--fwmark-force", type=lambda s: int(s, 0), default=d.fwmark_force)
    run.add_argument("--fwmark-mask", type=lambda s: int(s, 0), default=d.fwmark_mask)
    run.add_argument("--nft-table", default=d.nft_table, help="dedicated inet table")
    run.add_argument(
        "--steering",
        choices=STEERINGS,
        default=d.steering,
        help="how mesh traffic finds the link: 'marks' (Talos: nftables marks, a fwmark rule, a default "
        "route in the table) or 'routes' (a route per peer prefix, a 'not fwmark' rule, no nftables "
        "on the packet path: faster)",
    )
    run.add_argument("--advertise", action="append", type=_cidr, default=[], metavar="CIDR")
    run.add_argument(
        "--exclude", action="append", type=_cidr, default=[], metavar="CIDR", help="never advertised"
    )
    run.add_argument(
        "--endpoint-filter",
        action="append",
        type=_filter,
        default=[],
        metavar="F",
        help="CIDR, or !CIDR to drop (in order, as Talos; only !CIDRs: every address but those)",
    )
    run.add_argument("--extra-endpoint", action="append", type=_addrport, default=[], metavar="IP:PORT")
    run.add_argument(
        "--stun-server",
        action="append",
        type=_stun_server,
        default=[],
        metavar="HOST:PORT",
        help="STUN responder for endpoint discovery from the WireGuard port (discovery-service "
        "--stun-addr, or any standard STUN server); two on different IPs classify the NAT",
    )
    run.add_argument(
        "--relay",
        action="store_true",
        help="relay WireGuard traffic for peers that cannot reach each other directly (needs a public "
        "or port-forwarded endpoint; announced in the encrypted affiliate data)",
    )
    run.add_argument(
        "--punch-retry-initial",
        type=parse_duration,
        default="60s",
        metavar="DURATION",
        help="after a failed punch, retry direct this long later (the relay carries the peer meanwhile)",
    )
    run.add_argument(
        "--punch-retry-max",
        type=parse_duration,
        default="10m",
        metavar="DURATION",
        help="the retry delay doubles after each failed punch up to this (at least --punch-retry-initial)",
    )
    run.add_argument("--mac", type=_mac, help="MAC for the mesh address (default: first physical NIC)")
    run.add_argument(
        "--allow-down-peer-bypass",
        action="store_true",
        help="fail open, as Talos: route only peers that are up into the mesh; traffic to a peer that is down "
        "or not connected yet takes the normal routes (in the clear)",
    )
    run.add_argument("--no-publish-learned", action="store_true", help="do not publish roamed endpoints")
    run.add_argument(
        "--control-plane-port",
        type=_port,
        metavar="PORT",
        help="this node serves the Kubernetes API on PORT: publish it in the affiliate (control_plane, as "
        "Talos control planes publish cluster.controlPlane.localAPIServerPort; Talos nodes' KubePrism then "
        "uses this node's addresses as API server endpoints); default: not published",
    )
    run.add_argument(
        "--http-addr",
        default=DEFAULT_HTTP_ADDR,
        type=_hostport,
        help="/ (this node's page), /status, /metrics, /healthz (read-only; loopback by default)",
    )
    run.add_argument(
        "--keep-on-exit",
        action="store_true",
        help="restart semantics: keep link, routes, rules, nftables and the discovery entry on exit "
        "(default: leave the mesh and remove everything)",
    )
    run.add_argument("--debug", action="store_true")

    st = sub.add_parser("status", help="print the peer table of a running mesh")
    st.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, help="the mesh's --http-addr")
    st.add_argument("-o", "--output", choices=("table", "json"), default="table")
    return p


def mesh_config(ns: argparse.Namespace) -> MeshConfig:
    """The MeshConfig the ``run`` flags describe; a ``ConfigError`` lists every bad value."""
    return MeshConfig(**{name: getattr(ns, flag[2:].replace("-", "_")) for name, flag in MESH_FLAGS.items()})


def flag_problems(error: ConfigError) -> str:
    """``--flag: rule`` for every problem MeshConfig found, joined for ``parser.error``."""
    return "; ".join(f"{MESH_FLAGS.get(e.field, e.field)}: {e.rule}" for e in error.errors)


def punch_timings(ns: argparse.Namespace) -> PunchTimings:
    """The punch timings the ``run`` flags describe; ``ValueError`` names the bad flag."""
    initial, most = ns.punch_retry_initial, ns.punch_retry_max
    if not initial > 0:
        raise ValueError(f"--punch-retry-initial: must be greater than 0, got {initial:g}s")
    if most < initial:
        raise ValueError(f"--punch-retry-max: {most:g}s is below --punch-retry-initial {initial:g}s")
    return PunchTimings(retry_initial=initial, retry_max=most)


def read_secret(ns: argparse.Namespace) -> bytes:
    if ns.cluster_secret_file:
        text = ns.cluster_secret_file.read_text().strip()
    elif ns.cluster_secret:
        text = ns.cluster_secret
    elif os.environ.get("KUBESPAN_CLUSTER_SECRET"):
        text = os.environ["KUBESPAN_CLUSTER_SECRET"]
    else:
        raise SystemExit(
            "kubespan: a cluster secret is required (--cluster-secret-file, or KUBESPAN_CLUSTER_SECRET)"
        )
    try:
        return parse_secret(text)
    except SecretError as e:
        raise SystemExit(f"kubespan: cluster secret: {e}") from None


def mesh_options(ns: argparse.Namespace, cfg: MeshConfig, secret: bytes) -> MeshOptions:
    """The engine's options from the ``run`` flags (``cfg``: :func:`mesh_config` of ``ns``)."""
    return MeshOptions(
        cluster_id=ns.cluster_id,
        cluster_secret=secret,
        state_dir=ns.state_dir,
        nodename=ns.nodename,
        hostname=socket.gethostname(),
        config=cfg,
        advertise=ns.advertise,
        exclude=ns.exclude,
        endpoint_filters=everything_but(ns.endpoint_filter),
        extra_endpoints=ns.extra_endpoint,
        mac=ns.mac,
        publish_learned=not ns.no_publish_learned,
        stun_servers=tuple(ns.stun_server),
        relay=ns.relay,
        punch_timings=punch_timings(ns),
        api_server_port=ns.control_plane_port,
    )


async def run(ns: argparse.Namespace, cfg: MeshConfig) -> int:
    """Run the mesh until SIGTERM/SIGINT; ``cfg`` is :func:`mesh_config` of ``ns``, already checked."""
    secret = read_secret(ns)
    warn_permissions(log, (ns.cluster_secret_file,), ns.state_dir)
    opts = mesh_options(ns, cfg, secret)
    runner = await build_mesh(
        opts,
        discovery_urls=ns.discovery,
        discovery_ca=ns.discovery_ca,
        backend=ns.backend,
        wireguard_go=ns.wireguard_go,
        socket_dir=ns.socket_dir,
    )
    mesh = runner.mesh
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics = MetricsPage(lambda: mesh.status() if mesh.identity else None, lambda: runner.discovery)
    http = await serve_http(ns.http_addr, mesh, metrics)
    try:
        await runner.start()
    except Exception as e:
        log_event(log, "mesh failed to start", logging.ERROR, error=str(e))
        await http.stop()
        return 1
    log_event(log, "mesh running", http=f"{ns.http_addr[0]}:{ns.http_addr[1]}", discovery=ns.discovery)
    await stop.wait()
    log_event(log, "stopping", leave=not ns.keep_on_exit)
    # leaving: tell discovery first so peers drop us now rather than when the TTL runs out
    await runner.stop(cleanup=not ns.keep_on_exit)
    await http.stop()
    return 0


class MetricsPage:
    """``/metrics``: the mesh's and the discovery link's collectors (kubespan.metrics) in a registry of
    their own. Both compute everything at scrape time, so the registry is built on the first scrape
    rather than at start: prometheus_client is imported only then (start-up CPU, issue 18)."""

    def __init__(self, status: Callable[[], MeshStatus | None], discovery: Callable[[], Any]) -> None:
        self._status = status
        self._discovery = discovery  # the running discovery client, or None
        self._registry: CollectorRegistry | None = None

    def registry(self) -> CollectorRegistry:
        """The registry with both collectors (built on the first call)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry  # deferred: see the class docstring

            from kubespan.metrics import DiscoveryCollector, MeshCollector

            registry = CollectorRegistry()
            MeshCollector(self._status, registry)
            DiscoveryCollector(self._discovery, registry)
            self._registry = registry
        return self._registry

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry()), CONTENT_TYPE_LATEST


async def serve_http(addr: tuple[str, int], mesh: Mesh, metrics_page: MetricsPage) -> Server:
    """Start the agent's HTTP server on ``addr``: /status, /metrics, /healthz and the node page.

    spanutil.minihttp rather than aiohttp: importing aiohttp.web was the largest single start-up cost
    (issue 18), and these pages need only GET on fixed paths."""

    async def status(_: Request) -> Response:
        if mesh.identity is None:
            return Response.json({"error": "starting"}, status=503)
        return Response.json(mesh.status().as_dict())

    async def metrics(_: Request) -> Response:
        body, ctype = metrics_page.render()
        return Response(200, body, {"Content-Type": ctype})

    async def healthz(_: Request) -> Response:
        ok = mesh.ready.is_set()
        return Response.text("ok\n" if ok else "starting\n", status=200 if ok else 503)

    async def page(request: Request) -> Response:
        found = nodepage.lookup(request.path)
        assert found is not None, "routed only for nodepage.FILES"
        ctype, body = found
        return Response(200, body, {"Content-Type": ctype, **nodepage.HEADERS})

    server = Server(
        {"/status": status, "/metrics": metrics, "/healthz": healthz, **dict.fromkeys(nodepage.FILES, page)}
    )
    await server.start(addr[0], addr[1])
    return server


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0, int(now - ts))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def _rtt(seconds: Any) -> str:
    """A smoothed probe round trip in ms, or ``-`` when there is none (no probe answered yet): never
    a made-up 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "-"
    return f"{seconds * 1000:.1f} ms"


def format_table(st: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [("LABEL", "ENDPOINT", "STATE", "PATH", "RX", "TX", "LAST HANDSHAKE", "RTT", "NAT")]
    for p in sorted(st.get("peers", []), key=lambda p: p["label"]):
        rows.append(
            (
                p["label"],
                p["endpoint"] or "-",
                p["state"],
                _path(p),
                _human_bytes(p["rx_bytes"]),
                _human_bytes(p["tx_bytes"]),
                _ago(p["last_handshake"], now),
                _rtt(p.get("rtt")),
                p.get("nat_class") or "unknown",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = (
        f"node {st.get('nodename')} mesh {st.get('mesh_address')} port {st.get('listen_port')} "
        f"backend {st.get('backend')} steering {st.get('steering', 'marks')} "
        f"ready {str(st.get('ready')).lower()}"
    )
    extra = [f"conflict: {c}" for c in st.get("conflicts", [])]
    relay = [_relay_line(st["relay"])] if st.get("relay") else []
    return "\n".join([head, _nat_line(st.get("nat") or {}), *relay, *lines, *extra])


def _relay_line(r: dict[str, Any]) -> str:
    """``relay 2 allocations, 1532 packets (1.2 MiB) forwarded, dropped forged_mac1=3``."""
    text = "relay" + ("" if r.get("running") else " (not running)")
    text += f" {r.get('allocations', 0)} allocations, {r.get('forwarded_packets', 0)} packets"
    text += f" ({_human_bytes(r.get('forwarded_bytes', 0))}) forwarded"
    dropped = r.get("dropped") or {}
    if dropped:
        text += ", dropped " + " ".join(f"{k}={v}" for k, v in sorted(dropped.items()))
    return text


def _path(p: dict[str, Any]) -> str:
    """``direct``, ``lan``, ``relay via node-r``, ``none``; with why it is not direct in parentheses."""
    text = p.get("path") or "none"
    if text == "relay" and p.get("relay_via"):
        text += f" via {p['relay_via']}"
    if p.get("why_not_direct"):
        text += f" ({p['why_not_direct']})"
    return text


def _nat_line(nat: dict[str, Any]) -> str:
    """``nat eim mapped 198.51.100.7:40000 (published) via 2 responders``, or the reason there is none."""
    text = f"nat {nat.get('nat_class') or 'unknown'}"
    if nat.get("mapped"):
        text += f" mapped {nat['mapped']}" + (" (published)" if nat.get("published") else "")
    if nat.get("responders"):
        text += f" via {len(nat['responders'])} responder{'s' if len(nat['responders']) != 1 else ''}"
    if nat.get("error"):
        text += f" ({nat['error']})"
    return text


def status(ns: argparse.Namespace) -> int:
    import urllib.error  # deferred: only this subcommand needs it (start-up CPU of `run`, issue 18)
    import urllib.request

    url = f"http://{ns.http_addr}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            st = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as e:
        print(f"kubespan: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if ns.output == "json" else format_table(st))
    return 0


def check_discovery_urls(urls: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first bad ``--discovery`` URL (or replica in its host list)."""
    from discovery.client.target import parse_endpoint_replicas  # imports grpc: only when run

    for url in urls:
        parse_endpoint_replicas(url)
    if len(set(urls)) != len(urls):
        raise ValueError("--discovery: an endpoint is given twice")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "status":
        return status(ns)
    try:
        cfg = mesh_config(ns)
    except ConfigError as e:
        parser.error(flag_problems(e))  # exits 2, like any other bad flag
    try:
        punch_timings(ns)
        check_discovery_urls(ns.discovery)
    except ValueError as e:
        parser.error(str(e))
    setup(debug=ns.debug)
    if os.geteuid() != 0:
        print("kubespan run: needs root (network configuration)", file=sys.stderr)
        return 1
    return asyncio.run(run(ns, cfg))


if __name__ == "__main__":
    sys.exit(main())
