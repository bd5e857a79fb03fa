"""One engine step's flat token batch: which tokens, at which positions, in which KV-cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_GROUP_MIN = 512  # decode rows with contexts up to this long share one group, however their lengths differ


@dataclass(frozen=True)
class SeqChunk:
    """The new tokens of one sequence in this step: cache slot, first position, count, offset in the flat batch."""

    slot: int
    start: int  # cache position of the first new token (= tokens already cached)
    length: int
    offset: int


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows attended together: each reads its slot up to the group's longest context, masked past its own."""

    rows: torch.Tensor  # [B] flat rows of the single-token chunks
    slots: torch.Tensor  # [B]
    lens: torch.Tensor  # [B] context length including the new token
    max_len: int


@dataclass(frozen=True)
class StepBatch:
    """Flat batch of T tokens from N sequences. Decode chunks (length 1) are attended in groups of similar context
    lengths (`decode_groups`)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_slots: torch.Tensor  # [T] int64, cache slot of each token
    chunks: tuple[SeqChunk, ...]
    prefill: tuple[SeqChunk, ...]  # chunks of more than one token, attended one by one
    decode_groups: tuple[DecodeGroup, ...]
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
    prefill = tuple(c for c in out if c.length > 1)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    groups = tuple(DecodeGroup(t([c.offset for c in g]), t([c.slot for c in g]), t([c.start + 1 for c in g]),
                               g[-1].start + 1) for g in group_decodes([c for c in out if c.length == 1]))
    return StepBatch(
        token_ids=t(ids), positions=t(pos), token_slots=t(slots), chunks=tuple(out), prefill=prefill,
        decode_groups=groups, last_rows=t([c.offset + c.length - 1 for c in out]),
    )


def group_decodes(decode: list[SeqChunk]) -> list[list[SeqChunk]]:
    """Decode chunks in groups by context length, each group ascending: a row joins the group of the rows shorter
    than it unless its context is over both DECODE_GROUP_MIN and twice the group's shortest. So a row reads at most
    about twice its own context (or DECODE_GROUP_MIN), not the step's longest: one long conversation no longer
    makes every short one beside it read (and, with MLA, expand) that many cached positions each step."""
    groups: list[list[SeqChunk]] = []
    for c in sorted(decode, key=lambda c: c.start):
        n = c.start + 1
        if groups and n <= max(DECODE_GROUP_MIN, 2 * (groups[-1][0].start + 1)):
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups
