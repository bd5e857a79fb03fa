"""Pure-torch fused MoE (the CPU serving path and the CUDA fallback): sort pairs by expert, GEMM per expert.

Three strategies (all numerically equivalent up to rounding):
  * "bmm":     gather the selected experts' weights and run two batched mat-vecs. No sort, no host sync.
  * "grouped": `torch.nn.functional.grouped_mm` over expert-sorted rows (CPU only here: on CUDA it is
               bf16/sm80+ only). No host sync and no per-expert Python loop. Where H or I is not a multiple of
               16 bytes (grouped_mm refuses the strides), "segment" runs instead.
  * "segment": one `mm` pair per non-empty expert segment; a single `.tolist()` of segment counts is
               the only host sync. Works everywhere (CPU/CUDA, every float dtype). On CPU with the skinny
               AVX2 kernel (cpu_gemm.c) built, all segments of bf16/fp16 experts and the fp32 segments of
               <= 16 rows go to it in one call per projection, with fp32 sums and fp32 activations.

"auto" on CPU is always "segment": each expert's rows are then computed from that expert's weights and
rows alone, so the bits do not depend on which other experts a shard holds or the batch routes to
(placement invariance). With the kernel, bf16/fp16 rows do not depend on the expert's row count either
(row invariance: splitting an expert's tokens over replicas changes nothing); fp32 segments of more than
16 rows use MKL, whose bits can differ from the kernel's by fp32 rounding (relative ~1e-6). On CUDA,
"auto" picks by size (`pick_strategy`).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_gemm
from .act import SILU, ExpertAct
from .checks import check_act, check_moe_inputs, check_out_dtype

STRATEGIES = ("auto", "bmm", "grouped", "segment")
# pick_strategy (CUDA torch fallback; CPU measurements, 1 thread, benchmarks/KERNELS.md): the weight gather
# of "bmm" costs more than the per-expert overhead it saves beyond ~256 KiB; grouped_mm pays a small cost
# per expert, hit or not, so the segment loop wins while the pairs are few compared with the experts.
BMM_MAX_PAIRS = 64
BMM_MAX_GATHER_BYTES = 256 << 10
GROUPED_MIN_PAIRS_PER_EXPERT = 0.25
# Segments of at most this many rows use weight-major products on CPU: measured 1.3-1.4x faster than
# grouped_mm / row-major mm for 1-16 rows per expert (E=8, H=512, I=1024, fp32, 2 threads); "auto"
# then prefers the segment loop while the average segment is that short.
WEIGHT_MAJOR_MAX_ROWS = 32
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def pick_strategy(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_pairs: int) -> str:
    """Choose the cheapest torch strategy for `num_pairs` = T * k (token, slot) pairs."""
    expert_bytes = (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size()
    if num_pairs <= BMM_MAX_PAIRS and num_pairs * expert_bytes <= BMM_MAX_GATHER_BYTES:
        return "bmm"
    dense_enough = num_pairs >= GROUPED_MIN_PAIRS_PER_EXPERT * w13.shape[0]
    short_segments = num_pairs <= 8 * w13.shape[0]  # about 8 rows per expert or fewer
    if hidden.device.type == "cpu" and grouped_fits(w13, w2) and dense_enough and not short_segments:
        return "grouped"
    return "segment"


def grouped_fits(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether grouped_mm takes these weights [E, 2I, H] / [E, H, I]: its operands (the weights and the [M, H] /
    [M, I] rows) need 16-byte-aligned row strides and base addresses."""
    elem = w13.element_size()
    steps = (w13.shape[2], w2.shape[2], *w13.stride(), *w2.stride())
    return (_HAS_GROUPED_MM and all(step == 1 or step * elem % 16 == 0 for step in steps)
            and w13.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0)


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    strategy: str = "auto",
    out_dtype: torch.dtype | None = None,
    checked: bool = False,
    act: ExpertAct | None = None,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MoE forward with torch ops. hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k] -> [T, H].
    act: the gated activation (act.py; default SiLU); bias: (b13 [E, 2I], b2 [E, H]) or None. Another activation
    than plain SiLU, or biases, run the segment loop with float32 activations (as the Triton kernels compute them).

    Expert ids outside [0, E) (in particular -1) contribute nothing. The weighted top-k sum accumulates
    in fp32, or in fp64 when out_dtype is float64 (exact enough that partial sums computed on different
    shards add up to the same bits); the result has out_dtype, default hidden's dtype. T, k and E may be 0
    (zeros). checked: the caller ran checks.check_moe_inputs on these tensors and check_out_dtype (fused_moe
    does); else they run here.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown torch MoE strategy {strategy!r}; expected one of {STRATEGIES}")
    if not checked:
        check_moe_inputs(hidden, w13, w2, topk_ids, topk_weights)
        check_out_dtype(out_dtype)
        bias = check_act(act, *(bias or (None, None)), w13, w2)
    if hidden.shape[0] == 0 or topk_ids.shape[1] == 0 or w13.shape[0] == 0:  # nothing routed ("bmm" indexed E = 0)
        return torch.zeros_like(hidden, dtype=out_dtype or hidden.dtype)  # [T, H]
    x = hidden if hidden.dtype == w13.dtype else hidden.to(w13.dtype)  # [T, H]
    if strategy == "auto":
        strategy = "segment" if x.device.type == "cpu" else pick_strategy(x, w13, w2, topk_ids.numel())
    if strategy == "grouped" and not grouped_fits(w13, w2):  # sizes off 16 bytes: the same sums per segment
        strategy = "segment"
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    if bias is not None or not (act or SILU).plain:
        out = _moe_act_segment(x, w13, w2, topk_ids, topk_weights, acc, act or SILU, bias)
    elif strategy == "bmm":
        out = _moe_bmm(x, w13, w2, topk_ids, topk_weights, acc)
    elif strategy == "grouped":
        out = _moe_grouped(x, w13, w2, topk_ids, topk_weights, acc)
    else:
        out = _moe_segment(x, w13, w2, topk_ids, topk_weights, acc)
    out_dtype = out_dtype or hidden.dtype
    return out if out.dtype == out_dtype else out.to(out_dtype)  # (Tensor.to costs ~1 us even as a no-op)


