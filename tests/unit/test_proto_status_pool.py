"""google.rpc.Status comes from googleapis-common-protos: our common.proto imports its
``google/rpc/status.proto``, so the two share one descriptor in the default pool. A local copy of the
message (as we had) made the second import fail ("duplicate symbol google.rpc.Status") in whichever
order the two modules were loaded; each order runs in a fresh interpreter here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import {first}, {second}
from google.rpc import status_pb2
from spanapi.talos.common import common_pb2

field = common_pb2.Metadata.DESCRIPTOR.fields_by_name["status"]
assert field.message_type is status_pb2.Status.DESCRIPTOR, "two google.rpc.Status descriptors"
assert field.message_type.file.name == "google/rpc/status.proto", field.message_type.file.name
assert [d.name for d in common_pb2.DESCRIPTOR.dependencies] == ["google/rpc/status.proto"]

# a Status from googleapis-common-protos decodes inside our Metadata, and back
st = status_pb2.Status(code=14, message="connection refused")
md = common_pb2.Metadata.FromString(
    common_pb2.Metadata(hostname="n1", status=st).SerializeToString()
)
assert md.status == st and type(md.status) is status_pb2.Status
wire = bytes([0x1A, len(st.SerializeToString())]) + st.SerializeToString()  # field 3, length-delimited
assert common_pb2.Metadata.FromString(wire).status.message == "connection refused"
assert status_pb2.Status.FromString(md.status.SerializeToString()).code == 14
print("ok")
"""


@pytest.mark.parametrize(
    "first, second",
    [
        ("google.rpc.status_pb2", "spanapi.talos.common.common_pb2"),
        ("spanapi.talos.common.common_pb2", "google.rpc.status_pb2"),
    ],
)
def test_status_shared_with_googleapis_in_one_process(first: str, second: str) -> None:
    p = subprocess.run(
        [sys.executable, "-c", CHECK.format(first=first, second=second)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ok\n"


def test_no_local_google_rpc_left() -> None:
    assert not (ROOT / "proto" / "spanapi" / "talos" / "google").exists()
    assert not (ROOT / "spanapi" / "talos" / "google").exists()
