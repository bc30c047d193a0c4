"""Hostile configs are refused while the YAML is composed, with INVALID_ARGUMENT-class errors naming the
limit: size, nesting depth (also through aliases), node count after alias expansion (alias bombs,
recursive aliases), document count. Error messages stay bounded however many problems there are, the
dry-run diff stays cheap on any input, and ``try_timeout`` is range-checked."""

from __future__ import annotations

import difflib
import random
import re

import pytest

from machined.config import (
    MAX_TRY_TIMEOUT,
    ApplyError,
    ApplyMode,
    ConfigManager,
    ConfigStore,
    ConfigValidationError,
    ConfigWarning,
    MachineConfig,
    Problem,
)
from machined.config import redact as redact_mod
from machined.config.errors import MAX_LISTED
from machined.config.redact import unified_diff
from machined.config.testing import ManualTimer, config_yaml, new_secret
from machined.config.yamlio import MAX_BYTES, MAX_DEPTH, MAX_DOCUMENTS, MAX_NODES, load_documents

SECRET = new_secret()
HEAD = "version: v1alpha1\nmachine:\n  type: worker\n"


def base(**kw: object) -> str:
    return config_yaml(secret=SECRET, discovery=(), kubespan=False, **kw)


def alias_bomb(levels: int, fan: int = 10) -> str:
    """'Billion laughs': ``fan ** levels`` leaves from a few hundred bytes."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return HEAD + "extra:\n" + "".join(f"  {line}\n" for line in lines)


def refusal(text: str | bytes, what: str = "config") -> str:
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(text)
    [p] = e.value.problems
    assert p.document == what and p.index == -1
    return p.rule


# -- limits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [5, 6, 9, 30])
def test_alias_bombs_are_refused_before_expansion(levels):
    text = alias_bomb(levels)  # 10**5 to 10**30 leaves
    assert len(text) < 2500
    rule = refusal(text)
    assert rule.startswith(f"alias expansion exceeds {MAX_NODES} nodes (line ")


def test_aliases_are_counted_every_time_they_are_referenced():
    # 4 levels of 10: 11,111 nodes expanded; fine alone, over the limit nine times over
    assert len(load_documents(alias_bomb(4))) == 1
    many = alias_bomb(4) + "more: [" + ", ".join(["*a4"] * 9) + "]\n"
    assert refusal(many).startswith(f"alias expansion exceeds {MAX_NODES} nodes")
    # ordinary aliases stay usable and are resolved
    [doc] = load_documents("a: &x {k: [1, 2]}\nb: *x\nc: {<<: *x, d: 3}\n")
    assert doc == {"a": {"k": [1, 2]}, "b": {"k": [1, 2]}, "c": {"k": [1, 2], "d": 3}}


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: [1, *a]}\n"])
def test_a_recursive_alias_is_refused(text):
    assert re.fullmatch(r"alias \*a refers to a node that contains it \(line 1, column \d+\)", refusal(text))


def test_too_many_nodes_without_aliases():
    text = "a: [" + ", ".join(["1"] * (MAX_NODES + 10)) + "]\n"
    assert refusal(text).startswith(f"more than {MAX_NODES} nodes")


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000,  # unclosed flow sequences (was a RecursionError: UNKNOWN)
        "{a: " * 5_000 + "1" + "}" * 5_000,  # nested flow mappings
        "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n",  # nested block mappings
        "- " * 100 + "x\n",
    ],
    ids=["50k-brackets", "5k-flow-mappings", "block-mappings", "block-sequences"],
)
def test_deep_nesting_is_refused(text):
    assert refusal(text).startswith(f"nesting deeper than {MAX_DEPTH} levels (line ")


def test_nesting_through_aliases_counts_the_expanded_depth():
    deep = "[" * 40 + "]" * 40
    text = f"a: &a {deep}\nb: &b {'[' * 30}*a{']' * 30}\n"
    assert refusal(text).startswith(f"nesting deeper than {MAX_DEPTH} levels through alias *a")
    ok = "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)
    assert load_documents(f"a: {ok}\n")  # the root mapping plus 63 sequences: at the limit


def test_a_20mb_field_is_refused_by_size():
    text = HEAD + "extra: " + "x" * 20_000_000 + "\n"
    assert refusal(text) == f"{len(text)} bytes, limit {MAX_BYTES} (4 MiB)"
    assert refusal(text.encode()) == f"{len(text)} bytes, limit {MAX_BYTES} (4 MiB)"
    # bytes, not characters
    text = HEAD + "extra: " + "é" * (MAX_BYTES // 2) + "\n"
    assert refusal(text).startswith(f"{len(text.encode())} bytes, limit {MAX_BYTES}")


def test_too_many_documents():
    assert refusal("---\nversion: v1alpha1\n" * 10_000).startswith(f"more than {MAX_DOCUMENTS} documents")


def test_limits_apply_to_patches_too():
    from machined.config import PatchError, load_patch

    with pytest.raises((ConfigValidationError, PatchError)) as e:
        load_patch(alias_bomb(6))
    assert "alias expansion exceeds" in str(e.value)


def test_a_realistic_large_config_is_accepted():
    """Talos-style inline manifests (1.5 MB of YAML as a string) and many documents stay under the limits."""
    manifest = "".join(f"    - name: item-{i}\n      value: {'v' * 40}\n" for i in range(25_000))
    text = base(services=[{"name": f"svc{i}", "command": "/bin/true"} for i in range(40)])
    text = text.replace(
        "machine:\n",
        "machine:\n    kubelet:\n        image: kubelet\n",
        1,
    ).replace(
        "cluster:\n",
        "cluster:\n    inlineManifests:\n        - name: cni\n          contents: |\n"
        + "".join("            " + line + "\n" for line in manifest.splitlines()),
        1,
    )
    assert 1_500_000 < len(text) < MAX_BYTES
    cfg = MachineConfig.parse(text)
    assert len(cfg.services()) == 40


# -- bounded messages --------------------------------------------------------------------------------------


def test_ten_thousand_duplicate_documents_give_a_bounded_message():
    one = base().split("---\n")
    dup = "---\n".join([*one, *([one[-1].rstrip("\n") + "\n"] * 60)])
    with pytest.raises(ConfigValidationError) as e:
        MachineConfig.parse(dup)
    msg = str(e.value)
    assert len(e.value.problems) == 60  # every problem is kept ...
    assert msg.count("\n  - ") == MAX_LISTED + 1  # ... the message lists ten and counts the rest
    assert msg.endswith("  - and 50 more") and len(msg) < 4096
    assert "duplicates document" in msg


def test_problem_lines_are_clipped():
    long_key = "k" * 100_000
    problems = tuple(Problem("AgentConfig", 3, long_key, f"unknown field {i}") for i in range(10_000))
    msg = str(ConfigValidationError(problems))
    assert len(msg) < 4096 and msg.startswith("invalid machine config (10000 problems):")
    assert msg.endswith("  - and 9990 more")


def test_warnings_list_a_bounded_number_of_paths():
    w = ConfigWarning("v1alpha1", 0, "fields not used", tuple(f"v1alpha1.machine.f{i}" for i in range(5000)))
    text = str(w)
    assert "v1alpha1.machine.f9," in text and "v1alpha1.machine.f10," not in text
    assert text.endswith("and 4990 more") and len(text) < 4096


# -- the dry-run diff stays cheap --------------------------------------------------------------------------


def _patch(a: list[str], diff: str) -> list[str]:
    """``a`` with the unified ``diff`` applied (checks that the diff is a correct one)."""
    out, pos, lines = [], 0, diff.splitlines()[2:]
    k = 0
    while k < len(lines):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@$", lines[k])
        assert m, lines[k]
        start = int(m.group(1)) - (1 if m.group(2) != "0" else 0)
        out += a[pos:start]
        pos, k = start, k + 1
        while k < len(lines) and not lines[k].startswith("@@"):
            tag, text = lines[k][0], lines[k][1:]
            if tag in " -":
                assert a[pos] == text
                pos += 1
            if tag in " +":
                out.append(text)
            k += 1
    return out + a[pos:]


def test_a_pathological_diff_takes_the_bounded_path():
    # every other line changed: difflib alone takes minutes on this (quadratic matching)
    a = [f"    key{i}: value{i}" for i in range(50_000)]
    b = [x + "x" if i % 2 else x for i, x in enumerate(a)]
    d = unified_diff("\n".join(a), "\n".join(b))
    assert _patch(a, d) == b
    lines = d.splitlines()[2:]
    assert sum(x.startswith("-") for x in lines) == sum(x.startswith("+") for x in lines) == 25_000


def test_the_bounded_diff_is_a_correct_diff(monkeypatch):
    monkeypatch.setattr(redact_mod, "_DIFFLIB_WORK", 0)  # always the bounded path
    rnd = random.Random(7)
    for budget in (10_000_000, 4):
        monkeypatch.setattr(redact_mod, "_GAP_WORK", budget)
        for _ in range(200):
            a = [f"l{rnd.randint(0, 20)}" for _ in range(rnd.randint(0, 50))]
            b = [x for x in a if rnd.random() < 0.8] + [
                f"n{rnd.randint(0, 9)}" for _ in range(rnd.randint(0, 5))
            ]
            if rnd.random() < 0.3:
                rnd.shuffle(b)
            d = unified_diff("\n".join(a), "\n".join(b))
            if a == b:
                assert d == "No changes."
            else:
                assert _patch(a, d) == b
    # small inputs keep difflib's own output
    monkeypatch.undo()
    a, b = ["x", "y", "z"], ["x", "q", "z"]
    assert (
        unified_diff("\n".join(a), "\n".join(b))
        == "\n".join(difflib.unified_diff(a, b, "current", "new", lineterm="")) + "\n"
    )


# -- try timeout -------------------------------------------------------------------------------------------


@pytest.fixture
def mgr(tmp_path):
    m = ConfigManager(ConfigStore(tmp_path / "state"), timer=ManualTimer())
    m.boot(MachineConfig.parse(base()))
    return m


@pytest.mark.parametrize("seconds", [2.0**62, MAX_TRY_TIMEOUT + 1, 0, -5, float("nan"), float("inf")])
def test_try_timeout_out_of_range_is_invalid_argument(mgr, seconds):
    for dry_run in (True, False):
        with pytest.raises(ApplyError) as e:
            mgr.apply(base(), ApplyMode.TRY, dry_run=dry_run, try_timeout=seconds)
        assert e.value.code == "invalid_argument"
        assert str(e.value).startswith("try_mode_timeout: must be greater than 0 and at most 86400 s")
    assert mgr.pending is None


def test_try_timeout_is_ignored_by_other_modes(mgr):
    assert mgr.apply(base(), ApplyMode.NO_REBOOT, try_timeout=2.0**62).mode is ApplyMode.NO_REBOOT
    r = mgr.apply(base(), ApplyMode.TRY, try_timeout=MAX_TRY_TIMEOUT)
    assert r.pending is not None and r.pending.timeout == MAX_TRY_TIMEOUT


# -- the manager: nothing persisted, async path ------------------------------------------------------------


async def test_hostile_apply_persists_nothing(mgr):
    before = mgr.store.active_path.read_bytes()
    for text in (alias_bomb(6), "[" * 50_000, "x: " + "y" * (MAX_BYTES + 1)):
        for dry_run in (True, False):
            with pytest.raises(ConfigValidationError):
                await mgr.apply_async(text.encode(), ApplyMode.AUTO, dry_run=dry_run)
    assert mgr.store.active_path.read_bytes() == before and not mgr.store.has_staged()


async def test_apply_async_matches_apply(mgr):
    new = base(services=[{"name": "extra", "command": "/bin/true"}])
    sync = mgr.apply(new, dry_run=True)
    r = await mgr.apply_async(new.encode(), dry_run=True)
    assert r.diff == sync.diff and "+name: extra" in r.diff and SECRET not in r.diff
    assert r.effects == sync.effects and r.dry_run
    r = await mgr.apply_async(new.encode())
    assert r.diff == "" and r.effects.services_added == ("extra",)
    assert mgr.running.service("extra") is not None and mgr.store.load_active() == mgr.running
    r = await mgr.apply_async(base().encode(), ApplyMode.TRY, try_timeout=30)
    assert mgr.pending is not None and mgr.persisted.service("extra") is not None
