"""Start-up check of who else can read the secrets: a WARNING per problem, never a refusal.

The cluster secret decrypts every affiliate in discovery and lets anyone join the mesh; machined's
config file holds it (``cluster.secret``, with ``machine.token`` and the CA keys), kubespan reads it
from ``--cluster-secret-file``. The state directory holds the persisted config, the WireGuard key and
the node id. Key and config files are written 0600 in a 0700 directory by machined and kubespan
themselves, but a file written by someone else (or restored from a backup, or a directory created
by hand) may be wider: the agent runs anyway (refusing would take the node off the mesh) and says so
once, at start.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from spanutil.logs import log_event

SECRET_BITS = 0o044  # readable by group or others
STATE_DIR_BITS = 0o006  # readable or writable by others


def _who(mode: int, bits: int) -> str:
    names = [n for n, b in (("group", 0o070 & bits), ("others", 0o007 & bits)) if mode & b]
    return " and ".join(names)


def permission_problems(
    secret_files: Iterable[Path | str | None] = (), state_dir: Path | str | None = None
) -> list[tuple[str, dict[str, str]]]:
    """``(message, fields)`` for each secret file readable by group/others and for a state directory
    readable or writable by others. Missing paths are skipped (other checks report them)."""
    out: list[tuple[str, dict[str, str]]] = []
    seen: set[Path] = set()
    for f in secret_files:
        if f is None or Path(f) in seen:
            continue
        seen.add(Path(f))
        try:
            st = os.stat(f)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & SECRET_BITS:
            out.append(
                (
                    f"a file holding the cluster secret is readable by {_who(st.st_mode, SECRET_BITS)}; "
                    "chmod 600 it",
                    {"path": str(f), "mode": f"{stat.S_IMODE(st.st_mode):04o}"},
                )
            )
    if state_dir is not None:
        try:
            st = os.stat(state_dir)
        except OSError:
            return out
        if stat.S_ISDIR(st.st_mode) and st.st_mode & STATE_DIR_BITS:
            what = " and ".join(w for w, b in (("readable", 0o004), ("writable", 0o002)) if st.st_mode & b)
            out.append(
                (
                    f"the state directory (keys, persisted config) is {what} by others; chmod 700 it",
                    {"path": str(state_dir), "mode": f"{stat.S_IMODE(st.st_mode):04o}"},
                )
            )
    return out


def warn_permissions(
    log: logging.Logger, secret_files: Iterable[Path | str | None] = (), state_dir: Path | str | None = None
) -> list[str]:
    """Log one WARNING per :func:`permission_problems` entry; returns the messages."""
    problems = permission_problems(secret_files, state_dir)
    for message, fields in problems:
        log_event(log, message, logging.WARNING, **fields)
    return [m for m, _ in problems]
