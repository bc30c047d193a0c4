"""Apply modes: AUTO (= NO_REBOOT), NO_REBOOT, STAGED, TRY with rollback and confirmation on a fake clock,
dry-run diffs with secrets redacted, listeners, and no partial change on errors."""

from __future__ import annotations

import pytest

from machined.config import (
    ApplyError,
    ApplyMode,
    ConfigEvent,
    ConfigManager,
    ConfigStore,
    ConfigValidationError,
    MachineConfig,
)
from machined.config.redact import REDACTED, REDACTED_NEW, REDACTED_OLD
from machined.config.testing import ManualTimer, config_yaml, new_secret

SECRET = new_secret()


def text(name: str = "one", secret: str = SECRET, **kw) -> str:
    kw.setdefault(
        "services", [{"name": "etcd", "command": "/usr/bin/etcd", "env": {"ETCD_TOKEN": "tok-" + name}}]
    )
    return config_yaml(secret=secret, **kw).replace("clusterName: test", f"clusterName: {name}")


@pytest.fixture
def env(tmp_path):
    timer = ManualTimer()
    store = ConfigStore(tmp_path / "state")
    mgr = ConfigManager(store, timer=timer)
    events: list[ConfigEvent] = []
    mgr.subscribe(events.append)
    first = MachineConfig.parse(text("one"))
    assert mgr.boot(first) == first
    return mgr, store, timer, events, first


def test_boot_persists_the_initial_config_once(env, tmp_path):
    _mgr, store, _timer, events, first = env
    assert store.load_active() == first
    assert [e.reason for e in events] == ["boot"]
    assert events[0].effects.services_added == ("etcd",)
    # the next start uses what is persisted, not the initial file
    other = ConfigManager(ConfigStore(tmp_path / "state"), timer=ManualTimer())
    assert other.boot(MachineConfig.parse(text("ignored"))) == first


def test_auto_is_no_reboot_and_persists(env):
    mgr, store, _timer, events, _first = env
    new = MachineConfig.parse(text("two"))
    res = mgr.apply(new)
    assert res.mode is ApplyMode.NO_REBOOT
    assert "applied and persisted" in res.mode_details
    assert mgr.running == new and mgr.persisted == new and store.load_active() == new
    assert [e.reason for e in events] == ["boot", "apply"]
    assert events[-1].effects.services_changed == ("etcd",)


def test_apply_text_and_no_op(env):
    mgr, *_ = env
    res = mgr.apply(text("one"))
    assert res.effects.empty and res.diff == ""  # the diff is a dry run's only
    assert mgr.apply(text("one"), dry_run=True).diff == "No changes."


def test_reboot_mode_is_refused(env):
    mgr, *_ = env
    with pytest.raises(ApplyError) as e:
        mgr.apply(text("two"), ApplyMode.REBOOT)
    assert e.value.code == "unimplemented"


def test_invalid_config_changes_nothing(env):
    mgr, store, _timer, events, first = env
    with pytest.raises(ConfigValidationError):
        mgr.apply(text("two").replace("type: worker", "type: router"))
    assert mgr.running == first and store.load_active() == first and len(events) == 1


def test_failed_write_changes_nothing(env, monkeypatch):
    mgr, store, _timer, events, first = env

    def fail(_cfg):
        raise OSError("read-only file system")

    monkeypatch.setattr(store, "save_active", fail)
    with pytest.raises(OSError):
        mgr.apply(text("two"))
    assert mgr.running == first and mgr.persisted == first and len(events) == 1


async def test_a_failed_write_leaves_the_manager_free_for_the_next_change(env, monkeypatch):
    mgr, store, _timer, _events, first = env
    real = store.save_active

    def fail(_cfg):
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_active", fail)
    with pytest.raises(OSError):
        mgr.apply(text("two"))
    with pytest.raises(OSError):
        await mgr.apply_async(text("two"))
    monkeypatch.setattr(store, "save_active", real)
    assert mgr.running == first
    assert (await mgr.apply_async(text("three"))).mode is ApplyMode.NO_REBOOT  # not "in progress"
    assert mgr.apply(text("four")).mode is ApplyMode.NO_REBOOT


