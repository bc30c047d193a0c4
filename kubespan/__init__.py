"""KubeSpan mesh engine (WireGuard controller)."""
