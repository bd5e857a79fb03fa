"""RunExpertsStream on a gRPC server: the generated servicer's methods, with the stream reading and writing raw
frames (rpc.frames) instead of protobuf messages."""

from __future__ import annotations

import grpc

from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc.frames import decode_request_or_error


class _Handlers:
    """Stands in for a server to pb_grpc.add_ExpertShardServicer_to_server: keeps the method handlers it builds."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_shard_servicer(servicer: pb_grpc.ExpertShardServicer, server) -> None:
    """As the generated add_ExpertShardServicer_to_server (grpc or grpc.aio server), but RunExpertsStream reads
    and writes raw frames: a frame that cannot be read reaches the handler as its FrameError, not as a
    broken stream; the handler yields encoded reply bytes."""
    found = _Handlers()
    pb_grpc.add_ExpertShardServicer_to_server(servicer, found)
    handlers = dict(found.handlers)
    handlers["RunExpertsStream"] = grpc.stream_stream_rpc_method_handler(
        servicer.RunExpertsStream, request_deserializer=decode_request_or_error, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(found.service, handlers),))
    server.add_registered_method_handlers(found.service, handlers)