def test_staged_takes_effect_at_next_start(env, tmp_path):
    mgr, store, _timer, events, first = env
    staged = MachineConfig.parse(text("staged"))
    res = mgr.apply(staged, ApplyMode.STAGED)
    assert res.mode is ApplyMode.STAGED and "next agent start" in res.mode_details
    assert mgr.running == first and store.load_active() == first
    assert mgr.staged == staged
    assert len(events) == 1  # nothing changed for the running agent
    # next start
    nxt = ConfigManager(ConfigStore(tmp_path / "state"), timer=ManualTimer())
    assert nxt.boot() == staged
    assert "promoted the staged config" in nxt.boot_notes
    assert nxt.staged is None


def test_no_reboot_after_staged_clears_the_staged_config(env):
    mgr, *_ = env
    mgr.apply(text("staged"), ApplyMode.STAGED)
    mgr.apply(text("newer"))
    assert mgr.staged is None


def test_try_rolls_back_after_the_timeout(env):
    mgr, store, timer, events, first = env
    tried = MachineConfig.parse(text("tried"))
    res = mgr.apply(tried, ApplyMode.TRY, try_timeout=30)
    assert res.mode is ApplyMode.TRY and "rolled back in 30 s" in res.mode_details
    assert mgr.running == tried
    assert mgr.persisted == first and store.load_active() == first  # not persisted
    assert mgr.pending is not None and mgr.pending.config == tried and mgr.pending.previous == first
    assert mgr.pending.remaining(timer.now()) == 30
    timer.advance(29.9)
    assert mgr.running == tried
    timer.advance(0.2)
    assert mgr.running == first and mgr.pending is None
    assert [e.reason for e in events] == ["boot", "try", "rollback"]
    assert events[-1].previous == tried and events[-1].current == first
    assert events[-1].effects.services_changed == ("etcd",)
    assert timer.scheduled == 0


def test_try_confirmed_by_a_later_apply(env):
    mgr, store, timer, events, _first = env
    tried = MachineConfig.parse(text("tried"))
    mgr.apply(tried, ApplyMode.TRY, try_timeout=10)
    timer.advance(5)
    res = mgr.confirm()
    assert res.mode is ApplyMode.NO_REBOOT and res.effects.empty
    assert mgr.pending is None and store.load_active() == tried
    timer.advance(60)
    assert mgr.running == tried
    assert [e.reason for e in events] == ["boot", "try", "apply"]


def test_a_different_no_reboot_apply_also_cancels_the_rollback(env):
    mgr, store, timer, _events, _first = env
    mgr.apply(text("tried"), ApplyMode.TRY, try_timeout=10)
    final = MachineConfig.parse(text("final"))
    mgr.apply(final, ApplyMode.AUTO)
    timer.advance(60)
    assert mgr.running == final == store.load_active()


def test_staged_apply_cancels_a_pending_rollback_as_in_talos(env):
    mgr, store, timer, _events, first = env
    tried = MachineConfig.parse(text("tried"))
    mgr.apply(tried, ApplyMode.TRY, try_timeout=10)
    mgr.apply(text("staged"), ApplyMode.STAGED)
    timer.advance(60)
    assert mgr.pending is None and mgr.running == tried  # keeps running, not persisted
    assert store.load_active() == first and mgr.staged is not None


def test_unknown_mode_is_invalid_argument(env):
    mgr, *_ = env
    with pytest.raises(ApplyError) as e:
        mgr.apply(text("x"), 9)  # type: ignore[arg-type]
    assert e.value.code == "invalid_argument"


def test_second_try_restarts_the_timer_and_keeps_the_rollback_target(env):
    mgr, _store, timer, _events, first = env
    mgr.apply(text("t1"), ApplyMode.TRY, try_timeout=10)
    timer.advance(8)
    t2 = MachineConfig.parse(text("t2"))
    mgr.apply(t2, ApplyMode.TRY, try_timeout=10)
    assert mgr.pending is not None and mgr.pending.previous == first
    timer.advance(8)
    assert mgr.running == t2  # the first timer was cancelled
    timer.advance(3)
    assert mgr.running == first


