"""etcd v3 for the registry: our own asyncio client on the stubs in spanapi.etcd."""
