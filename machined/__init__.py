"""Node agent hosting the mesh."""
