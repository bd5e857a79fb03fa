"""Which KV-cache blocks hold each slot's positions: the table on the device, its host copy, a step's indices."""

from __future__ import annotations

import torch


class BlockTable:
    """Block ids [num_slots, max_blocks] on the device (`tensor`), the host's copy of each slot's (`rows`), and the
    rows assigned since a step last sent them (`pending`, sent with the step's index tensors in its one copy).

    Position p of slot s is row `tensor[s, p // block_size] * block_size + p % block_size` of a cache tensor viewed
    as [blocks * block_size, ...]. Entries past a slot's own blocks name `null`, a block never written (a chunk past
    its slot's blocks is refused, `check`) and so kept zero: a decode row reading past its own blocks, masked, reads
    zeros (a masked NaN would still poison the sum). `static`: every slot owns max_blocks blocks from the start,
    slot s blocks [s * max_blocks, (s + 1) * max_blocks) (a model driven without an engine and its block pool)."""

    def __init__(self, num_slots: int, max_blocks: int, block_size: int, null: int, device: torch.device,
                 static: bool = False):
        self.num_slots, self.max_blocks, self.block_size, self.null = num_slots, max_blocks, block_size, null
        self.offsets = torch.arange(block_size, device=device)  # [bs]
        if static:
            self.tensor = torch.arange(num_slots * max_blocks, device=device).view(num_slots, max_blocks)
            self.rows = [tuple(range(s * max_blocks, (s + 1) * max_blocks)) for s in range(num_slots)]
        else:
            self.tensor = torch.full((num_slots, max_blocks), null, dtype=torch.int64, device=device)
            self.rows = [()] * num_slots
        self.pending: dict[int, tuple[int, ...]] = {}

    def assign(self, slot: int, blocks: tuple[int, ...]) -> None:
        """Slot `slot`'s positions live in `blocks` from the next step built (build_batch) on. Again with the same
        blocks: nothing (pending first, then the host row: one cut short is not taken for done)."""
        if self.rows[slot] is blocks:
            return
        if len(blocks) > self.max_blocks:
            raise ValueError(f"KV-cache slot {slot}: {len(blocks)} blocks; a slot has room for {self.max_blocks}")
        self.pending[slot] = blocks
        self.rows[slot] = blocks

    def capacity(self, slot: int) -> int:
        """Positions the slot has blocks for."""
        return len(self.rows[slot]) * self.block_size

    def check(self, slot: int, end: int) -> None:
        """Refuse (ValueError) a chunk writing positions up to `end` (exclusive) past its slot's blocks: it would
        write the null block every other slot reads."""
        if end > self.capacity(slot):
            raise ValueError(f"KV-cache slot {slot}: positions up to {end} past the {self.capacity(slot)} its "
                             f"blocks hold")

    def update_values(self, sent: dict[int, tuple[int, ...]]) -> list[int]:
        """The host values of the rows `sent`: their slots [U], then each row padded with `null` [U * max_blocks]."""
        out = list(sent)
        for blocks in sent.values():
            out += blocks
            out += [self.null] * (self.max_blocks - len(blocks))
        return out

    def apply(self, values: torch.Tensor, sent: dict[int, tuple[int, ...]]) -> None:
        """Write the rows `sent` (values [U + U * max_blocks] on the device, as update_values lays them out) into
        the table; they are pending no more, unless assigned again since."""
        if not sent:
            return
        n = len(sent)
        self.tensor[values[:n]] = values[n:].view(n, self.max_blocks)
        for slot, blocks in sent.items():
            if self.pending.get(slot) is blocks:
                del self.pending[slot]

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """slots, positions [T] -> each token's flat cache row [T]."""
        bs = self.block_size
        return self.tensor[slots, positions // bs] * bs + positions % bs

    def read_index(self, slots: torch.Tensor | int, length: int) -> torch.Tensor:
        """The flat cache rows of positions [0, length) of one slot (an int: [1, L]) or of each of slots [B]
        ([B, L]); gathering them is the one copy a read makes."""
        nb = -(-length // self.block_size)
        blocks = self.tensor[slots, :nb][None] if isinstance(slots, int) else self.tensor[slots, :nb]  # [B, nb]
        return (blocks[:, :, None] * self.block_size + self.offsets).flatten(1)[:, :length]  # [B, L]
