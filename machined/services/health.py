"""Health checks (exec, TCP, HTTP): one probe returns ``(healthy, message)``; never raises."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

from .process import Command, Spawner
from .spec import HealthCheck, HealthKind

OUTPUT_CAP = 4096


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """Talos's ``ServiceHealth``: unknown until the first probe of the current run."""

    unknown: bool = True
    healthy: bool = False
    last_message: str = ""
    last_change: float | None = None  # unix time of the last change of (unknown, healthy)


async def probe(check: HealthCheck, *, spawner: Spawner, base: Command | None = None) -> tuple[bool, str]:
    """Run one check within ``check.timeout``. ``base`` supplies env/cwd/user for exec checks."""
    try:
        if check.kind is HealthKind.EXEC:
            return await _exec(check, spawner, base)
        if check.kind is HealthKind.TCP:
            return await _tcp(check)
        return await _http(check)
    except Exception as e:  # a probe must never take the supervisor down
        return False, f"{type(e).__name__}: {e}"


async def _exec(check: HealthCheck, spawner: Spawner, base: Command | None) -> tuple[bool, str]:
    cmd = Command(
        check.argv, base.env if base else {}, base.cwd if base else None, base.user if base else None
    )
    proc = await spawner.spawn(cmd)
    out = bytearray()

    async def drain(stream: object) -> None:
        if stream is None:
            return
        while chunk := await stream.read(4096):  # type: ignore[attr-defined]
            if len(out) < OUTPUT_CAP:
                out.extend(chunk[: OUTPUT_CAP - len(out)])

    readers = [asyncio.ensure_future(drain(proc.stdout)), asyncio.ensure_future(drain(proc.stderr))]
    try:
        async with asyncio.timeout(check.timeout):
            code = await proc.wait()
    except TimeoutError:
        proc.signal_group(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await proc.wait()
        return False, f"{check.describe()}: timed out after {check.timeout:g}s"
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await asyncio.gather(*readers, return_exceptions=True)
        for r in readers:
            r.cancel()
        if proc.returncode is not None:
            proc.close()
    last = next((ln for ln in reversed(out.decode("utf-8", "replace").splitlines()) if ln.strip()), "")
    if code == 0:
        return True, last
    return False, f"{check.describe()}: exit code {code}" + (f": {last}" if last else "")


async def _tcp(check: HealthCheck) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(check.host, check.port)
    except TimeoutError:
        return False, f"{check.describe()}: timed out after {check.timeout:g}s"
    except OSError as e:
        return False, f"{check.describe()}: {e.strerror or e}"
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(check.timeout):
            await writer.wait_closed()
    return True, ""


async def _http(check: HealthCheck) -> tuple[bool, str]:
    import aiohttp  # imported on first use: most nodes have no HTTP checks

    timeout = aiohttp.ClientTimeout(total=check.timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(check.url, allow_redirects=False, ssl=None if check.tls_verify else False) as resp,
        ):
            status = resp.status
    except TimeoutError:
        return False, f"{check.describe()}: timed out after {check.timeout:g}s"
    except aiohttp.ClientError as e:
        return False, f"{check.describe()}: {e}"
    if 200 <= status < 400:
        return True, f"HTTP {status}"
    return False, f"{check.describe()}: HTTP {status}"
