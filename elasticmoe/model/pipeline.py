"""Micro-batch pipelining: how many micro-batches a step gets, where it is cut, and the ping-pong order."""

from __future__ import annotations

from typing import Iterator, Literal

Stage = tuple[Literal["pre", "post"], int, int]  # (stage, layer, micro-batch)


def ping_pong(num_layers: int, micro_batches: int) -> Iterator[Stage]:
    """The order of the dense stages of `micro_batches` micro-batches through `num_layers` layers.

    pre_l dispatches layer l's experts; post_l waits for them. Round robin over the micro-batches, each one
    finishing layer l (post_l) and starting layer l+1 (pre_{l+1}) in one go, so that while one runs its dense
    work the other micro-batches' experts are in flight:
        pre_0(A) pre_0(B) | post_0(A) pre_1(A) | post_0(B) pre_1(B) | post_1(A) pre_2(A) | ... | post_L-1(B).
    """
    for layer in range(num_layers):
        for mb in range(micro_batches):
            if layer:
                yield "post", layer - 1, mb
            yield "pre", layer, mb
    for mb in range(micro_batches):
        yield "post", num_layers - 1, mb


def default_micro_batches(device: str) -> int:
    """limits.micro_batches when unset: 2 on CUDA (ping-pong hides the experts' latency), 1 on CPU (each extra
    micro-batch streams the dense weights again, which costs more than it hides at decode sizes)."""
    return 2 if device.startswith("cuda") else 1


def micro_batch_count(tokens: int, seqs: int, limit: int, min_tokens: int) -> int:
    """Micro-batches for a step of `tokens` tokens from `seqs` sequences: up to `limit`, at most one per
    sequence, and `min_tokens / 2` tokens or more each (`min_tokens`: the smallest step worth two)."""
    n = min(limit, seqs, tokens * 2 // max(min_tokens, 1))
    return n if n >= 2 else 1


def split_even(sizes: list[int], n: int) -> list[tuple[int, int]]:
    """Cut a list of sequences with `sizes` tokens into `n` runs [start, end) of near-equal token counts, at
    sequence boundaries, none empty. n <= len(sizes)."""
    if not 1 <= n <= len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} sequences into {n} micro-batches")
    total, cuts, acc, i = sum(sizes), [0], 0, 0
    for k in range(1, n):
        target = total * k / n
        while i < len(sizes) and (acc + sizes[i] <= target or i < cuts[-1] + 1):
            acc += sizes[i]
            i += 1
        if i < len(sizes) and target - acc > acc + sizes[i] - target:  # the next sequence lands nearer the target
            acc += sizes[i]
            i += 1
        i = min(i, len(sizes) - (n - k))  # leave a sequence for each run still to come
        acc = sum(sizes[:i])
        cuts.append(i)
    cuts.append(len(sizes))
    return list(zip(cuts[:-1], cuts[1:]))