def _skip_key(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Flattened sort key [N]: the expert id, or E for a skipped slot (-1 or out of range)."""
    return topk_ids.reshape(-1).clamp(-1, num_experts).remainder_(num_experts + 1)  # [N]


def _expert_counts(key: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram [num_bins] of key [N]. bincount on CPU; scatter_add elsewhere (CUDA bincount syncs)."""
    if key.device.type == "cpu":
        return torch.bincount(key, minlength=num_bins)
    ones = torch.ones_like(key, dtype=torch.int64)
    return torch.zeros(num_bins, dtype=torch.int64, device=key.device).scatter_add_(0, key.long(), ones)


def _activate(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up for gate_up [M, 2I] -> [M, I]."""
    act = F.silu(gate_up[:, :inter])  # [M, I]
    return act.mul_(gate_up[:, inter:])


def _moe_bmm(x, w13, w2, topk_ids, topk_weights, acc=torch.float32) -> torch.Tensor:
    """Gathered batched mat-vec over the T*k selected experts; returns [T, H] in `acc`."""
    num_tokens, hidden_size = x.shape
    num_experts, top_k, inter = w13.shape[0], topk_ids.shape[1], w2.shape[2]
    flat = topk_ids.reshape(-1)  # [N]
    valid = (flat >= 0) & (flat < num_experts)  # [N]
    experts = torch.where(valid, flat, 0)  # [N]
    rows = x.unsqueeze(1).expand(num_tokens, top_k, hidden_size).reshape(-1, hidden_size, 1)  # [N, H, 1]
    gate_up = torch.bmm(w13[experts], rows).squeeze(-1)  # [N, 2I]
    act = _activate(gate_up, inter).unsqueeze(-1)  # [N, I, 1]
    y = torch.bmm(w2[experts], act).squeeze(-1)  # [N, H]
    weights = topk_weights.reshape(-1).float().to(acc)  # [N]
    # skipped slots ran through expert 0: mask, do not multiply by 0 (its NaN or inf would give NaN)
    weighted = torch.where(valid[:, None], y.to(acc) * weights[:, None], 0.0)  # [N, H]
    return weighted.view(num_tokens, top_k, hidden_size).sum(1)  # [T, H]


def _moe_grouped(x, w13, w2, topk_ids, topk_weights, acc=torch.float32) -> torch.Tensor:
    """One `grouped_mm` per projection over expert-sorted rows; returns [T, H] in `acc`. No host sync."""
    num_experts, top_k, inter = w13.shape[0], topk_ids.shape[1], w2.shape[2]
    key = _skip_key(topk_ids, num_experts)  # [N]
    order = torch.argsort(key, stable=True)  # [N] pair indices, skipped pairs last
    counts = _expert_counts(key, num_experts + 1)  # [E + 1]
    offs = counts[:num_experts].cumsum(0).to(torch.int32)  # [E] segment ends
    tokens = order // top_k  # [N]
    gate_up = F.grouped_mm(x[tokens], w13.transpose(1, 2), offs=offs)  # [N, 2I]
    y = F.grouped_mm(_activate(gate_up, inter), w2.transpose(1, 2), offs=offs)  # [N, H]
    weights = topk_weights.reshape(-1)[order].float().to(acc)  # [N]
    # Rows past offs[-1] (skipped pairs) are left uninitialised by grouped_mm: mask, do not multiply.
    weighted = torch.where((key[order] < num_experts)[:, None], y.to(acc) * weights[:, None], 0.0)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)  # [T, H]
    return out.index_add_(0, tokens, weighted)


def _moe_segment(x, w13, w2, topk_ids, topk_weights, acc=torch.float32) -> torch.Tensor:
    """One mm pair per non-empty expert segment; returns [T, H] in `acc`. One host sync (segment counts)."""
    order, tokens, counts = _segment_order(topk_ids, w13.shape[0])  # [M], [M], E counts
    rows = x.index_select(0, tokens)  # [M, H]
    if cpu_gemm.usable(rows, w13) and w2.is_contiguous():
        y = _segments_skinny(rows, w13, w2, counts)  # [M, H] fp32
    else:
        y = _segments_mm(rows, w13, w2, counts)  # [M, H]
    weights = topk_weights.reshape(-1).index_select(0, order).to(acc)  # [M] (exact: fp16/bf16 -> fp32 -> fp64)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)  # [T, H]
    return out.index_add_(0, tokens, torch.mul(y, weights[:, None]))  # the product in acc (y is no wider)


def _segment_order(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(order [M] int64: the pair indices (t * k + j) sorted by expert, stably, skipped pairs left out; tokens [M]:
    order // k; counts: each expert's pairs, E ints). On the CPU in numpy (~8 us for a call's few pairs, where
    torch's small ops take ~40: this runs per MoE layer and step); elsewhere torch, with one host sync."""
    top_k = topk_ids.shape[1]
    if topk_ids.device.type == "cpu":
        flat = topk_ids.numpy().reshape(-1)  # [N]
        key = np.minimum(np.maximum(flat, -1), num_experts) % (num_experts + 1)  # [N] as _skip_key
        order = np.argsort(key, kind="stable")  # [N]
        counts = np.bincount(key, minlength=num_experts + 1).tolist()
        order = order[: key.size - counts[num_experts]]  # [M]
        return torch.from_numpy(order), torch.from_numpy(order // top_k), counts[:num_experts]
    key = _skip_key(topk_ids, num_experts)  # [N]
    order = torch.argsort(key, stable=True)  # [N]
    counts = _expert_counts(key, num_experts + 1).tolist()  # the one host sync
    order = order[: key.numel() - counts[num_experts]]  # [M] drop skipped pairs
    return order, order // top_k, counts[:num_experts]


def _spans(counts: list[int]):
    """(expert, start, end) of each non-empty segment of expert-sorted rows, counts: each expert's rows."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
            start += count


def _segments_mm(rows, w13, w2, counts: list[int]) -> torch.Tensor:
    """Expert-sorted rows [M, H] -> [M, H] with one torch mm pair per non-empty segment."""
    inter = w2.shape[2]
    y = torch.empty(rows.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)  # [M, H]
    for expert, start, end in _spans(counts):
        if end - start <= WEIGHT_MAJOR_MAX_ROWS and rows.device.type == "cpu":
            # few rows: weight-major products stream the weight faster in MKL, and fastest when the
            # thin operand is column-major, hence the activation transposed into [c, I] rows
            gate_up = torch.mm(w13[expert], rows[start:end].t())  # [2I, c]
            act = F.silu(gate_up[:inter]).mul_(gate_up[inter:]).t().contiguous()  # [c, I]
            y[start:end] = torch.mm(w2[expert], act.t()).t()  # [c, H]
        else:
            gate_up = torch.mm(rows[start:end], w13[expert].t())  # [c, 2I]
            torch.mm(_activate(gate_up, inter), w2[expert].t(), out=y[start:end])  # [c, H]
    return y


def _segments_skinny(rows, w13, w2, counts: list[int]) -> torch.Tensor:
    """CPU, kernel built: rows [M, H] -> fp32 [M, H]. bf16/fp16 weights: every segment in the skinny C kernel
    (fp32 rows, sums and activations; one call per projection). fp32: segments of <= cpu_gemm.MAX_ROWS rows
    in the kernel, longer ones in MKL's blocked sgemm."""
    num_rows, inter = rows.shape[0], w2.shape[2]
    rows = rows if rows.dtype == torch.float32 else rows.float()  # [M, H], contiguous (index_select's)
    limit = cpu_gemm.MAX_ROWS if w13.dtype == torch.float32 else num_rows
    ends = list(itertools.accumulate(counts))
    small = [c if c <= limit else 0 for c in counts]
    large = [(e, end - c, end) for e, (c, end) in enumerate(zip(counts, ends)) if c > limit]
    num_experts = len(counts)
    segments = torch.from_numpy(np.array([end - c for c, end in zip(counts, ends)] + small, dtype=np.int64))  # [2E]
    starts_t, small_t = segments[:num_experts], segments[num_experts:]  # [E] each: in range (a histogram's)
    gate_up = torch.empty(num_rows, w13.shape[1], dtype=torch.float32)  # [M, 2I]
    cpu_gemm.seg_gemm(rows, w13, starts_t, small_t, gate_up, checked=True)
    for e, s, t in large:
        torch.mm(rows[s:t], w13[e].t(), out=gate_up[s:t])
    act = _activate(gate_up, inter)  # [M, I]
    y = torch.empty(num_rows, rows.shape[1], dtype=torch.float32)  # [M, H]
    cpu_gemm.seg_gemm(act, w2, starts_t, small_t, y, checked=True)
    for e, s, t in large:
        torch.mm(act[s:t], w2[e].t(), out=y[s:t])
    return y


def _moe_act_segment(x, w13, w2, topk_ids, topk_weights, acc, act: ExpertAct, bias) -> torch.Tensor:
    """The segment loop for another activation than plain SiLU or with biases: per non-empty expert, gate/up in
    float32 (+ b13), act.apply, rounded to x's dtype for the down projection (+ b2); returns [T, H] in `acc`.
    act.input_scaled: the rows are scaled by their weights first (in x's dtype) and summed unweighted."""
    order, tokens, counts = _segment_order(topk_ids, w13.shape[0])  # [M], [M], E counts
    rows = x.index_select(0, tokens)  # [M, H]
    weights = topk_weights.reshape(-1).index_select(0, order)  # [M]
    if act.input_scaled:
        rows = rows * weights.to(x.dtype)[:, None]
        weights = torch.ones_like(weights)
    inter = w2.shape[2]
    y = torch.empty(rows.shape[0], rows.shape[1], dtype=torch.float32, device=x.device)  # [M, H]
    for expert, start, end in _spans(counts):
        gate_up = torch.mm(rows[start:end], w13[expert].t()).float()  # [c, 2I]
        if bias is not None:
            gate_up += bias[0][expert].float()
        h = act.apply(gate_up[:, :inter], gate_up[:, inter:]).to(x.dtype)  # [c, I]
        y[start:end] = torch.mm(h, w2[expert].t()).float()  # [c, H]
        if bias is not None:
            y[start:end] += bias[1][expert].float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)  # [T, H]
    return out.index_add_(0, tokens, y.to(acc) * weights.to(acc)[:, None])
