"""One engine step's flat token batch: which tokens, at which positions, in which KV-cache slots."""

from __future__ import annotations

from array import array
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


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """values as one int64 tensor [n] on `device`, read from an int64 array (a third of torch.tensor's time on
    a list). For CUDA it is copied to pinned host memory and sent without waiting (non_blocking): a copy from
    pageable memory waits for the device's queued work, a host sync; the caching host allocator keeps the pinned
    block until the copy is done."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    host = torch.frombuffer(array("q", values), dtype=torch.int64)  # [n], sharing the array's memory
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class _Plan:
    """One batch's host side: its chunks and decode groups, and its index values in the order of `sizes`: token
    ids, positions, token slots [T] each, last rows [N], then each group's rows, slots, lens [B] each."""

    chunks: tuple[SeqChunk, ...]
    groups: tuple[tuple[SeqChunk, ...], ...]
    values: list[int]
    sizes: list[int]


def _plan(chunks: list[tuple[int, int, list[int]]]) -> _Plan:
    """The host side of the batch of `chunks` ((slot, start, new token ids) per sequence)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    out: list[SeqChunk] = []
    for slot, start, toks in chunks:
        out.append(SeqChunk(slot, start, len(toks), len(ids)))
        ids.extend(toks)
        pos.extend(range(start, start + len(toks)))
        slots.extend([slot] * len(toks))
    groups = group_decodes([c for c in out if c.length == 1])
    values = ids + pos + slots + [c.offset + c.length - 1 for c in out]
    sizes = [len(ids)] * 3 + [len(out)]
    for g in groups:
        values += [c.offset for c in g] + [c.slot for c in g] + [c.start + 1 for c in g]
        sizes += [len(g)] * 3
    return _Plan(tuple(out), tuple(tuple(g) for g in groups), values, sizes)


def _batch(plan: _Plan, packed: torch.Tensor) -> StepBatch:
    """The StepBatch of `plan` over packed [sum(plan.sizes)] (views of it)."""
    parts = packed.split(plan.sizes)
    groups = tuple(DecodeGroup(*parts[4 + 3 * i: 7 + 3 * i], g[-1].start + 1) for i, g in enumerate(plan.groups))
    return StepBatch(token_ids=parts[0], positions=parts[1], token_slots=parts[2], chunks=plan.chunks,
                     prefill=tuple(c for c in plan.chunks if c.length > 1), decode_groups=groups, last_rows=parts[3])


def build_batches(parts: list[list[tuple[int, int, list[int]]]], device: torch.device) -> list[StepBatch]:
    """Each part's StepBatch (a step's micro-batches). Their index tensors are views of one tensor sent to `device`
    in one copy (to_device), not a copy each (four, plus three per decode group, per batch)."""
    plans = [_plan(chunks) for chunks in parts]
    packed = to_device([v for p in plans for v in p.values], device)  # [sum of sizes]
    bounds = [0]
    for p in plans:
        bounds.append(bounds[-1] + len(p.values))
    return [_batch(p, packed[a:b]) for p, a, b in zip(plans, bounds, bounds[1:])]


def build_batch(chunks: list[tuple[int, int, list[int]]], device: torch.device) -> StepBatch:
    """chunks: (slot, start, new token ids) per sequence, in order. Returns the step's StepBatch."""
    plan = _plan(chunks)
    return _batch(plan, to_device(plan.values, device))


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
