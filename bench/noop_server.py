"""Baseline for the AffiliateUpdate benchmark: grpc.aio with a no-op unary handler.

Same service/method name and server options as discovery-service; the handler
returns an empty response without parsing anything. Prints ``PORT <n>`` once serving.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

from discovery.server.main import GRPC_OPTIONS
from discovery.server.service import SERVICE


async def _noop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def main() -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    ident = bytes
    handler = grpc.unary_unary_rpc_method_handler(
        _noop, request_deserializer=ident, response_serializer=ident
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"AffiliateUpdate": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
