"""An expert shard's fixed cost per call on a decode step's few tokens (issue 14): the torch ops one frame runs, from
its bytes to its reply, and the index work moved out of torch (numpy) kept equal to torch's."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from elasticmoe.experts.run_checks import decode_run
from elasticmoe.experts.server import ExpertServicer, _FrameAbort, _FrameContext
from elasticmoe.kernels import cpu_gemm, torch_moe
from elasticmoe.model.expert_stats import BINCOUNT_IDS, routed_counts
from elasticmoe.model.experts import ExpertStore, _local_ids
from elasticmoe.rpc import frames
from tests.shard_util import E, files  # noqa: F401

HELD = (0, 1, 2, 3)  # one of two shards' experts
MAX_OPS = 56  # torch ops one decode frame may run (69 before issue 14, 7 of them host reads; 47 after)


def _decode_frame(files, seed: int = 0) -> bytes:  # noqa: F811
    """A request frame as a gateway sends one shard of two: 12 tokens' top-2 ids, those of the other shard -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (12, 2), generator=g, dtype=torch.int32)
    ids = torch.where(ids < len(HELD), ids, -1)
    req = frames.ExpertRequest(files.spec.moe.moe_layers[0], torch.randn(12, files.spec.hidden_size, generator=g), ids,
                               torch.rand(12, 2, generator=g), 0, 1)
    return frames.request_frame(seed, req)


def _top_level_ops(events) -> list[str]:
    """The aten ops called from Python (not those an op calls inside itself)."""
    return [e.name for e in events if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]


