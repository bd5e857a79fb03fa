"""One engine step's flat token batch: which tokens, at which positions, in which KV-cache slots and blocks."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from elasticmoe.model.block_table import BlockTable

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
    """Decode rows attended together: each reads its slot up to the group's longest context, masked past its own,
    at `read`, the flat cache rows of positions [0, max_len) of each row's slot (BlockTable.read_index)."""

    rows: torch.Tensor  # [B] flat rows of the single-token chunks
    slots: torch.Tensor  # [B]
    lens: torch.Tensor  # [B] context length including the new token
    max_len: int
    read: torch.Tensor  # [B, max_len] int64


@dataclass(frozen=True)
class StepBatch:
    """Flat batch of T tokens from N sequences. Decode chunks (length 1) are attended in groups of similar context
    lengths (`decode_groups`). Where the cache holds the tokens (BlockTable): `write_index`, the flat cache row each
    token's keys go to, and `prefill_reads`, the flat rows each prefill chunk reads ([1, start + length]; a decode
    group's: DecodeGroup.read), for KVCache.write and KVCache.read."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_slots: torch.Tensor  # [T] int64, cache slot of each token
    chunks: tuple[SeqChunk, ...]
    prefill: tuple[SeqChunk, ...]  # chunks of more than one token, attended one by one
    decode_groups: tuple[DecodeGroup, ...]
    last_rows: torch.Tensor  # [N] flat row of each chunk's last token (where logits are taken)
    write_index: torch.Tensor  # [T] int64
    prefill_reads: tuple[torch.Tensor, ...]  # [1, L] per prefill chunk

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


def _plan(chunks: list[tuple[int, int, list[int]]], table: BlockTable) -> _Plan:
    """The host side of the batch of `chunks` ((slot, start, new token ids) per sequence); a chunk past its slot's
    KV-cache blocks is refused (ValueError)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    out: list[SeqChunk] = []
    for slot, start, toks in chunks:
        table.check(slot, start + len(toks))
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


def _batch(plan: _Plan, packed: torch.Tensor, table: BlockTable) -> StepBatch:
    """The StepBatch of `plan` over packed [sum(plan.sizes)] (views of it), its cache rows from `table`."""
    parts = packed.split(plan.sizes)
    groups = []
    for i, g in enumerate(plan.groups):
        rows, slots, lens = parts[4 + 3 * i: 7 + 3 * i]
        groups.append(DecodeGroup(rows, slots, lens, g[-1].start + 1, table.read_index(slots, g[-1].start + 1)))
    prefill = tuple(c for c in plan.chunks if c.length > 1)
    return StepBatch(token_ids=parts[0], positions=parts[1], token_slots=parts[2], chunks=plan.chunks,
                     prefill=prefill, decode_groups=tuple(groups), last_rows=parts[3],
                     write_index=table.write_index(parts[2], parts[1]),
                     prefill_reads=tuple(table.read_index(c.slot, c.start + c.length) for c in prefill))


def build_batches(parts: list[list[tuple[int, int, list[int]]]], device: torch.device,
                  table: BlockTable) -> list[StepBatch]:
    """Each part's StepBatch (a step's micro-batches). Their index tensors are views of one tensor sent to `device`
    in one copy (to_device), not a copy each (four, plus three per decode group, per batch); the block table's rows
    assigned since the last step (BlockTable.pending) travel in it too, and are written before the cache rows of
    the tokens are looked up in it (on the device: a write index per token, a read index per chunk and group)."""
    plans = [_plan(chunks, table) for chunks in parts]
    sent = dict(table.pending)
    bounds = [0]
    for p in plans:
        bounds.append(bounds[-1] + len(p.values))
    packed = to_device([v for p in plans for v in p.values] + table.update_values(sent), device)  # [sum of sizes]
    table.apply(packed[bounds[-1]:], sent)
    return [_batch(p, packed[a:b], table) for p, a, b in zip(plans, bounds, bounds[1:])]


def build_batch(chunks: list[tuple[int, int, list[int]]], device: torch.device, table: BlockTable) -> StepBatch:
    """chunks: (slot, start, new token ids) per sequence, in order, their positions in `table`'s blocks. Returns
    the step's StepBatch."""
    return build_batches([chunks], device, table)[0]


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
