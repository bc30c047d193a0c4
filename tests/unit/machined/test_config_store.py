"""ConfigStore: atomic persistence (0600, tmp + fsync + rename), crash leftovers ignored, an invalid config
never replaces a valid one, staged config promotion."""

from __future__ import annotations

import os
import stat

import pytest

from machined.config import ConfigStore, ConfigValidationError, MachineConfig
from machined.config.store import atomic_write
from machined.config.testing import config_yaml, new_secret


def cfg(name: str = "one") -> MachineConfig:
    return MachineConfig.parse(
        config_yaml(secret=new_secret()).replace("clusterName: test", f"clusterName: {name}")
    )


def test_save_and_load_round_trip_with_private_modes(tmp_path):
    store = ConfigStore(tmp_path / "state")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert store.load_active() is None
    a = cfg()
    store.save_active(a)
    assert stat.S_IMODE(store.active_path.stat().st_mode) == 0o600
    assert store.load_active() == a
    assert store.active_path.read_text() == a.to_yaml()
    assert list(tmp_path.joinpath("state").iterdir()) == [store.active_path]  # no temporary file left


def test_comments_of_the_applied_text_are_kept(tmp_path):
    store = ConfigStore(tmp_path)
    text = "# operator notes\n" + config_yaml(secret=new_secret())
    store.save_active(MachineConfig.parse(text))
    assert store.active_path.read_text().startswith("# operator notes")


def test_leftover_temporary_file_from_a_crash_is_ignored_and_swept(tmp_path):
    store = ConfigStore(tmp_path)
    a = cfg()
    store.save_active(a)
    # a crash after writing the temporary file but before the rename leaves this behind
    leftover = tmp_path / ".config.yaml.k3j4h5.tmp"
    leftover.write_text("version: v1alpha1\nmachine: {type: worker\n")  # truncated garbage
    foreign = tmp_path / ".kubespan-identity.key.x.tmp"  # someone else's temporary file
    foreign.write_text("x")
    assert store.load_active() == a
    assert store.sweep() == [leftover]
    assert not leftover.exists() and foreign.exists()


def test_crash_before_rename_keeps_the_old_file(tmp_path, monkeypatch):
    store = ConfigStore(tmp_path)
    a, b = cfg("a"), cfg("b")
    store.save_active(a)

    def boom(*_args, **_kw):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        store.save_active(b)
    monkeypatch.undo()
    assert store.load_active() == a
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # the temporary file was removed


def test_write_is_fsynced_before_rename_and_directory_after(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def replace(a, b):
        calls.append("rename")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f", b"data")
    assert calls == ["fsync-file", "rename", "fsync-dir"]
    assert (tmp_path / "f").read_bytes() == b"data"


def test_invalid_config_never_replaces_a_valid_one(tmp_path):
    store = ConfigStore(tmp_path)
    a = cfg()
    store.save_active(a)
    with pytest.raises(ConfigValidationError):
        store.save_active(MachineConfig.parse("version: v1alpha1\nmachine: {type: router}\n"))
    with pytest.raises(TypeError):
        store.save_active("version: v1alpha1\n")  # type: ignore[arg-type]
    assert store.load_active() == a


def test_a_hand_edited_invalid_active_file_is_refused(tmp_path):
    store = ConfigStore(tmp_path)
    secret = new_secret()
    store.active_path.write_text(config_yaml(secret=secret).replace("type: worker", "type: router"))
    with pytest.raises(ConfigValidationError) as e:
        store.load_active()
    assert "v1alpha1.machine.type" in str(e.value) and secret not in str(e.value)


def test_staged_config_is_promoted_once(tmp_path):
    store = ConfigStore(tmp_path)
    a, b = cfg("a"), cfg("b")
    store.save_active(a)
    store.save_staged(b)
    assert store.has_staged() and store.load_staged() == b
    assert store.load_active() == a
    assert store.promote_staged() == b
    assert store.load_active() == b and not store.has_staged()
    assert store.promote_staged() is None


def test_crash_between_promotion_steps_promotes_again(tmp_path):
    store = ConfigStore(tmp_path)
    b = cfg("b")
    store.save_staged(b)
    store.save_active(b)  # the first step of promote_staged happened, the unlink did not
    assert store.promote_staged() == b
    assert store.load_active() == b and not store.has_staged()


def test_invalid_staged_file_is_set_aside(tmp_path):
    store = ConfigStore(tmp_path)
    a = cfg("a")
    store.save_active(a)
    store.staged_path.write_text("version: v1alpha1\nmachine: {type: router}\n")
    with pytest.raises(ConfigValidationError):
        store.promote_staged()
    assert not store.has_staged() and store.rejected_path.exists()
    assert store.load_active() == a
    assert store.clear_staged() is False
