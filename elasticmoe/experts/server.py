"""The expert shard's gRPC server: runs a layer's experts for the gateway, loads and drops experts live."""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures

import grpc
import torch

from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc.codec import decode_tensor, encode_tensor, server_options

log = logging.getLogger(__name__)


class ExpertServicer(pb_grpc.ExpertShardServicer):
    """Serves one ExpertStore. Bad requests get INVALID_ARGUMENT; experts not held come back in `missing`."""

    def __init__(self, store: ExpertStore, shard_id: str):
        self.store, self.shard_id = store, shard_id
        self.placement_version = 0
        self.started = time.monotonic()
        self.calls = 0

    def _decode(self, request: pb.RunExpertsRequest, context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.store.spec
        try:
            hidden = decode_tensor(request.hidden, "hidden")
            ids = decode_tensor(request.topk_ids, "topk_ids")
            weights = decode_tensor(request.topk_weights, "topk_weights")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not (0 <= request.layer < spec.num_layers and spec.moe.sparse_layers[request.layer]):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layer: {request.layer} is not an MoE layer")
        if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"hidden: shape {list(hidden.shape)}, want [T, {spec.hidden_size}]")
        if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"topk_ids {list(ids.shape)} / topk_weights {list(weights.shape)} must both be [T, k], T={hidden.shape[0]}")
        if ids.numel() and (int(ids.max()) >= spec.moe.num_experts or int(ids.min()) < -1):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"topk_ids: ids must be in [-1, {spec.moe.num_experts})")
        dev = self.store.device
        return hidden.to(dev, self.store.dtype), ids.to(dev), weights.to(dev)

    def RunExperts(self, request, context):
        hidden, ids, weights = self._decode(request, context)
        self.calls += 1
        routed = self.store.routed(ids)  # one pass serves both the holding check and the stats
        missing = self.store.missing(request.layer, routed)
        if missing:  # the gateway re-sends these tokens elsewhere
            return pb.RunExpertsResponse(missing=missing, placement_version=self.placement_version)
        t0 = time.perf_counter()
        out = self.store.forward(request.layer, hidden, ids, weights)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        us = int((time.perf_counter() - t0) * 1e6)
        self.store.count(request.layer, routed)
        return pb.RunExpertsResponse(output=encode_tensor(out.cpu()), compute_us=us,
                                     placement_version=self.placement_version)

    def LoadExperts(self, request, context):
        pairs = [(r.layer, r.expert) for r in request.experts]
        try:
            n_before = len(self.store.held())
            nbytes = self.store.load(pairs)
        except (ValueError, RuntimeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.placement_version = max(self.placement_version, request.placement_version)
        return pb.LoadExpertsResponse(loaded=len(self.store.held()) - n_before, bytes=nbytes,
                                      bytes_held=self.store.weight_bytes(), placement_version=self.placement_version)

    def DropExperts(self, request, context):
        before_bytes, before = self.store.weight_bytes(), len(self.store.held())
        self.store.drop([(r.layer, r.expert) for r in request.experts])
        self.placement_version = max(self.placement_version, request.placement_version)
        return pb.DropExpertsResponse(dropped=before - len(self.store.held()),
                                      bytes=before_bytes - self.store.weight_bytes(),
                                      bytes_held=self.store.weight_bytes(), placement_version=self.placement_version)

    def GetStats(self, request, context):
        tokens = [pb.ExpertTokens(layer=l, expert=e, tokens=n) for (l, e), n in sorted(self.store.tokens_served.items())]
        return pb.GetStatsResponse(
            shard_id=self.shard_id, uptime_s=time.monotonic() - self.started, weight_bytes=self.store.weight_bytes(),
            held=[pb.ExpertRef(layer=l, expert=e) for l, e in self.store.held()], tokens=tokens,
            calls=self.calls, compute_us=int(self.store.compute_s * 1e6), placement_version=self.placement_version)

    def Health(self, request, context):
        return pb.HealthResponse(ok=True, shard_id=self.shard_id, placement_version=self.placement_version)


def _ports(port: int) -> list[int]:
    """The port to try: `port`, else ELASTICMOE_EXPERT_PORT_RANGE ("20100-20199", for network policies), else any."""
    span = os.environ.get("ELASTICMOE_EXPERT_PORT_RANGE")
    if port or not span:
        return [port]
    lo, hi = (int(x) for x in span.split("-"))
    return list(range(lo, hi + 1))


def start_server(store: ExpertStore, shard_id: str, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8) -> tuple[grpc.Server, ExpertServicer, int]:
    """Start a gRPC server for `store` on host:port (0 = any free port); returns (server, servicer, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="expert-rpc"),
                         options=server_options(), maximum_concurrent_rpcs=4 * max_workers)
    servicer = ExpertServicer(store, shard_id)
    pb_grpc.add_ExpertShardServicer_to_server(servicer, server)
    bound = 0
    for candidate in _ports(port):
        try:
            bound = server.add_insecure_port(f"{host}:{candidate}")
        except RuntimeError:
            bound = 0
        if bound:
            break
    if bound == 0:
        raise RuntimeError(f"cannot bind the expert server on {host} (port {port}, "
                           f"ELASTICMOE_EXPERT_PORT_RANGE={os.environ.get('ELASTICMOE_EXPERT_PORT_RANGE')})")
    server.start()
    log.info("expert shard %s serving on %s:%d", shard_id, host, bound)
    return server, servicer, bound
