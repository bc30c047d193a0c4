"""Discovery server: registry state, storage, gRPC service and daemon."""
