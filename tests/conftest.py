"""Shared pytest configuration: root-only tests skip with a reason when not root; kernel-lab tests skip
with a reason where the kernel has no WireGuard (and fail instead inside the kernel-lab VM)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

KERNEL_LAB_ENV = "KUBESPAN_KERNEL_LAB"  # set by scripts/kernel_lab.py inside the VM


def _wireguard_missing() -> str | None:
    """None when the running kernel has WireGuard (loaded, or loaded now with modprobe), else why not."""
    if Path("/sys/module/wireguard").exists():
        return None
    try:
        r = subprocess.run(["modprobe", "wireguard"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"modprobe wireguard: {e}"
    if r.returncode == 0 and Path("/sys/module/wireguard").exists():
        return None
    return f"modprobe wireguard: {r.stderr.strip() or 'failed'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    if not root:
        skip = pytest.mark.skip(reason="needs root (network namespaces, nftables, wireguard-go); run as root")
        for item in items:
            if "root" in item.keywords or "kernel" in item.keywords:
                item.add_marker(skip)
        return
    kernel_items = [item for item in items if "kernel" in item.keywords]
    if not kernel_items:
        return
    missing = _wireguard_missing()
    if missing is None:
        return
    if os.environ.get(KERNEL_LAB_ENV):
        raise pytest.UsageError(f"kernel lab: this kernel cannot run the kernel tests: {missing}")
    skip = pytest.mark.skip(
        reason=f"needs a kernel with WireGuard and netem ({missing}): `make test-kernel` runs it in a VM"
    )
    for item in kernel_items:
        item.add_marker(skip)
