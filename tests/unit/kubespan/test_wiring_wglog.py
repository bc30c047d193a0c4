"""wireguard-go's log level from KUBESPAN_WIREGUARD_LOG_LEVEL (kubespan.wiring.make_backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubespan.wireguard.userspace import UserspaceBackend
from kubespan.wiring import WG_LOG_LEVEL_ENV, make_backend


async def test_default_is_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WG_LOG_LEVEL_ENV, raising=False)
    wg = await make_backend("userspace", "kubespan", socket_dir=tmp_path)
    assert isinstance(wg, UserspaceBackend) and wg.log_level == "error"


async def test_debug_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WG_LOG_LEVEL_ENV, "debug")
    wg = await make_backend("userspace", "kubespan", socket_dir=tmp_path)
    assert isinstance(wg, UserspaceBackend) and wg.log_level == "debug"


async def test_an_unknown_level_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WG_LOG_LEVEL_ENV, "chatty")
    with pytest.raises(ValueError, match=f"{WG_LOG_LEVEL_ENV}: 'chatty' must be one of silent, error"):
        await make_backend("userspace", "kubespan", socket_dir=tmp_path)
