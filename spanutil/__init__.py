"""Shared utilities every layer may import: structured logs, durable writes, durations, IP codecs.

A leaf package: it imports nothing of ours (``tests/unit/test_layers.py`` holds it to that).
"""
