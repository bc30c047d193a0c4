"""The reply envelope of the machine API (machined.md §1).

Every unary reply is ``XResponse{repeated X messages = 1}`` whose items start with
``common.Metadata metadata = 1``; stream items carry the metadata in field 1 too. machined fills
``metadata.hostname`` with its node name in every item it sends. A call that fails as a whole is
answered with a gRPC status (code and message); a proxy that fans a call out to several nodes (apid)
turns a failed node into one item whose ``metadata.error`` and ``metadata.status`` describe it —
:func:`node_error` builds exactly that item, so both sides agree on its shape.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.rpc import status_pb2

from spanapi.talos.common import common_pb2


def metadata(hostname: str) -> common_pb2.Metadata:
    return common_pb2.Metadata(hostname=hostname)


def node_error(response_cls: type[Any], hostname: str, code: grpc.StatusCode, message: str) -> Any:
    """``response_cls(messages=[item{metadata{hostname, error, status}}])`` for a failed node."""
    item_cls = message_factory.GetMessageClass(
        response_cls.DESCRIPTOR.fields_by_name["messages"].message_type
    )
    md = common_pb2.Metadata(
        hostname=hostname,
        error=message,
        status=status_pb2.Status(code=code.value[0], message=message),
    )
    return response_cls(messages=[item_cls(metadata=md)])
