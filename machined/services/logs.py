"""Per-service log capture: a bounded ring of lines (plus an optional append-only file), tail and follow.

The ring outlives restarts of the service, as Talos's does.  Lines longer than ``max_line_bytes`` are
split.  A follower that falls behind the ring skips the lines it lost; the gap in ``seq`` shows how many.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spanutil.logs import log_event

from .process import ByteStream, Clock

log = logging.getLogger("machined.services")

MAX_LINE_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int  # per ring, strictly increasing from 1; a gap seen by a follower means lines were dropped
    timestamp: float  # unix time
    stream: str  # "stdout" | "stderr"
    text: str


class LogRing:
    def __init__(
        self,
        max_lines: int = 2000,
        *,
        path: str | Path | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        clock: Clock | None = None,
    ) -> None:
        if max_lines < 1:
            raise ValueError(f"max_lines must be at least 1, got {max_lines}")
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.path = Path(path) if path is not None else None
        self._ring: collections.deque[LogLine] = collections.deque(maxlen=max_lines)
        self._seq = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._file: IO[bytes] | None = None
        self._file_error: str | None = None
        self._time = clock.time if clock is not None else time.time

    # -- writing -----------------------------------------------------------------------------------

    def append(self, text: str, stream: str = "stdout") -> LogLine:
        self._seq += 1
        line = LogLine(self._seq, self._time(), stream, text)
        self._ring.append(line)
        self._write_file(text)
        self._changed.set()
        self._changed = asyncio.Event()
        return line

    def _write_file(self, text: str) -> None:
        if self.path is None or self._file_error is not None:
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # kept open for the ring's lifetime
            self._file.write(text.encode("utf-8", "replace") + b"\n")
            self._file.flush()
        except OSError as e:
            # log once and keep the in-memory ring working
            self._file_error = str(e)
            log_event(log, "service log file unwritable", logging.WARNING, path=str(self.path), error=str(e))

    async def pump(self, stream: ByteStream, name: str = "stdout") -> None:
        """Copy ``stream`` into the ring line by line until EOF; a last unterminated line is kept."""
        buf = b""
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._append_raw(raw, name)
            while len(buf) >= self.max_line_bytes:
                self._append_raw(buf[: self.max_line_bytes], name)
                buf = buf[self.max_line_bytes :]
        if buf:
            self._append_raw(buf, name)

    def _append_raw(self, raw: bytes, name: str) -> None:
        raw = raw.removesuffix(b"\r")
        for i in range(0, max(len(raw), 1), self.max_line_bytes):
            self.append(raw[i : i + self.max_line_bytes].decode("utf-8", "replace"), name)

    def close(self) -> None:
        """End every follower; later appends still land in the ring."""
        self._closed = True
        self._changed.set()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- reading -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def last_seq(self) -> int:
        return self._seq

    def tail(self, n: int | None = None) -> list[LogLine]:
        """The last ``n`` lines, oldest first (all kept lines when ``n`` is None or negative)."""
        items = list(self._ring)
        if n is None or n < 0:
            return items
        return items[len(items) - n :] if n < len(items) else items if n else []

    async def follow(self, tail: int | None = 0) -> AsyncIterator[LogLine]:
        """The last ``tail`` lines (all when None), then new lines as they arrive, until ``close()``."""
        backlog = self.tail(tail)
        for line in backlog:
            yield line
        nxt = backlog[-1].seq + 1 if backlog else self._seq + 1
        while True:
            changed = self._changed
            if self._seq >= nxt:
                oldest = self._ring[0].seq if self._ring else self._seq + 1
                start = max(nxt, oldest)
                for line in list(self._ring)[start - oldest :]:
                    yield line
                    nxt = line.seq + 1
                continue
            if self._closed:
                return
            await changed.wait()
