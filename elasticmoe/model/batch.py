"""One engine step's flat token batch: which tokens, at which positions, in which KV-cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    """The new tokens of one sequence in this step: cache slot, first position, count, offset in the flat batch."""

    slot: int
    start: int  # cache position of the first new token (= tokens already cached)
    length: int
    offset: int


@dataclass(frozen=True)
class StepBatch:
    """Flat batch of T tokens from N sequences. Decode chunks (length 1) are attended together."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_slots: torch.Tensor  # [T] int64, cache slot of each token
    chunks: tuple[SeqChunk, ...]
    prefill: tuple[SeqChunk, ...]  # chunks of more than one token, attended one by one
    decode_rows: torch.Tensor  # [B] flat rows of the single-token chunks
    decode_slots: torch.Tensor  # [B]
    decode_lens: torch.Tensor  # [B] context length including the new token
    decode_max: int
    last_rows: torch.Tensor  # [N] flat row of each chunk's last token (where logits are taken)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def build_batch(chunks: list[tuple[int, int, list[int]]], device: torch.device) -> StepBatch:
    """chunks: (slot, start, new token ids) per sequence, in order. Returns the step's StepBatch."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    out: list[SeqChunk] = []
    for slot, start, toks in chunks:
        out.append(SeqChunk(slot, start, len(toks), len(ids)))
        ids.extend(toks)
        pos.extend(range(start, start + len(toks)))
        slots.extend([slot] * len(toks))
    decode = [c for c in out if c.length == 1]
    prefill = tuple(c for c in out if c.length > 1)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    return StepBatch(
        token_ids=t(ids), positions=t(pos), token_slots=t(slots), chunks=tuple(out), prefill=prefill,
        decode_rows=t([c.offset for c in decode]), decode_slots=t([c.slot for c in decode]),
        decode_lens=t([c.start + 1 for c in decode]), decode_max=max((c.start + 1 for c in decode), default=0),
        last_rows=t([c.offset + c.length - 1 for c in out]),
    )
