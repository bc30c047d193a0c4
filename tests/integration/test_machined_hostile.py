"""A real machined (mesh off, as in test_spanctl's local agent) against hostile ApplyConfiguration calls
over its unix socket.

Alias bombs, 50k ``[``, a 20 MB field, 10,000 documents and a 2^62 s ``try_mode_timeout`` are all
INVALID_ARGUMENT with a short message naming the limit (before: seconds to minutes of stall, UNKNOWN
with a 200 KB traceback, RESOURCE_EXHAUSTED from an 899 KB status); the API keeps answering Version
while they, and the heaviest dry run still accepted, are in flight; nothing is persisted. Also: a
``--socket`` path holding a regular file is refused and left alone, and a config file readable by
others is reported once at start.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, empty_pb2
from machined_lab import start_host_machined

from machined.apid.testing import stop_processes
from machined.config.testing import config_yaml
from spanapi.talos.machine import machine_pb2, machine_pb2_grpc

SECRET = base64.b64encode(b"h" * 32).decode()
AUTO = machine_pb2.ApplyConfigurationRequest.AUTO
TRY = machine_pb2.ApplyConfigurationRequest.TRY
PROMPT = 10.0  # a generous bound on a Version call; before the fix they timed out for 20 s to minutes
MiB = 1 << 20


def config() -> str:
    return config_yaml(
        cluster_id="hostile-it",
        secret=SECRET,
        discovery=(),
        kubespan=False,
        agent={"nodename": "hostile-node", "httpStatusAddr": ""},
    )


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol"]'] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)
    ]
    return config() + "---\napiVersion: v1alpha1\nkind: Bomb\n" + "".join(f"{x}\n" for x in lines)


def heavy_but_valid() -> str:
    """The largest kind of config still accepted: ~90,000 nodes, ~3.5 MB, every line different from the
    running config (the dry run's diff is as big as it gets)."""
    sysctls = "".join(f"        net.test.key{i}: value-{i}-{'v' * 40}\n" for i in range(44_000))
    return config().replace("machine:\n", "machine:\n    sysctls:\n" + sysctls, 1)


@dataclass
class Machined:
    proc: subprocess.Popen[bytes]
    dir: Path
    socket: Path
    log: Path

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def stub(self, ch: grpc.Channel) -> machine_pb2_grpc.MachineServiceStub:
        return machine_pb2_grpc.MachineServiceStub(ch)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            f"unix:{self.socket}",
            options=[
                ("grpc.max_send_message_length", 64 * MiB),
                ("grpc.max_receive_message_length", 64 * MiB),
            ],
        )


def start(d: Path, *extra: str, config_mode: int = 0o600) -> tuple[subprocess.Popen[bytes], Path]:
    return start_host_machined(d, config(), *extra, config_mode=config_mode)


