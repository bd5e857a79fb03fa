"""The chunked gated delta rule (prefill chunks) against its token-by-token twin (the decode path's step), float32,
on runs on and around the 64-token blocks from a nonzero state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elasticmoe.model.deltanet import CHUNK, chunked_rule, l2norm, recurrent_rule

HEADS, DK, DV = 4, 32, 16


def _inputs(t: int, seed: int, rate: float) -> tuple[torch.Tensor, ...]:
    """A layer's delta-rule inputs as GatedDeltaNet makes them: q, k l2-normed (q scaled), log decay
    -rate * softplus(a) <= 0, beta a sigmoid; a random starting state."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (l2norm(torch.randn(HEADS, t, DK, generator=gen)) for _ in range(2))  # [h, t, dk]
    v = torch.randn(HEADS, t, DV, generator=gen)  # [h, t, dv]
    g = -rate * torch.rand(HEADS, 1, generator=gen) * F.softplus(torch.randn(HEADS, t, generator=gen))  # [h, t]
    beta = torch.randn(HEADS, t, generator=gen).sigmoid()  # [h, t]
    state = torch.randn(HEADS, DK, DV, generator=gen)  # [h, dk, dv]
    return q * DK**-0.5, k, v, g, beta, state


@pytest.mark.parametrize("rate", [1.0, 40.0])  # 40: decays that underflow to 0 within a block
@pytest.mark.parametrize("t", [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 200])
def test_chunked_equals_token_by_token_from_a_nonzero_state(t, rate):
    *args, state = _inputs(t, seed=t, rate=rate)
    out, end = chunked_rule(*args, state)
    want_out, want_end = recurrent_rule(*args, state)
    assert out.shape == (HEADS, t, DV) and end.shape == (HEADS, DK, DV)
    assert out.dtype == end.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, want_end, atol=1e-5, rtol=1e-5)
    from_zero, _ = chunked_rule(*args, None)
    assert (out - from_zero).abs().max() > 1e-4  # the starting state moves the outputs: it is read, not dropped


@pytest.mark.parametrize("t", [5, 130])
def test_no_state_is_a_zero_state(t):
    *args, _ = _inputs(t, seed=7, rate=1.0)
    out, end = chunked_rule(*args, None)
    want_out, want_end = recurrent_rule(*args, torch.zeros(HEADS, DK, DV))
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, want_end, atol=1e-5, rtol=1e-5)


def test_a_run_split_anywhere_continues_from_its_state():
    """Two chunks of a run, the second from the first's end state, equal the run in one (as the engine's chunked
    prefill feeds a slot's state from step to step)."""
    *args, state = _inputs(150, seed=3, rate=1.0)
    whole, end = chunked_rule(*args, state)
    first, mid = chunked_rule(*(x[:, :70] for x in args), state)
    second, end2 = chunked_rule(*(x[:, 70:] for x in args), mid)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end2, end, atol=1e-5, rtol=1e-5)
