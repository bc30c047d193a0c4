"""``ConfigStore``: the persisted machine config in the agent's state directory.

Files (all 0600, in a 0700 directory):

* ``config.yaml``: the active config, what the agent runs after a restart;
* ``config.staged.yaml``: a config applied with mode STAGED, promoted to active at the next start;
* ``config.staged.rejected.yaml``: a staged config that no longer validated when it was promoted.

Every write is atomic: a temporary file in the same directory (``.<name>.<random>.tmp``), written,
fsynced, renamed over the target, then the directory fsynced. A crash leaves either the old or the
new file, plus at worst a temporary file that is ignored on load and removed by :meth:`sweep`.
Only a :class:`MachineConfig` (already validated) can be written, and its text is parsed again
before the rename, so an invalid config never replaces a valid one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from machined.config.machine import MachineConfig
from spanutil import fsutil

ACTIVE = "config.yaml"
STAGED = "config.staged.yaml"
REJECTED = "config.staged.rejected.yaml"
_TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (leftovers: ``.<name>.*.tmp``)."""
    fsutil.write_atomic(path, data, mode)


fsync_dir = fsutil.fsync_dir


class ConfigStore:
    """Active and staged config files under ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def active_path(self) -> Path:
        return self.dir / ACTIVE

    @property
    def staged_path(self) -> Path:
        return self.dir / STAGED

    @property
    def rejected_path(self) -> Path:
        return self.dir / REJECTED

    # -- reading -----------------------------------------------------------------------------------

    def _read(self, path: Path) -> MachineConfig | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return MachineConfig.parse(data)

    def load_active(self) -> MachineConfig | None:
        """The active config, or None. Raises ``ConfigValidationError`` if the file was edited into
        something invalid (the agent refuses to start rather than run on a guess)."""
        return self._read(self.active_path)

    def load_staged(self) -> MachineConfig | None:
        return self._read(self.staged_path)

    def has_staged(self) -> bool:
        return self.staged_path.exists()

    # -- writing -----------------------------------------------------------------------------------

    def _write(self, path: Path, cfg: MachineConfig) -> None:
        if not isinstance(cfg, MachineConfig):
            raise TypeError("only a validated MachineConfig can be stored")
        text = cfg.to_yaml()
        MachineConfig.parse(text)  # what goes to disk must load again
        atomic_write(path, text.encode("utf-8"))

    def save_active(self, cfg: MachineConfig) -> None:
        self._write(self.active_path, cfg)

    def save_staged(self, cfg: MachineConfig) -> None:
        self._write(self.staged_path, cfg)

    def clear_staged(self) -> bool:
        try:
            self.staged_path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.dir)
        return True

    def promote_staged(self) -> MachineConfig | None:
        """At agent start: make the staged config active. Returns it, or None when there is none.

        A staged file that does not validate (it validated when staged, so the rules changed) is
        moved to ``config.staged.rejected.yaml`` and the active config stays; the error propagates.
        A crash between the two steps leaves the staged file, and the next start promotes it again.
        """
        try:
            staged = self.load_staged()
        except ValueError:
            os.replace(self.staged_path, self.rejected_path)
            fsync_dir(self.dir)
            raise
        if staged is None:
            return None
        self.save_active(staged)
        self.clear_staged()
        return staged

    def sweep(self) -> list[Path]:
        """Remove temporary files left by a crash in the middle of a write; returns what was removed."""
        removed = []
        for p in self.dir.iterdir():
            ours = any(p.name.startswith(f".{name}.") for name in (ACTIVE, STAGED, REJECTED))
            if ours and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed
