"""Shared utilities every layer may import: structured logs, durable writes, durations,
byte sizes, IP codecs and the STUN codec (the mesh asks, the discovery service answers).

A leaf package: it imports nothing of ours (``tests/unit/test_layers.py`` holds it to that).
"""
