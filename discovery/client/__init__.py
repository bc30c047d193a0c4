"""Asyncio discovery client."""
