"""Structured logging: one JSON object per line.

``log_event(logger, "msg", key=value, ...)`` attaches fields; the formatter
renders ``{"ts":..., "level":..., "logger":..., "msg":..., **fields}``.
Callers are responsible for never passing secrets or decrypted data as fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "_fields"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def setup(debug: bool = False, stream: Any = None) -> None:
    """Route the root logger to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # grpc and aiohttp are chatty at debug level
    for name in ("grpc", "aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={_FIELDS: fields})


encode_str = _encode = json.encoder.encode_basestring  # type: ignore[attr-defined]

CLIP_CHARS = 64  # client-supplied strings in logs and error messages: at most this many characters


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``text`` when it has at most ``limit`` characters, else its first ``limit`` characters and
    a marker with the UTF-8 size of the rest: ``abc…(+1048512 bytes)``.

    For anything a client sent (IDs, versions, header values) before it goes into a log line or an
    error message, so that one request cannot write megabytes to the log.
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    if text.isascii():
        rest = len(text) - limit
    else:
        rest = len(text.encode("utf-8", "surrogatepass")) - len(head.encode("utf-8", "surrogatepass"))
    return f"{head}\u2026(+{rest} bytes)"


FLUSH_INTERVAL = 0.05  # seconds: lines are written in batches at most this late


class FastEventLog:
    """A low-overhead writer for high-rate events (one per RPC) in the same JSON-lines format.

    Lines are rendered with minimal work and written in batches every
    ``FLUSH_INTERVAL`` (and at exit), not through the logging machinery. Values must be
    str, int, float, bool or None.
    """

    def __init__(self, logger: str, stream: Any = None) -> None:
        self._prefix_logger = _encode(logger)
        self._stream = stream
        self._buf: list[str] = []
        self._scheduled = False
        self._sec = -1
        self._sec_text = ""

    def _ts(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._sec_text}.{int((now - sec) * 1000):03d}Z"

    def head(self, msg: str, level: str = "info") -> str:
        """The opening of a line up to and including ``"msg"``; append ``,"k":v`` pairs and ``}\n``."""
        return f'{{"ts":"{self._ts()}","level":"{level}","logger":{self._prefix_logger},"msg":{_encode(msg)}'

    def event(self, msg: str, **fields: Any) -> None:
        parts = [self.head(msg)]
        for k, v in fields.items():
            if v is None:
                continue
            if isinstance(v, str):
                parts.append(f',"{k}":{_encode(v)}')
            elif isinstance(v, bool):
                parts.append(f',"{k}":{"true" if v else "false"}')
            else:
                parts.append(f',"{k}":{v}')
        parts.append("}\n")
        self.write_line("".join(parts))

    def write_line(self, line: str) -> None:
        """Queue one complete line (built with :meth:`head`)."""
        self._buf.append(line)
        if not self._scheduled:
            self._scheduled = True
            try:
                import asyncio

                asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data, self._buf = "".join(self._buf), []
        stream = self._stream or sys.stderr
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass
