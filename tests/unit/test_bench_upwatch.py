"""bench/_meshlab.UpWatch: when each pair came up, read from agents' growing logs (issue 18)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import _meshlab

T0 = 1_800_000_000.0  # an epoch second: log times are whole milliseconds after it


@dataclass
class FakeNode:
    name: str
    log: Path


def line(at: float, msg: str, **fields: str) -> str:
    sec = int(at)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{round((at - sec) * 1000):03d}Z"
    return json.dumps({"ts": ts, "level": "info", "logger": "kubespan", "msg": msg, **fields}) + "\n"


def append(node: FakeNode, text: str) -> None:
    with node.log.open("a") as f:
        f.write(text)


def test_times_come_from_the_lines_and_a_flap_counts_at_its_last_up(tmp_path: Path) -> None:
    a, b = FakeNode("a", tmp_path / "a.log"), FakeNode("b", tmp_path / "b.log")
    append(a, line(T0 - 5, "peer state", peer="b", state="up"))  # before t0: an earlier join's
    watch = _meshlab.UpWatch([a, b], T0)
    watch.skip_existing()
    append(a, "wireguard-go noise\n" + line(T0 + 0.25, "peer state", peer="b", state="up"))
    watch.read()
    assert watch.all_up("a", ["b"]) == 0.25
    assert math.isinf(watch.all_up("b", ["a"]))  # b has no log yet
    append(a, line(T0 + 0.5, "peer state", peer="b", state="down"))
    watch.read()
    assert math.isinf(watch.all_up("a", ["b"]))  # down now
    append(a, line(T0 + 1.75, "peer state", peer="b", state="up"))
    watch.read()
    assert watch.all_up("a", ["b"]) == 1.75


def test_a_line_split_across_reads_is_parsed_once_whole(tmp_path: Path) -> None:
    a = FakeNode("a", tmp_path / "a.log")
    text = line(T0 + 0.5, "peer state", peer="b", state="up") + line(
        T0 + 0.75, "peer state", peer="c", state="up"
    )
    cut = len(text) - 20
    append(a, text[:cut])
    watch = _meshlab.UpWatch([a], T0)
    watch.read()
    assert watch.ups["a"] == {"b": 0.5}
    append(a, text[cut:])
    watch.read()
    assert watch.ups["a"] == {"b": 0.5, "c": 0.75}
    assert watch.all_up("a", ["b", "c"]) == 0.75
    assert math.isinf(watch.all_up("a", ["b", "c", "d"]))
