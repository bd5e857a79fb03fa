"""What a shard out of memory answers, and what the gateway decides from it, without a network: torch's and our own
allocation failures read as out of memory, the answer names the layer, the tokens and the bytes; the gateway reads it
as a shard short of memory (alive), neither busy nor oversize; its tokens end the step only where no copy outside
those out of memory (and those failed this step) is left."""

from __future__ import annotations

import grpc
import pytest
import torch

from elasticmoe.experts.errors import out_of_memory, placement_code, run_out_of_memory, stream_failure
from elasticmoe.gateway.failover import short_only
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.transport import TransportError, is_busy, is_oversize, is_short
from elasticmoe.model.expert_weights import storage
from elasticmoe.rpc import frames


def _allocation_failures() -> list[BaseException]:
    """Real failures: torch's CPU allocator (a RuntimeError) and model.expert_weights.storage's mmap (a MemoryError)."""
    failures = []
    for allocate in (lambda: torch.empty(1 << 62, dtype=torch.uint8),
                     lambda: storage((1 << 40, 1 << 20), torch.float32, torch.device("cpu"))):
        with pytest.raises((RuntimeError, MemoryError)) as e:
            allocate()
        failures.append(e.value)
    return failures


def test_allocation_failures_are_out_of_memory_and_their_answer_names_layer_tokens_and_bytes():
    cpu, storage = _allocation_failures()
    assert out_of_memory(cpu) and out_of_memory(storage) and not out_of_memory(RuntimeError("shape mismatch"))
    assert run_out_of_memory(3, 2048, cpu) == (
        f"{frames.OUT_OF_MEMORY}: layer 3, 2048 tokens, {1 << 62} bytes could not be allocated (DefaultCPUAllocator: "
        f"can't allocate memory: you tried to allocate {1 << 62} bytes. Error code 12 (Cannot allocate memory))")
    assert run_out_of_memory(1, 7, storage).startswith(
        f"{frames.OUT_OF_MEMORY}: layer 1, 7 tokens, {1 << 62} bytes could not be allocated (cannot allocate")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.06 GiB is free. " + "x" * 600)
    said = run_out_of_memory(0, 9, gpu)  # torch's text as a GPU shard's allocator raises it (no GPU here)
    assert out_of_memory(gpu) and said.startswith(f"{frames.OUT_OF_MEMORY}: layer 0, 9 tokens, 2.50 GiB could not")
    assert len(said) < 400 and said.endswith("...)")  # torch's allocator advice clipped


def test_a_load_or_drop_out_of_memory_is_resource_exhausted_whichever_allocator_refused():
    assert [placement_code(e) for e in _allocation_failures()] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert placement_code(RuntimeError("shape mismatch")) == grpc.StatusCode.INTERNAL


def test_a_dead_stream_readers_status_is_short_when_out_of_memory_else_internal():
    for e in _allocation_failures():
        code, message = stream_failure(e)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and is_short(TransportError(code, message)), message
        assert message.startswith(f"{frames.OUT_OF_MEMORY}: the stream's reader stopped (")
    code, message = stream_failure(TypeError("sequence item 1: expected a bytes-like object, int found"))
    assert code == grpc.StatusCode.INTERNAL and not is_short(TransportError(code, message))
    assert message == "the stream's reader failed: TypeError: sequence item 1: expected a bytes-like object, int found"


@pytest.mark.parametrize("code,details,kind", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{frames.BUSY}: all RunExperts workers in use", "busy"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{frames.OVERSIZE}: 9 bytes, 127.0.0.1:1 takes 4", "oversize"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{frames.OUT_OF_MEMORY}: layer 1, 2048 tokens", "short"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", "busy"),  # gRPC's own: a full server
    (grpc.StatusCode.UNAVAILABLE, "Concurrent RPC limit exceeded!", None),  # only RESOURCE_EXHAUSTED is a refusal
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded! and more", None),  # gRPC's exact text only
    (grpc.StatusCode.INTERNAL, f"{frames.OUT_OF_MEMORY}: layer 1", None),  # failed: only the code says so
    (grpc.StatusCode.UNAVAILABLE, "stream ended", None),
])
def test_a_refusal_is_busy_oversize_or_short_and_nothing_else_is(code, details, kind):
    e = TransportError(code, details)
    assert [k for k, test in (("busy", is_busy), ("oversize", is_oversize), ("short", is_short)) if test(e)] == \
        ([kind] if kind else [])


def _table(copies: dict[int, list[int]]) -> RoutingTable:
    """Layer 0's experts 0-3 on shards s0-s2 (`copies`: expert -> shard indices, equal shares)."""
    layer = [[(s, 1.0 / len(copies[e])) for s in copies[e]] for e in range(4)]
    return RoutingTable.from_dict({"version": 1, "layers": {0: layer},
                                   "shards": [{"id": f"s{i}", "address": f"127.0.0.1:{i}"} for i in range(3)]})


@pytest.mark.parametrize("copies,hard,short,ends", [
    ({0: [0, 1]}, {"s0"}, {"s0"}, False),  # another copy takes the tokens (a busy one too: busy is not in hard)
    ({0: [0]}, {"s0"}, {"s0"}, True),  # the only copy is out of memory: no table brings another
    ({0: [0, 1]}, {"s0", "s1"}, {"s0"}, True),  # the other copy failed this step (s1 dead): the same
    ({0: [1]}, {"s0", "s1"}, {"s0"}, False),  # expert 0's only copy failed: a new table may bring one, wait
    ({0: [0, 2]}, {"s0", "s2"}, {"s0", "s2"}, True),  # every copy out of memory
])
def test_a_step_ends_for_memory_only_where_no_other_copy_is_left(copies, hard, short, ends):
    table = _table({e: copies.get(e, [2]) for e in range(4)})
    ids = torch.tensor([[0, -1], [0, -1], [-1, -1]])  # [T, k]: expert 0's tokens
    assert short_only(table, 0, ids, hard, short) is ends
    assert short_only(table, 0, torch.full((3, 2), -1), hard, short) is False  # no token routed
