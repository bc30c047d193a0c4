"""Network-namespace lab for tests, benchmarks and the demo (never imported by product code)."""

from netns.lab import Lab, LabError, Node, cleanup_stale, list_netns

__all__ = ["Lab", "LabError", "Node", "cleanup_stale", "list_netns"]
