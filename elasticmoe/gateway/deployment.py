"""The gateway Serve deployment: ingress of the gRPC API; dense half + engine here, experts over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import AsyncIterator

import torch
from ray import serve

from elasticmoe.config import AppArgs, weights_id
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.engine.validation import RequestLimits
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.dispatcher import GrpcDispatcher, RoutingTable
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.runner import SHUTTING_DOWN, EngineRunner
from elasticmoe.heap import freeze_startup_heap

log = logging.getLogger("elasticmoe.gateway")
TABLE_WAIT_S = 1.0  # how long the controller holds a table poll that has nothing new (its acks refresh as often)
CALL_TIMEOUT_S = 10.0  # a controller call's answer, beyond the poll's hold
REFUSED_POLL_S = 1.0  # after a table of other weights, the next poll waits this long (it is answered at once)


def _max_model_len(lim, spec) -> int:
    """limits.max_model_len as written (the engine refuses one beyond the model's context); left at its default
    (2048), no more than the model's context."""
    if "max_model_len" in lim.model_fields_set:
        return lim.max_model_len
    return min(lim.max_model_len, spec.max_position_embeddings)


def _answer(call, timeout_s: float):
    """A controller call's answer within timeout_s. One that times out is cancelled: Serve's result() leaves it
    queued for a replica, so while the controller was away every poll after it piled up behind it."""
    try:
        return call.result(timeout_s=timeout_s)
    except TimeoutError:
        try:
            call.cancel()
        except Exception as e:  # noqa: BLE001 - best effort; the TimeoutError is what the caller handles
            log.debug("cancelling a controller call that timed out failed: %s", e)
        raise


def _app_name() -> str:
    """This replica's Serve application ("default" outside Serve, as Serve names an unnamed one)."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside Serve (tests of a replica's start-up)
        return "default"


class GatewayCore:
    """Engine thread + gRPC dispatcher + routing-table poller, independent of the API served on top."""

    def __init__(self, args: dict, controller):
        from elasticmoe.engine.engine import Engine
        from elasticmoe.metrics import GatewayMetrics
        from elasticmoe.model import open_model
        from elasticmoe.model.pipeline import default_micro_batches
        from elasticmoe.rpc.codec import tune_malloc

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(max(1, int(self.args.gateway_resources.num_cpus)))
        tune_malloc()
        files = open_model(self.args.model)
        lim = self.args.limits
        self.api_keys = ApiKeys.from_args(self.args)  # checked on HTTP (openai_api) and gRPC (Gateway._start)
        self.controller = controller
        self.dispatcher = GrpcDispatcher(lim.expert_timeout_s, on_failure=self._on_failure,
                                         failover_s=lim.failover_s, insecure=self.args.insecure_internal,
                                         transport=lim.transport)
        try:
            self.gateway_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve
            self.gateway_id = f"gateway-{id(self)}"
        engine = Engine(files, self.dispatcher, dtype=self.args.dtype, device=self.args.device,
                        max_num_seqs=lim.max_num_seqs, max_model_len=_max_model_len(lim, files.spec),
                        max_num_batched_tokens=lim.max_num_batched_tokens, max_queue=lim.max_queue,
                        micro_batches=lim.micro_batches or default_micro_batches(self.args.device),
                        kv_cache_tokens=lim.kv_cache_tokens, kv_block_size=lim.kv_block_size,
                        prefix_caching=lim.prefix_caching)
        self.tokenizer = engine.tokenizer
        spec = files.spec
        self.metrics = GatewayMetrics(self.args.expert_metrics, spec.num_layers, spec.moe.num_experts,
                                      spec.moe.moe_layers)
        engine.model.route_observer = self.metrics.route
        self.dispatcher.on_fanout = lambda s: self.metrics.fanout((s,))
        self._gauges_at = 0.0
        # (wall time, step seconds, calls hedged in the step): a hedged step waited a hedge delay, an unhedged slow one
        # did not (scheduling noise, or a wait the hedge should have cut)
        self.step_log: deque[tuple[float, float, int]] = deque(maxlen=200_000)
        self._hedges_logged = 0
        self.complete = threading.Event()
        self._install_lock = threading.Lock()  # the poller's and the failure reports' installs, one at a time
        self.table_version, self.table_epoch = -1, None  # the last table installed from a poll, and its controller
        self.weights = weights_id(self.args)
        self.refused: str | None = None  # the epoch of the last table refused as of other weights, until one is taken
        self.stopped = threading.Event()  # set when the replica stops: the poller ends
        # the gauges follow the steps (twice a second at most) and are set once more when the engine runs out of
        # work: no step comes then, and they kept the last throttled step's figures while the gateway sat idle
        self.runner = EngineRunner(engine, on_step=self._on_step,
                                   on_idle=lambda: self.metrics.engine_from(engine.scheduler))
        try:
            threading.Thread(target=self._poll_table, name="table-poller", daemon=True).start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the poller, the engine thread (its requests end) and the shards' channels: for a replica whose
        start-up failed after the engine had started, whose thread and memory would stay until Serve replaced it."""
        self.stopped.set()
        self.runner.close()
        self.dispatcher.close()
        self.metrics.close()

    def _on_step(self, seconds: float, n: int) -> None:
        """Engine thread, after each step: the step log, and engine gauges at most twice a second."""
        hedges, self._hedges_logged = self.dispatcher.hedges - self._hedges_logged, self.dispatcher.hedges
        self.step_log.append((time.time(), seconds, hedges))
        now = time.monotonic()
        if now - self._gauges_at < 0.5:
            return
        self._gauges_at = now
        self.metrics.engine_from(self.runner.engine.scheduler)

    def _install(self, table: dict | None) -> None:
        """A poll's or a failure report's answer: installed unless stale (the other path installed a newer one
        meanwhile; a poll still at the old version brings the newest at once). A restarted controller's always
        counts. Both paths update what the table gates: `complete` (new requests wait for it) and the version
        the next poll acknowledges; one at a time, so a slower install cannot leave its older table's state."""
        if table is None:
            return
        with self._install_lock:
            if not self._same_weights(table):
                return
            if not self.dispatcher.set_table(RoutingTable.from_dict(table)):
                return
            self.refused = None
            self.table_version, self.table_epoch = table["version"], table.get("epoch")
            if table["complete"]:
                self.complete.set()
            else:
                self.complete.clear()

    def _same_weights(self, table: dict) -> bool:
        """(Under the install lock.) Whether `table` routes to shards of this gateway's weights: a controller of another
        model or revision (a rolling update across that change: the new controller while this replica is an old one,
        or the reverse) is not followed; logged once per controller. A controller that predates the field: taken."""
        theirs = table.get("weights")
        if theirs is None or theirs == self.weights:
            return True
        if self.refused != table.get("epoch"):
            log.warning("the controller's routing table is of other weights (%s; this gateway computes with %s): not "
                        "taken, this gateway serves on its last table (a rolling update replaces it)", theirs,
                        self.weights)
        self.refused = table.get("epoch")
        return False

    def _poll_table(self) -> None:
        """Long-poll the controller's table (a new version comes back at once, else None after TABLE_WAIT_S),
        acknowledging the version this gateway has; keep the last on errors. One call a second while nothing
        changes: polling every 0.1 s kept the controller replica at 0.065-0.083 of a core, 0.034-0.045 now
        (benchmarks/serving.py, cores_busy)."""
        while not self.stopped.is_set():
            try:
                # a gateway refusing the controller's tables runs none of them: it acknowledges nothing
                gateway_id = None if self.refused is not None else self.gateway_id
                call = self.controller.table.remote(self.table_version, gateway_id, TABLE_WAIT_S, self.table_epoch)
                self._install(_answer(call, CALL_TIMEOUT_S + TABLE_WAIT_S))
                if self.refused is not None:
                    self.stopped.wait(REFUSED_POLL_S)
            except Exception as e:  # noqa: BLE001 - controller restarting; keep serving on the last table
                log.warning("routing-table poll failed: %s", e)
                self.stopped.wait(0.5)
            self.stopped.wait(0.01)  # never a busy loop, whatever the controller answers

    def _on_failure(self, shard_id: str) -> RoutingTable | None:
        """Called from the dispatcher's report thread when a shard call fails: installs the controller's answer
        as a poll's (None: nothing more for the dispatcher to install)."""
        self._install(_answer(self.controller.report_failure.remote(shard_id), CALL_TIMEOUT_S))
        return None

    async def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Wait until every expert has a live copy (shards still loading after a deploy). A gateway that stops
        meanwhile (its poller ended: no table will come) ends the wait at once with RequestFailed."""
        t0 = time.monotonic()
        while not self.complete.is_set():
            if self.stopped.is_set():
                raise RequestFailed(SHUTTING_DOWN)
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError("expert shards are not ready")
            await asyncio.sleep(0.05)

    def stats(self) -> dict:
        import numpy as np

        over = list(self.dispatcher.fanout_overhead_s)
        pct = (lambda q: float(np.percentile(over, q)) if over else None)
        st = self.runner.stats()
        st.update({"pid": os.getpid(), "table_version": self.table_version, "fanout_overhead_p50_s": pct(50),
                   "fanout_overhead_p99_s": pct(99), "fanout_samples": len(over),
                   "failovers": self.dispatcher.failovers, "hedges": self.dispatcher.hedges,
                   "fault_log": list(self.dispatcher.fault_log), "shard_tokens": dict(self.dispatcher.shard_tokens),
                   "expert_tokens_total": int(self.metrics.expert_token_totals().sum()),
                   "metrics_flush_errors": self.metrics.flush_errors, "hook_errors": self.runner.hook_errors,
                   # shard address -> the socket family of its frame connection (AF_UNIX on this host, else AF_INET)
                   "shard_connections": dict(getattr(self.dispatcher.transport, "families", {}))})
        return st

    def healthy(self) -> None:
        if not self.runner._thread.is_alive():
            raise RuntimeError("engine thread died")
        if self.runner.gave_up:  # else, with the engine idle between requests, it failed them all while healthy
            raise RuntimeError("engine steps keep failing: three in a row raised, and none has succeeded since")
        if self.runner.engine.has_work() and time.monotonic() - self.runner.last_step_at > 120:
            raise RuntimeError("engine wedged: no step for 120 s")


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class Gateway:
    """Ingress of Serve's gRPC proxy for `elasticmoe.v1.Generation` and of HTTP (the OpenAI-compatible API)."""

    def __init__(self, args: dict, controller, shards=None):
        self.core = GatewayCore(args, controller)
        self.direct = None
        try:
            self.core.runner.engine.set_limits(RequestLimits.of(self.core.args.limits))
            self.service = GenerationService(self.core)
            if (d := self.core.args.direct_grpc) is not None:
                self.direct = DirectIngress(self.service, d.host, d.port, max_rpcs=self.core.runner.capacity + 64,
                                            app=_app_name(), max_connections=d.max_connections, idle_s=d.idle_s)
        except BaseException:  # e.g. the direct port taken: the engine thread must not outlive this replica
            self.core.close()
            raise
        freeze_startup_heap()  # a full collection then walks what serving made, not the 0.4 M objects of start-up

    def __serve_build_asgi_app__(self):
        """Serve builds the HTTP app after __init__, once per replica: the OpenAI routes over this core."""
        from elasticmoe.gateway.openai_api import build_openai_app

        app = build_openai_app(self.core)
        freeze_startup_heap()  # and what the app's modules (FastAPI, pydantic models) added
        return app

    async def Generate(self, request, grpc_context=None):
        return await self.service.generate(request, grpc_context)

    async def GenerateStream(self, request, grpc_context=None) -> AsyncIterator:
        # closed at once when Serve closes this one (the client left): its request is aborted and counted then
        async with contextlib.aclosing(self.service.generate_stream(request, grpc_context)) as responses:
            async for r in responses:
                yield r

    async def step_times(self, since: float = 0.0) -> list[tuple[float, float, int]]:
        """(wall time, seconds, calls hedged) of every engine step after `since` (for stall measurements)."""
        return [x for x in list(self.core.step_log) if x[0] >= since]

    async def stats(self) -> dict:
        """Engine occupancy and fan-out figures (for tests, benchmarks and `elasticmoe status`)."""
        return self.core.stats()

    def check_health(self) -> None:
        self.core.healthy()
        if self.direct is not None and not self.direct.alive():
            raise RuntimeError("the direct_grpc server stopped")

    def __del__(self):
        """Serve stops this replica (after its own requests drained): the direct port's calls get drain_s."""
        if getattr(self, "core", None) is not None:
            self.core.stopped.set()
        if getattr(self, "direct", None) is not None:
            self.direct.stop(self.core.args.direct_grpc.drain_s)
            self.direct = None