@pytest.fixture(scope="module")
def machined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machined]:
    d = tmp_path_factory.mktemp("hostile")
    sock = d / "api" / "machined.sock"
    proc, log = start(d, "--socket", str(sock), config_mode=0o644)
    m = Machined(proc, d, sock, log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with m.channel() as ch:
                    m.stub(ch).Version(empty_pb2.Empty(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        if proc.poll() is not None or not sock.exists():
            pytest.fail(f"machined did not start: {log.read_text()[-3000:]}")
        yield m
    finally:
        stop_processes([proc], 15)


def apply(
    m: Machined, data: str | bytes, timeout: float = 120, **kw: object
) -> grpc.RpcError | machine_pb2.ApplyConfigurationResponse:
    raw = data.encode() if isinstance(data, str) else data
    kw.setdefault("mode", AUTO)
    with m.channel() as ch:
        try:
            return m.stub(ch).ApplyConfiguration(
                machine_pb2.ApplyConfigurationRequest(data=raw, **kw), timeout=timeout
            )
        except grpc.RpcError as e:
            return e


def versions_while(m: Machined, fut: concurrent.futures.Future[object]) -> list[float]:
    """Call Version until ``fut`` is done (at least three times); each must answer within PROMPT."""
    took: list[float] = []
    with m.channel() as ch:
        stub = m.stub(ch)
        while not fut.done() or len(took) < 3:
            t0 = time.monotonic()
            v = stub.Version(empty_pb2.Empty(), timeout=PROMPT)
            took.append(time.monotonic() - t0)
            assert v.messages[0].metadata.hostname == "hostile-node"
            time.sleep(0.05)
    return took


HOSTILE = {
    "alias-bomb-1e5": (lambda: alias_bomb(5), "alias expansion exceeds 100000 nodes"),
    "alias-bomb-1e6": (lambda: alias_bomb(6), "alias expansion exceeds 100000 nodes"),
    "alias-bomb-1e30": (lambda: alias_bomb(30), "alias expansion exceeds 100000 nodes"),
    "50k-brackets": (lambda: "[" * 50_000, "nesting deeper than 64 levels"),
    "5k-nested-mappings": (lambda: "{a: " * 5_000 + "1" + "}" * 5_000, "nesting deeper than 64 levels"),
    "20MB-field": (
        lambda: config() + "---\nkind: Big\nfield: " + "x" * 20_000_000 + "\n",
        "bytes, limit 4194304",
    ),
    "10k-documents": (lambda: "---\n".join([config()] * 10_000), "more than 64 documents"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "apply"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_is_refused_and_version_keeps_answering(
    machined: Machined, name: str, dry_run: bool
) -> None:
    persisted = (machined.state / "config.yaml").read_bytes()
    text, expected = HOSTILE[name]
    data = text()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(apply, machined, data, dry_run=dry_run)
        versions_while(machined, fut)
        e = fut.result()
    assert isinstance(e, grpc.RpcError), e
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details()[:500])
    assert expected in e.details() and e.details().startswith(
        "invalid machine config (1 problem):\n  - config: "
    )
    assert len(e.details()) < 512
    # nothing persisted, nothing staged, and the next apply is not slowed by anything left behind
    assert (machined.state / "config.yaml").read_bytes() == persisted
    assert not (machined.state / "config.staged.yaml").exists()
    with machined.channel() as ch:
        machined.stub(ch).Version(empty_pb2.Empty(), timeout=PROMPT)
    r = apply(machined, config(), dry_run=True, timeout=PROMPT)
    assert isinstance(r, machine_pb2.ApplyConfigurationResponse), r
    assert r.messages[0].mode_details.endswith("No changes.")


def test_huge_try_mode_timeout_is_invalid_argument(machined: Machined) -> None:
    e = apply(machined, config(), mode=TRY, try_mode_timeout=duration_pb2.Duration(seconds=2**62))
    assert isinstance(e, grpc.RpcError) and e.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("try_mode_timeout: must be greater than 0 and at most 86400 s")


def test_many_problems_fit_in_the_status(machined: Machined) -> None:
    docs = config().split("---\n")
    many = "---\n".join([*docs, *([docs[-1]] * 60)])  # 60 duplicate documents
    e = apply(machined, many)
    assert isinstance(e, grpc.RpcError) and e.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "(60 problems)" in e.details() and e.details().endswith("and 50 more")


def test_heavy_dry_runs_do_not_stall_the_api(machined: Machined) -> None:
    """Three concurrent dry runs of the heaviest config still accepted (parse, redaction and a diff of
    ~90,000 changed lines each, in worker threads): Version answers throughout."""
    persisted = (machined.state / "config.yaml").read_bytes()
    data = heavy_but_valid()
    assert 3 * MiB < len(data) < 4 * MiB
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(apply, machined, data, dry_run=True) for _ in range(3)]
        took = versions_while(machined, futs[-1])
        print(f"Version during the heavy dry runs: {len(took)} calls, slowest {max(took):.3f} s")
        results = [f.result() for f in futs]
    for r in results:
        assert isinstance(r, machine_pb2.ApplyConfigurationResponse), r
        assert "+        net.test.key43999: value-43999-" in r.messages[0].mode_details
    assert (machined.state / "config.yaml").read_bytes() == persisted


def test_no_tracebacks_and_one_permission_warning(machined: Machined) -> None:
    log = machined.log.read_text(errors="replace")
    assert "Traceback" not in log
    lines = [json.loads(x) for x in log.splitlines() if "cluster secret is readable by group and others" in x]
    assert len(lines) == 1 and lines[0]["level"] == "warning" and lines[0]["mode"] == "0644", lines


def test_a_socket_path_holding_a_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("do not delete\n")
    proc, log = start(tmp_path, "--socket", str(victim))
    assert proc.wait(30) == 2
    out = log.read_text()
    assert f"{victim} is a regular file, not a unix socket: refusing to replace it" in out
    assert victim.read_text() == "do not delete\n"
    assert not (tmp_path / "state" / "config.yaml").exists()  # refused before anything else


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "m.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    proc, log = start(tmp_path, "--socket", str(sock))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(f"unix:{sock}") as ch:
                    machine_pb2_grpc.MachineServiceStub(ch).Version(empty_pb2.Empty(), timeout=2)
                break
            except grpc.RpcError:
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.2)
        else:
            pytest.fail(log.read_text()[-2000:])
    finally:
        proc.terminate()
        proc.wait(15)
    assert not os.path.exists(sock)
