"""The KV cache's block pool: a free list, and the blocks each owner (a sequence, a slot held back) reserved."""

from __future__ import annotations

from collections.abc import Hashable


class BlockPool:
    """`num_blocks` blocks of `block_size` cached positions each. An owner reserves at once every block it will
    need (a sequence: its prompt and max_tokens), so a running sequence never waits for one and none is preempted;
    `release` gives them back. reserve and release are idempotent: an admission or an end cut short (Ctrl-C) is
    completed by doing it again, and none of its blocks is lost or shared meanwhile. Pure Python, no device."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs blocks of at least one position: {num_blocks} blocks of "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # taken from the end: block 0 first
        self._owned: dict[Hashable, tuple[int, ...]] = {}

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks(self, owner: Hashable) -> tuple[int, ...]:
        """The blocks `owner` holds, in position order (none: ())."""
        return self._owned.get(owner, ())

    def reserve(self, owner: Hashable, n: int) -> bool:
        """Give `owner` n blocks, unless fewer are free (then nothing changes): whether it holds them. An owner
        holding n already keeps them; one holding another number gets n instead."""
        held = self._owned.get(owner)
        if held is not None and len(held) == n:
            return True
        if n > len(self._free) + len(held or ()):
            return False
        self.release(owner)
        cut = len(self._free) - n
        self._owned[owner] = tuple(reversed(self._free[cut:]))  # the blocks released last come first
        del self._free[cut:]
        return True

    def release(self, owner: Hashable) -> tuple[int, ...]:
        """Free the blocks `owner` holds (none: nothing happens); returns them."""
        blocks = self._owned.pop(owner, ())
        self._free.extend(reversed(blocks))  # reserved again in the same order
        return blocks

    def transfer(self, owner: Hashable, to: Hashable) -> None:
        """The blocks of `owner` become those of `to` (who holds none): e.g. a slot held back as its sequence ends,
        whose blocks stay out of the pool until they are zeroed."""
        if to in self._owned:
            raise ValueError(f"{to!r} holds KV-cache blocks already")
        blocks = self._owned.pop(owner, None)
        if blocks is not None:
            self._owned[to] = blocks
