"""An expert shard's LoadExperts / DropExperts: one change of its experts at a time, a few waiting at most."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import grpc

from elasticmoe.experts.errors import out_of_memory, placement_code
from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.experts import ExpertStore, LoadStopped
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frames

log = logging.getLogger(__name__)
PLACEMENT_CALLS = 4  # LoadExperts / DropExperts running or waiting at once, at most (each holds a server worker)


class PlanUnreadable(CheckpointError):
    """A registration plan that names experts the checkpoint cannot give (apply_plan): the same on every try until
    the files are repaired."""


class PlanTooLarge(MemoryError):
    """A registration plan whose experts do not fit in the shard's memory (apply_plan): the same on every try until
    memory is freed (out_of_memory, RESOURCE_EXHAUSTED, as any MemoryError)."""


class PlacementCalls:
    """LoadExperts / DropExperts of an ExpertServicer (experts.server), which sets store, faults and
    placement_version and calls _init_placement."""

    store: ExpertStore
    placement_version: int

    def _init_placement(self) -> None:
        self._placement = threading.Lock()  # LoadExperts / DropExperts, one at a time (see their counts)
        self._placement_calls = threading.BoundedSemaphore(PLACEMENT_CALLS)  # those running or waiting for the lock

    @contextmanager
    def _placement_turn(self, context, method: str):
        """Hold the placement lock for one LoadExperts / DropExperts. At most PLACEMENT_CALLS of them run or wait at
        once (more are refused RESOURCE_EXHAUSTED "shard busy"), so the workers they hold while waiting are never
        those RunExperts and Health need; a caller gone while its call waits (its deadline, a cancel) changes nothing:
        the call ends without taking the lock, its place given back. A None context: a call made in-process."""
        active = context.is_active if context is not None else lambda: True
        if not self._placement_calls.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{frames.BUSY}: {method}: {PLACEMENT_CALLS} LoadExperts / DropExperts calls are running or "
                          "waiting for each other; ask again once they end")
        try:
            while True:
                got = self._placement.acquire(timeout=0.1)
                if not active():  # the caller left: no one would learn what a change did
                    if got:
                        self._placement.release()
                    context.abort(grpc.StatusCode.CANCELLED, f"{method}: the caller left while the call waited for "
                                  "the shard's other loads and drops; nothing changed")
                if got:
                    break
            try:
                yield
            finally:
                self._placement.release()
        finally:
            self._placement_calls.release()

    def LoadExperts(self, request, context):
        pairs = [(r.layer, r.expert) for r in request.experts]
        with self._placement_turn(context, "LoadExperts"):  # one load or drop at a time: its counts are its own
            if self.faults.load_delay_s:
                time.sleep(self.faults.load_delay_s)
            try:
                n_before = len(self.store.held())
                # its caller gone (its deadline, a cancel), the load stops between experts and is taken back: the
                # caller counts it as not done, and so does the shard (a load finishing as the caller gives up is
                # dropped again by the controller's roll back, or that drop's retry: moves._load_many)
                nbytes = self.store.load(pairs, stop=(lambda: not context.is_active()) if context else None)
            except Exception as e:  # noqa: BLE001 - each cause its code (errors.placement_code), the message as is
                if isinstance(e, LoadStopped):
                    log.warning("LoadExperts of %d experts: %s", len(pairs), e)
                context.abort(placement_code(e), str(e))
            if self.faults.fail_loads > 0:
                self.faults.fail_loads -= 1
                context.abort(grpc.StatusCode.INTERNAL, "injected fault: LoadExperts failed")
            self.placement_version = max(self.placement_version, request.placement_version)
            return pb.LoadExpertsResponse(loaded=len(self.store.held()) - n_before, bytes=nbytes,
                                          bytes_held=self.store.weight_bytes(),
                                          placement_version=self.placement_version)

    def DropExperts(self, request, context):
        with self._placement_turn(context, "DropExperts"):
            before_bytes, before = self.store.weight_bytes(), len(self.store.held())
            try:
                self.store.drop([(r.layer, r.expert) for r in request.experts])
            except Exception as e:  # noqa: BLE001 - a rebuild out of memory is RESOURCE_EXHAUSTED (not UNKNOWN)
                context.abort(placement_code(e), str(e))
            self.placement_version = max(self.placement_version, request.placement_version)
            return pb.DropExpertsResponse(dropped=before - len(self.store.held()),
                                          bytes=before_bytes - self.store.weight_bytes(),
                                          bytes_held=self.store.weight_bytes(),
                                          placement_version=self.placement_version)

    def apply_plan(self, experts: list[tuple[int, int]], version: int, drop_others: bool) -> int:
        """A registration plan (experts.deployment), applied as LoadExperts / DropExperts are, one at a time with them
        (their counts stay their own): first, if `drop_others`, drop what the plan does not name; then load it, layer
        by layer. The placement version becomes `version` unless a newer one arrived already. Returns the bytes read.

        A layer whose experts the checkpoint cannot give (FAILED_PRECONDITION: errors.placement_code) is left out and
        the others loaded: they stay held, so a retry of the plan reads only the layers that failed (the shard is in
        no table until the whole plan is held). Then the first such error is raised (PlanUnreadable), naming its file
        and tensor and the other layers that failed. Memory running out is raised at once, as PlanTooLarge naming the
        plan's experts and bytes and those held (the layers loaded before stay held); anything else as it is."""
        with self._placement:
            want = {(l, e) for l, e in experts}
            if drop_others:
                self.store.drop(set(self.store.held()) - want)
            by_layer: dict[int, list[tuple[int, int]]] = {}
            for l, e in experts:
                by_layer.setdefault(l, []).append((l, e))
            nbytes, failed = 0, []
            for layer, pairs in sorted(by_layer.items()):
                try:
                    nbytes += self.store.load(pairs)
                except Exception as e:
                    if out_of_memory(e):
                        raise PlanTooLarge(self._too_large(len(want), e)) from e
                    if placement_code(e) != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    failed.append((layer, e))
            if failed:
                (layer, first), others = failed[0], [l for l, _ in failed[1:]]
                more = f"; layers {others} failed too" if others else ""
                raise PlanUnreadable(f"layer {layer}: {first}{more}") from first
            self.placement_version = max(self.placement_version, version)
            return nbytes

    def _too_large(self, experts: int, e: BaseException) -> str:
        """What a plan of `experts` experts that ran out of memory (`e`) wanted, and what the shard holds."""
        want, held = experts * self.store.expert_bytes(), self.store.weight_bytes()
        return f"its plan's {experts} experts ({want} bytes of weights; {held} bytes of experts held) do not fit in " \
               f"memory: {e}"
