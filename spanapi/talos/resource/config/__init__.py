"""Generated protobuf stubs (see scripts/genproto.py)."""
