"""``python -m kubespan.relay``: argument errors, and a real run on loopback that forwards, reports and
stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubespan.relay.__main__ import build_parser
from kubespan.relay.testing import handshake, transport
from kubespan.wireguard.types import PublicKey


def b64() -> tuple[bytes, str]:
    raw = os.urandom(32)
    return raw, PublicKey(raw).b64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alloc", "onlyone"], "KEY_A,KEY_B"),
        (["--alloc", "AAAA,BBBB"], "argument --alloc: PublicKey: decodes to 3 bytes, need 32"),
        (["--alloc", "!!,??"], "not valid base64"),
        (["--ports", "9-1"], "argument --ports: '9-1' must lie within 1-65535, first <= last"),
        (["--ports", "x"], "not PORT or FIRST-LAST"),
        (["--idle-timeout", "soon"], "invalid duration"),
    ],
)
def test_bad_arguments_name_the_problem(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_forwards_reports_and_stops_on_sigterm(tmp_path: Path) -> None:
    (ka, ta), (kb, tb) = b64(), b64()
    status = tmp_path / "status.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubespan.relay", "--listen", "127.0.0.1", "--alloc", f"{ta},{tb}",
         "--status-file", str(status), "--status-interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        assert first["key_a"] == ta and first["key_b"] == tb
        pa, pb = first["ports"]
        a, b = socket.socket(type=socket.SOCK_DGRAM), socket.socket(type=socket.SOCK_DGRAM)
        with a, b:
            for s in (a, b):
                s.bind(("127.0.0.1", 0))
                s.settimeout(2)
            a.sendto(handshake(kb), ("127.0.0.1", pa))
            time.sleep(0.05)
            b.sendto(handshake(ka), ("127.0.0.1", pb))
            assert a.recvfrom(2048)[1] == ("127.0.0.1", pa)
            data = transport()
            a.sendto(data, ("127.0.0.1", pa))
            assert b.recv(2048) == data
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            doc = json.loads(status.read_text()) if status.exists() else {"allocations": [{}]}
            if doc["allocations"][0].get("forwarded_packets") == 2:
                break
            time.sleep(0.05)
        assert doc["allocations"][0]["ports"] == [pa, pb] and doc["allocations"][0]["forwarded_packets"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "relay allocation released" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
