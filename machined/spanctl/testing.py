"""Test support for spanctl: what talosctl prints, for tests that pin our output to it."""

from __future__ import annotations

#: The header row of ``talosctl get kubespanpeerstatuses`` (table output), split on white space.
PEER_STATUS_HEADER = ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION", "LABEL", "ENDPOINT", "STATE", "RX", "TX"]
