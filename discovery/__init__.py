"""Discovery registry: Talos-compatible server and asyncio client."""
