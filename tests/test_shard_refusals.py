"""Shards that refuse a call without having failed, over real in-process shards: a full shard (busy) is asked again or
its call goes to another copy, a shard that takes smaller messages than the gateway gets calls within its limit, and
neither is reported to the controller as failed."""

from __future__ import annotations

import threading

import pytest
import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.model.dispatch import ExpertsUnavailable
from elasticmoe.rpc import frames
from tests.shard_util import (ALL_BOTH, E, SPLIT, Shards, _inputs, _reference, _run, files,  # noqa: F401
                                 transport)

# start_server's arguments that leave no room for one more caller: every unary call, or every frame connection,
# is refused with RESOURCE_EXHAUSTED "shard busy: ..."
FULL = {"unary": {"max_workers": 0}, "socket": {"max_streams": 0}}


def _make_room(shards: Shards, i: int, transport: str) -> None:
    """Shard i takes calls again (a worker, or a frame connection, is free)."""
    if transport == "unary":
        shards.servicers[i]._run_slots = threading.BoundedSemaphore(4)
    else:
        shards.servers[i].listener.max_conns = 4


def _unreported(d: GrpcDispatcher, reported: list[str]) -> bool:
    """Nothing was reported: none queued or being reported (checked first), none reported already."""
    return not d._reporting and reported == []


def test_a_busy_shard_is_failed_over_and_not_reported(files, transport):
    shards = Shards(files, [list(range(E)), list(range(E))], {0: FULL[transport]})
    try:
        layer, inputs = shards.layers[0], _inputs(files, 7)
        ref = _reference(files, layer, *inputs)
        reported: list[str] = []
        d = GrpcDispatcher(transport=transport, timeout_s=5, on_failure=reported.append)
        d.set_table(shards.table(ALL_BOTH))
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and d.shard_tokens.get("s0", 0) == 0  # s0 refused: s1 computed it all
        assert _unreported(d, reported), reported
        assert [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
        d.close()
    finally:
        shards.close()


def test_a_busy_single_copy_is_asked_again_until_it_has_room(files, transport):
    """s0 holds the only copies of experts 0-3 and refuses at first: the step asks it again (no report, no new
    table to wait for) and gets its answer once it has room."""
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]], {0: FULL[transport]})
    try:
        layer, inputs = shards.layers[0], _inputs(files, 8)
        ref = _reference(files, layer, *inputs)
        reported: list[str] = []
        d = GrpcDispatcher(transport=transport, timeout_s=5, failover_s=10, on_failure=reported.append)
        d.set_table(shards.table(SPLIT))
        room = threading.Timer(0.3, _make_room, (shards, 0, transport))
        room.start()
        out, _ = _run(d, layer, inputs)
        room.join()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and d.shard_tokens.get("s0", 0) > 0
        assert _unreported(d, reported), reported
        d.close()
    finally:
        shards.close()


def _tokens(files, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [n, H], ids [n, 2] (distinct experts), weights [n, 2]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(n)])
    return torch.randn(n, files.spec.hidden_size, generator=g), ids, torch.rand(n, 2, generator=g)


