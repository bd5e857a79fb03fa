"""The expert-shard Serve deployment: one replica per GPU, registers with the controller, serves experts over gRPC."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from elasticmoe.config import AppArgs, weights_id
from elasticmoe.experts.placement_calls import PlanTooLarge, PlanUnreadable
from elasticmoe.heap import freeze_startup_heap

log = logging.getLogger("elasticmoe.shard")
PLAN_RETRY_S = 1.0  # the first wait before a registration plan the checkpoint could not give is tried again
PLAN_RETRY_MAX_S = 30.0  # the wait doubles with each failure in a row up to this (a repaired file is read then)
CONTROLLER_PROBE_S = 5.0  # how long a stopping shard waits for the controller to show it is there
STOP_GRACE_S = 2.0  # the calls in flight when a shard stops get this long to be answered


def bind_host() -> str:
    """127.0.0.1 unless ELASTICMOE_EXPERT_HOST says otherwise ("node_ip" = this Ray node's address)."""
    host = os.environ.get("ELASTICMOE_EXPERT_HOST", "127.0.0.1")
    if host == "node_ip":
        import ray

        host = ray.util.get_node_ip_address()
    return host


def _replica_id() -> str:
    """The Serve replica's id; outside a replica (a shard built in-process) one named after the process."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # Serve raises when there is no replica context
        return f"shard-{os.getpid()}"


class OtherWeights(Exception):
    """A registration plan of a controller of other weights (config.weights_id): a rolling update across a change of
    model or revision, this shard new and the controller old or the reverse. None of it is loaded: the gateways that
    follow that controller would sum this checkpoint's experts into the other's layers."""

    def __init__(self, theirs: str, mine: str):
        super().__init__(f"the controller places the experts of {theirs}; this shard holds {mine}: it loads none of "
                         f"them (a rolling update across a change of model or revision) and joins a controller of its "
                         f"own weights")


@serve.deployment(max_ongoing_requests=100, health_check_period_s=2, health_check_timeout_s=10)
class ExpertShard:
    """Holds a share of the experts; the gateway calls its gRPC server directly (not through Serve)."""

    load_error: str | None = None  # why the last try of the registration plan could not load its experts
    plan_failures = 0  # those tries in a row

    def __init__(self, args: dict, controller):
        from elasticmoe.experts.shard_server import start_server
        from elasticmoe.model import open_model
        from elasticmoe.model.experts import ExpertStore
        from elasticmoe.rpc.codec import tune_malloc

        self.args = AppArgs.model_validate(args)
        self.weights = weights_id(self.args)  # a plan of other weights is not loaded (_register)
        tune_malloc()
        threads = max(1, int(self.args.shard_resources.num_cpus))
        torch.set_num_threads(threads)
        files = open_model(self.args.model, check_shapes=False)  # (the dense weights are the gateway's)
        device = torch.device("cuda" if self.args.device == "cuda" else "cpu")
        self.store = ExpertStore(files.ckpt, files.names, files.spec, getattr(torch, self.args.dtype), device)
        self.shard_id = _replica_id()
        host = bind_host()
        self.server, self.servicer, port = start_server(self.store, self.shard_id, host=host,
                                                        max_rows=self.args.limits.max_num_batched_tokens,
                                                        insecure=self.args.insecure_internal)
        self.address = f"{host}:{port}"
        self.controller = controller
        self.registered = threading.Event()
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self.desired: float | None = None  # the controller's shard count; None: it has not answered this replica yet
        self.stopping = False
        self._ready_lock = threading.Lock()  # `stopping` is set under it: no ready() after __del__ skipped the drain
        self.evicted: str | None = None
        freeze_startup_heap()  # a full collection then walks what serving made, not the objects of start-up
        threading.Thread(target=self._run, name="register", daemon=True).start()

    def _run(self) -> None:
        self._register()
        self._heartbeats()

    def _register(self) -> None:
        """Announce to the controller, load the assigned experts, report ready (retrying while it starts), until
        registered or stopping. A retry drops what its plan does not name only while the controller has not
        published this shard yet. A plan the checkpoint cannot give (experts.placement_calls.PlanUnreadable), or one
        that does not fit in memory (PlanTooLarge), is the same on every try until its files are repaired or memory is
        freed: reported to the controller (its status) and logged as an error naming the file and the tensor, or the
        plan's bytes and what memory refused, then tried again after a backoff (_plan_failed); so are the experts
        assigned to it since its plan, which the controller's ready() loads, when the checkpoint cannot give them, and
        a plan of other weights (OtherWeights), until a controller of this shard's places it."""
        for attempt in range(600):
            if self.stopping:
                return
            try:
                plan = self.controller.register.remote(self.shard_id, self.address).result(timeout_s=30)
                self.desired = float(plan["desired"])
                if plan.get("weights", self.weights) != self.weights:  # a controller that predates it: no field
                    self._plan_failed(OtherWeights(plan["weights"], self.weights))
                    continue
                t0 = time.perf_counter()
                # an earlier attempt's plan is dropped, unless published: gateways may route to extras (dropped
                # after acks); under the servicer's placement lock, as the controller's LoadExperts / DropExperts
                try:
                    nbytes = self.servicer.apply_plan(plan["experts"], plan["version"], not plan.get("published"))
                except (PlanUnreadable, PlanTooLarge) as e:
                    self._plan_failed(e)
                    continue
                log.info("shard %s loaded %d experts (%.1f MB) in %.2fs", self.shard_id, len(plan["experts"]),
                         nbytes / 1e6, time.perf_counter() - t0)
                with self._ready_lock:  # a stop now waits for this answer, and drains what it published
                    if self.stopping:
                        return
                    answer = self.controller.ready.remote(self.shard_id).result(timeout_s=120)
                    unreadable = answer.get("load_error") if isinstance(answer, dict) else None
                    if not unreadable:
                        self.load_error, self.plan_failures = None, 0
                        self.registered.set()
                        return
                # the experts assigned to it since its plan cannot be read: as its plan's, outside the lock
                self._plan_failed(PlanUnreadable(unreadable))
            except Exception as e:  # noqa: BLE001 - the controller may still be starting
                self.error = e
                log.warning("shard %s: registration attempt %d failed: %s", self.shard_id, attempt, e)
                time.sleep(min(0.2 * (attempt + 1), 2.0))

    def _plan_failed(self, e: Exception) -> None:
        """The plan's experts cannot be read, do not fit in memory, or are of other weights (OtherWeights): tell the
        controller (shown by `elasticmoe status` until this shard gets ready), log it, and wait PLAN_RETRY_S, doubling
        with each failure in a row up to PLAN_RETRY_MAX_S (a stop ends the wait). The file may be repaired, memory
        freed, or a controller of this shard's weights come meanwhile: a later try loads the plan."""
        self.error, self.load_error = e, str(e)
        self.plan_failures += 1
        wait = min(PLAN_RETRY_S * 2 ** (self.plan_failures - 1), PLAN_RETRY_MAX_S)
        log.error("shard %s cannot load its experts (try %d; next in %.1f s): %s", self.shard_id, self.plan_failures,
                  wait, e)
        try:
            self.controller.plan_failed.remote(self.shard_id, self.load_error).result(timeout_s=10)
        except Exception as report:  # noqa: BLE001 - a restarting controller hears it at the next failure
            log.warning("shard %s: reporting the failed load to the controller failed: %s", self.shard_id, report)
        deadline = time.monotonic() + wait
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _heartbeats(self) -> None:
        """Check in every second: follow the desired shard count; a controller that no longer knows this shard
        (it was dropped while paused or cut off) gets it replaced through the health check: no zombies."""
        while not self.stopping:
            try:
                beat = self.controller.heartbeat.remote(self.shard_id, self.address).result(timeout_s=10)
                self.desired = float(beat["desired"])
                if not beat["known"] and self.registered.is_set():
                    self.evicted = "the controller dropped this shard from the placement"
                    log.warning("shard %s: %s; failing the health check", self.shard_id, self.evicted)
                    return
            except Exception as e:  # noqa: BLE001 - a restarting controller: keep serving, try again
                log.debug("heartbeat failed: %s", e)
            time.sleep(1.0)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for Serve (see autoscaler.policy.shard_autoscaling_policy): none before the
        controller has answered (the config's num_shards is no count the controller asked for)."""
        return {} if self.desired is None else {"desired_shards": self.desired}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        if self.evicted:
            raise RuntimeError(self.evicted)
        if not self.registered.is_set() and time.monotonic() - self.started > 600:
            if self.load_error:  # a new replica opens the checkpoint again: a file replaced by another is read then
                raise RuntimeError(f"cannot load its experts after 600 s ({self.plan_failures} tries in a row): "
                                   f"{self.load_error}")
            raise RuntimeError(f"not registered with the controller after 600 s: {self.error}")

    async def inject_faults(self, **faults) -> dict:
        """Test hook: arm faults of this replica's server (see experts.server.Faults); returns them."""
        from dataclasses import asdict, replace

        self.servicer.faults = replace(self.servicer.faults, **faults)
        return {"shard_id": self.shard_id, "pid": os.getpid(), **asdict(self.servicer.faults)}

    async def info(self) -> dict:
        return {"shard_id": self.shard_id, "address": self.address, "held": len(self.store.held()), "pid": os.getpid(),
                "registered": self.registered.is_set(), "load_error": self.load_error}

    def _stop_registering(self) -> None:
        """No registration attempt and no ready() after this: one in flight is answered first."""
        with self._ready_lock:
            self.stopping = True

    async def __del__(self):
        """Graceful shutdown (scale-in): the controller moves our experts elsewhere before the server stops.

        When the whole app is being deleted its controller is going too, and a call to it would wait for a replica
        until Serve kills us (graceful_shutdown_timeout_s): a controller that does not answer `info` within
        CONTROLLER_PROBE_S gets no drain request."""
        import asyncio

        await asyncio.to_thread(self._stop_registering)
        if self.registered.is_set():
            try:
                await asyncio.wait_for(self.controller.info.remote(), CONTROLLER_PROBE_S)  # an awaitable response
                answer = await self.controller.drain.remote(self.shard_id)
                if not answer.get("drained", True):
                    log.warning("shard %s: the drain left experts with no live copy elsewhere; stopping anyway (the "
                                "controller's health round re-homes them)", self.shard_id)
            except asyncio.TimeoutError:
                log.info("shard %s: no controller to drain to (app deleted?): stopping", self.shard_id)
            except Exception as e:  # noqa: BLE001 - the gateway's failover covers the rest
                log.warning("drain of %s failed: %s", self.shard_id, e)
        stopped = self.server.stop(grace=STOP_GRACE_S)  # Serve kills the process once this returns: wait for it
        await asyncio.to_thread(stopped.wait, STOP_GRACE_S + 3.0)
