"""A gRPC port on the gateway replica itself: Generation without Serve's proxy and Ray's streaming in between."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

from elasticmoe.gateway.generation_service import GenerationService, GenerationServicer
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc

log = logging.getLogger(__name__)


class DirectIngress:
    """A grpc.aio server on its own thread and event loop, serving `service` at host:port.

    Several gateway replicas on one node share the port (SO_REUSEPORT, gRPC's default on Linux): the kernel
    spreads new connections among them. Admission is the engine runner's, as through Serve; `max_rpcs` only
    bounds the calls one replica holds open (more get RESOURCE_EXHAUSTED from gRPC itself).
    """

    def __init__(self, service: GenerationService, host: str, port: int, max_rpcs: int):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="direct-ingress", daemon=True)
        self._thread.start()
        try:
            self.server, self.port = self._call(self._start(service, host, port, max_rpcs), 30)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.address = f"{host}:{self.port}"
        log.info("direct gRPC ingress on %s", self.address)

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @staticmethod
    async def _start(service: GenerationService, host: str, port: int, max_rpcs: int):
        server = grpc.aio.server(maximum_concurrent_rpcs=max_rpcs, options=[("grpc.so_reuseport", 1)])
        gen_grpc.add_GenerationServicer_to_server(GenerationServicer(service), server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise OSError(f"direct_grpc: cannot listen on {host}:{port} ({e})") from None
        if not bound:
            raise OSError(f"direct_grpc: cannot listen on {host}:{port}")
        await server.start()
        return server, bound

    def alive(self) -> bool:
        """Whether the server's loop still runs (the replica's health check asks)."""
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self, grace_s: float) -> None:
        """Refuse new calls at once, give the calls in flight up to `grace_s` to finish, then end them."""
        if not self.loop.is_running():
            return
        try:
            self._call(self.server.stop(grace_s), grace_s + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