@pytest.mark.skipif(not cpu_gemm.available(), reason="the skinny C kernel is not built here (torch's mm per expert)")
def test_a_decode_frame_reads_nothing_back_from_torch_and_runs_few_ops(files):  # noqa: F811
    """Each torch op costs the shard 2-10 us of Python on a decode step's few rows, more than the kernel's sums: one
    frame (checks, holding check, stats, grouping by expert, both kernels, reply) runs at most MAX_OPS of them, none a
    host read of a tensor's value (`int(t.max())`, `bool(...)`: the index work and checks are numpy's)."""
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(layer, e) for layer in files.spec.moe.moe_layers for e in HELD])
    servicer, replies = ExpertServicer(store, "cost"), []
    buf = _decode_frame(files)
    servicer.serve_frames([frames.decode_request(buf)], lambda parts: replies.append(b"".join(parts)))  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        servicer.serve_frames([frames.decode_request(buf)], lambda parts: replies.append(b"".join(parts)))
    ops = _top_level_ops(prof.events())
    first, again = frames.decode_reply(replies[0]), frames.decode_reply(replies[1])
    assert first.code == again.code == 0 and first.missing == []
    assert bytes(first.output.data) == bytes(again.output.data)
    assert [op for op in ops if op in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")] == []
    assert len(ops) <= MAX_OPS, sorted(ops)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_segment_order_equals_torchs(dtype):
    """_segment_order's numpy path (CPU) against the torch ops it replaced: pairs sorted by expert, stably, ids out of
    [0, E) (-1 and any other) left out, a strided view of the ids too."""
    g = torch.Generator().manual_seed(1)
    for num_experts, tokens, k in ((4, 12, 2), (8, 1, 1), (3, 40, 4), (1, 5, 3)):
        ids = torch.randint(-3, num_experts + 3, (k, tokens), generator=g).to(dtype).t()  # [T, k], not contiguous
        key = torch_moe._skip_key(ids, num_experts)  # [N]
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=num_experts + 1).tolist()
        order = order[: key.numel() - counts[num_experts]]
        got_order, got_tokens, got_counts = torch_moe._segment_order(ids, num_experts)
        assert torch.equal(got_order, order) and torch.equal(got_tokens, order // k)
        assert got_counts == counts[:num_experts]


def test_routed_counts_equal_torchs_unique():
    """ExpertStore.routed's numpy counts against torch.unique: ids in id order, -1 ignored; ids past the histogram's
    bound (BINCOUNT_IDS) counted by sorting; nothing routed is {}."""
    g = torch.Generator().manual_seed(2)
    cases = [torch.randint(-1, 8, (16, 2), generator=g, dtype=torch.int32), torch.full((3, 2), -1),
             torch.empty(0, 2, dtype=torch.int64), torch.tensor([[BINCOUNT_IDS + 5, 3], [3, -1]])]
    for ids in cases:
        want_ids, want_counts = ids[ids >= 0].unique(return_counts=True)
        want = dict(zip(want_ids.tolist(), want_counts.tolist()))
        assert routed_counts(ids) == want and list(routed_counts(ids)) == sorted(want)


def test_local_ids_equal_torchs_indexing():
    """ExpertStore.forward's global -> local lookup (numpy on the CPU) against torch's indexing, -1 included."""
    to_local = torch.tensor([-1, 0, -1, 1, 2, -1])  # [E + 1]: experts 1, 3, 4 held
    ids = torch.tensor([[0, 1], [3, -1], [4, 2], [-1, -1]], dtype=torch.int32)
    got = _local_ids(to_local, ids)
    assert got.dtype == torch.int64 and torch.equal(got, to_local[ids.long()])


def test_a_frames_weights_checked_without_torch_bf16_too(files):  # noqa: F811
    """decode_run reads a frame's tensors as the frame decoder proved them, and checks weights in numpy: bf16 (no numpy
    dtype) is widened first; a NaN on a -1 slot passes, on a routed slot it is refused, naming the field."""
    layer, hidden = files.spec.moe.moe_layers[0], torch.randn(2, files.spec.hidden_size)
    ids = torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)
    for nan_at, refused in (((0, 1), False), ((1, 0), True)):
        weights = torch.ones(2, 2, dtype=torch.bfloat16)
        weights[nan_at] = float("nan")
        frame = frames.decode_request(frames.request_frame(7, frames.ExpertRequest(layer, hidden, ids, weights)))
        if refused:
            with pytest.raises(_FrameAbort, match="topk_weights: must be finite where topk_ids >= 0"):
                decode_run(frame, _FrameContext, files.spec, 64, torch.device("cpu"), torch.float32)
            continue
        got_hidden, got_ids, got_weights = decode_run(frame, _FrameContext, files.spec, 64, torch.device("cpu"),
                                                      torch.float32)
        assert torch.equal(got_hidden, hidden) and torch.equal(got_ids, ids)
        assert torch.equal(got_weights.isnan(), weights.isnan()) and got_weights.dtype == torch.bfloat16
    empty = frames.ExpertRequest(layer, torch.empty(0, files.spec.hidden_size), torch.empty(0, 2, dtype=torch.int32),
                                 torch.empty(0, 2))
    got = decode_run(frames.decode_request(frames.request_frame(8, empty)), _FrameContext, files.spec, 64,
                     torch.device("cpu"), torch.float32)
    assert [tuple(t.shape) for t in got] == [(0, files.spec.hidden_size), (0, 2), (0, 2)]


@pytest.mark.skipif(not cpu_gemm.available(), reason="the skinny C kernel is not built here")
def test_seg_gemm_checked_skips_only_the_segments_checks():
    """checked=True (torch_moe's segments, from a histogram) gives the same sums; the operands are still checked."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    starts, counts = torch.tensor([0, 2]), torch.tensor([2, 3])
    want = cpu_gemm.seg_gemm(x, w, starts, counts, torch.empty(5, 8))
    assert torch.equal(cpu_gemm.seg_gemm(x, w, starts, counts, torch.empty(5, 8), checked=True), want)
    with pytest.raises(ValueError, match="out .* must be"):
        cpu_gemm.seg_gemm(x, w, starts, counts, torch.empty(5, 9), checked=True)
    with pytest.raises(ValueError, match="segments within the 5 rows"):
        cpu_gemm.seg_gemm(x, w, starts, torch.tensor([2, 4]), torch.empty(5, 8))