@pytest.mark.parametrize("wire", ["unary", "stream", "socket"])
def test_a_shard_with_a_smaller_message_limit_gets_calls_within_it(files, wire):
    """s0 takes messages of 4 rows at most (ELASTICMOE_GRPC_MAX_MESSAGE_BYTES, announced in Health), the gateway
    256 MiB, s1 the gateway's: over each transport s0's share of a 96-token step goes in calls of 4 rows, s1's in
    one; the call sized before the limit was known is split anew, none is reported."""
    hidden_size = files.spec.hidden_size
    limit = 4096 + 4 * 8 * hidden_size  # frames.max_rows: 4 rows of float64 output
    assert frames.max_rows(hidden_size, 2, 4, 8, limit) == 4
    # s0 runs all its calls at once (unary: none refused busy)
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]], {0: {"max_message_bytes": limit, "max_workers": 32}})
    try:
        layer, inputs = shards.layers[0], _tokens(files, 96, 9)
        rows_s0 = int((inputs[1] < 4).any(1).sum())
        assert rows_s0 * (4 * hidden_size + 2 * 8) > limit  # one call with them all: too large for s0
        assert rows_s0 <= 4 * 32  # s0 computes them all at once
        ref = _reference(files, layer, *inputs)
        reported: list[str] = []
        d = GrpcDispatcher(transport=wire, timeout_s=5, failover_s=10, on_failure=reported.append)
        d.set_table(shards.table(SPLIT))
        out, _ = _run(d, layer, inputs)  # the first call is sized before Health has told the limit: sized again
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        first = d.failovers
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert first == 1 and d.failovers == first  # one call sized before the limit was known; then none
        assert d.shard_tokens["s0"] == 2 * rows_s0 and shards.servicers[0].calls >= 2 * rows_s0 // 4
        assert shards.servicers[1].calls == 2  # s1's limit is the gateway's: one call a step
        assert _unreported(d, reported), reported
        assert [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
        d.close()
    finally:
        shards.close()


@pytest.mark.parametrize("wire", ["unary", "stream", "socket"])
def test_a_shard_whose_limit_is_below_one_row_fails_the_step_at_once(files, wire):
    """s0 takes messages smaller than one token's row: a call of one row is refused too, so the step ends
    unavailable at once, naming the limit, instead of asking again until failover_s; nothing is reported."""
    limit = 2 * files.spec.hidden_size  # half of one token's hidden row (float32)
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]], {0: {"max_message_bytes": limit}})
    try:
        layer, inputs = shards.layers[0], _tokens(files, 16, 3)
        rows_s0 = int((inputs[1] < 4).any(1).sum())
        reported: list[str] = []
        d = GrpcDispatcher(transport=wire, timeout_s=5, failover_s=10, on_failure=reported.append)
        d.set_table(shards.table(SPLIT))
        for _ in range(2):  # the first step sized its call before Health told the limit; the second knows it
            with pytest.raises(ExpertsUnavailable, match=f"s0's ELASTICMOE_GRPC_MAX_MESSAGE_BYTES \\({limit} bytes\\) "
                                                         "is below one token's row"):
                _run(d, layer, inputs)
        # refused: the first call, then at most each of s0's rows once a step (the old retry ran until failover_s)
        assert d.failovers <= 1 + 2 * rows_s0 and shards.servicers[0].calls == 0, d.failovers
        assert _unreported(d, reported), reported
        d.close()
    finally:
        shards.close()


def test_a_request_over_a_limit_below_one_row_is_told_the_cause(files):
    """The client's error (HTTP 503 / UNAVAILABLE text) names the message limit, not "some experts are unavailable
    ... retry later" (a retry fails the same way), and shows no shard address or id."""
    from elasticmoe import SamplingParams
    from elasticmoe.engine.engine import Engine
    from elasticmoe.engine.scheduler import RequestFailed

    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]], {0: {"max_message_bytes": 2 * files.spec.hidden_size}})
    d = GrpcDispatcher(transport="socket", timeout_s=5, failover_s=10)
    try:
        d.set_table(shards.table(SPLIT))
        engine = Engine(files, d, max_num_seqs=2, max_model_len=64, retry_backoff_s=(0.01,))
        seq = engine.add_request("r", list(range(1, 17)), SamplingParams(max_tokens=2, temperature=0))
        while engine.has_work():
            engine.step()
        assert isinstance(seq.error, RequestFailed), seq.error
        message = str(seq.error)
        assert "ELASTICMOE_GRPC_MAX_MESSAGE_BYTES" in message and "below one token's row" in message, message
        assert "retry later" not in message and "127.0.0.1" not in message and "s0" not in message, message
    finally:
        d.close()
        shards.close()