def test_try_needs_a_running_config_and_a_positive_timeout(tmp_path, env):
    fresh = ConfigManager(ConfigStore(tmp_path / "fresh"), timer=ManualTimer())
    assert fresh.boot() is None
    with pytest.raises(ApplyError) as e:
        fresh.apply(text(), ApplyMode.TRY)
    assert e.value.code == "failed_precondition"
    mgr, *_ = env
    with pytest.raises(ApplyError) as e:
        mgr.apply(text("x"), ApplyMode.TRY, try_timeout=0)
    assert e.value.code == "invalid_argument"
    with pytest.raises(ApplyError, match="no TRY apply"):
        mgr.confirm()
    assert mgr.rollback() is False


def test_restart_during_try_comes_back_with_the_persisted_config(env, tmp_path):
    mgr, _store, _timer, _events, first = env
    mgr.apply(text("tried"), ApplyMode.TRY)
    mgr.close()  # the agent stops (or dies) before the timeout
    again = ConfigManager(ConfigStore(tmp_path / "state"), timer=ManualTimer())
    assert again.boot() == first


def test_dry_run_changes_nothing_and_redacts_secrets(env):
    mgr, store, timer, events, first = env
    new_secret_text = new_secret()
    res = mgr.apply(text("two", secret=new_secret_text), ApplyMode.AUTO, dry_run=True)
    assert res.dry_run and res.mode is ApplyMode.NO_REBOOT and res.mode_details.startswith("dry run:")
    assert mgr.running == first and store.load_active() == first and len(events) == 1
    d = res.diff
    assert d.startswith("--- current\n+++ new\n")
    assert "-    clusterName: one" in d and "+    clusterName: two" in d
    # both secrets changed: the diff says so without showing them
    assert f"-    secret: '{REDACTED_OLD}'" in d and f"+    secret: '{REDACTED_NEW}'" in d
    assert f"ETCD_TOKEN: '{REDACTED_OLD}'" in d and f"ETCD_TOKEN: '{REDACTED_NEW}'" in d
    for s in (SECRET, new_secret_text, "tok-one", "tok-two"):
        assert s not in d
    assert "cluster_secret" in res.effects.mesh_restart and res.effects.mesh_cleanup
    # TRY dry run: no timer
    mgr.apply(text("two"), ApplyMode.TRY, dry_run=True)
    assert mgr.pending is None and timer.scheduled == 0


def test_dry_run_unchanged_secret_reads_redacted_on_both_sides(env):
    mgr, *_ = env
    d = mgr.apply(text("two"), dry_run=True).diff
    assert f"     secret: {REDACTED}" in d.splitlines()  # unchanged: a context line
    assert not any(line.startswith(("+", "-")) and "secret:" in line for line in d.splitlines()[2:])
    assert SECRET not in d


def test_dry_run_of_an_added_document(env):
    mgr, *_ = env
    d = mgr.apply(
        text("one") + "---\napiVersion: v1alpha1\nkind: AgentConfig\nnodename: n1\n", dry_run=True
    ).diff
    assert "+kind: AgentConfig" in d and "+nodename: n1" in d


def test_patch_applies_to_the_running_config(env):
    mgr, store, *_ = env
    res = mgr.patch(["cluster:\n  clusterName: patched\n"])
    assert res.mode is ApplyMode.NO_REBOOT
    assert mgr.running.v1alpha1.cluster_name == "patched"  # type: ignore[union-attr]
    assert store.load_active().v1alpha1.cluster_name == "patched"  # type: ignore[union-attr]
    res = mgr.patch(['[{"op": "replace", "path": "/cluster/clusterName", "value": "tried"}]'], ApplyMode.TRY)
    assert mgr.pending is not None


def test_a_failing_listener_does_not_break_apply(env, caplog):
    mgr, *_ = env

    def bad(_event):
        raise RuntimeError("listener bug")

    unsubscribe = mgr.subscribe(bad)
    mgr.apply(text("two"))
    assert mgr.running.v1alpha1.cluster_name == "two"  # type: ignore[union-attr]
    assert "listener" in caplog.text
    unsubscribe()
    caplog.clear()
    mgr.apply(text("three"))
    assert "listener" not in caplog.text


def test_listener_cannot_apply_reentrantly(env):
    mgr, *_ = env
    seen: list[str] = []

    def reenter(event):
        if event.reason == "apply":
            try:
                mgr.apply(text("nested"))
            except ApplyError as e:
                seen.append(e.code)

    mgr.subscribe(reenter)
    mgr.apply(text("two"))
    assert seen == ["failed_precondition"]
