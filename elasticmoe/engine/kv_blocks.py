"""The KV cache's block pool: free blocks, each owner's blocks, and the cached prompt blocks (prefix caching)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import islice

_NONE: frozenset = frozenset()


class BlockPool:
    """`num_blocks` blocks of `block_size` cached positions each. An owner reserves the blocks it needs now (a
    sequence: its prompt's, at admission) and `grow`s as it needs more (a token crossing a block boundary), keeping
    those it holds; `release` gives them back (the scheduler preempts a sequence when too few are free to grow).

    Prefix caching: a full block of prompt positions, once written, may be `register`ed under its key (the hash
    chain of the prompt's blocks up to it, prefix_cache.block_keys). A reservation given keys first takes the
    longest run of cached blocks under them (shared: a block counts its holders, and a shared block is never
    written), then fresh ones: free blocks first, then cached blocks no one holds, least recently released first
    (their keys forgotten). A cached block someone holds is never evicted; one no one holds counts as free.

    Every change (reserve, release, transfer) is planned first, then recorded in one assignment (`_pending`) and
    applied in steps that may be repeated: one cut short (Ctrl-C) is completed by the next call, whichever it is,
    and no block is lost or held twice meanwhile. Pure Python, no device."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs blocks of at least one position: {num_blocks} blocks of "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks - 1, -1, -1))  # taken from the end: 0 first
        self._lru: dict[int, None] = {}  # cached blocks no one holds, least recently released first
        self._holders: dict[int, frozenset] = {}  # block -> the owners holding it (its reference count: how many)
        self._owned: dict[Hashable, tuple[int, ...]] = {}
        self._hits: dict[Hashable, int] = {}  # owner -> its first blocks that were cached at its reservation
        self._key: dict[int, bytes] = {}  # a cached block -> its key
        self._cached: dict[bytes, int] = {}  # key -> the cached block
        self._pending: tuple | None = None  # a change planned and not yet wholly applied
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up in the cache, and those found there

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a reservation may take: free ones, and cached ones no one holds. (Read from any thread, as the
        gateway's stats do: it completes no change cut short, and one in progress may be half counted.)"""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a key (held or not)."""
        return len(self._key)

    def blocks(self, owner: Hashable) -> tuple[int, ...]:
        """The blocks `owner` holds, in position order (none: ())."""
        self._complete()
        return self._owned.get(owner, ())

    def hits(self, owner: Hashable) -> int:
        """How many of the first blocks of `owner` it found cached (shared; their positions are computed)."""
        self._complete()
        return self._hits.get(owner, 0)

    def refs(self, block: int) -> int:
        """How many owners hold `block`."""
        self._complete()
        return len(self._holders.get(block, _NONE))

    def reserve(self, owner: Hashable, n: int, keys: Sequence[bytes] = (), query: int = 0, spare: int = 0) -> bool:
        """Give `owner` n blocks, the first of them the cached blocks under `keys` as far as they are cached, unless
        too few are free, or fewer than `spare` would be left (then nothing changes): whether it holds them. An
        owner holding n already keeps them; one holding another number gets n instead (or, too few free, none).
        `query`: the prompt tokens this lookup is for, counted in queried_tokens (and the blocks found, in
        hit_tokens)."""
        self._complete()
        held = self._owned.get(owner)
        if held is not None and len(held) == n:
            return True
        if held is not None:
            self.release(owner)
        plan = self._plan(owner, n, keys, query, spare)
        if plan is None:
            return False
        self._pending = plan
        self._apply()
        return True

    def grow(self, owner: Hashable, n: int) -> bool:
        """Give `owner` blocks up to n in all, its own kept (in position order, fresh ones after them), unless too
        few are free (then nothing changes): whether it holds n (or more) now."""
        self._complete()
        held = self._owned.get(owner, ())
        if len(held) >= n:
            return True
        plan = self._plan(owner, n - len(held), (), 0)
        if plan is None:
            return False
        _, _, fresh, _, evict, stats = plan
        self._pending = "reserve", owner, held + fresh, self._hits.get(owner, 0), evict, stats
        self._apply()
        return True

    def release(self, owner: Hashable) -> tuple[int, ...]:
        """Free the blocks `owner` holds (none: nothing happens); returns them. A block others hold stays theirs; a
        cached one no one holds stays cached until a reservation needs it."""
        self._complete()
        blocks = self._owned.get(owner)
        if blocks is None:
            return ()
        self._pending = ("release", owner, blocks)
        self._apply()
        return blocks

    def transfer(self, owner: Hashable, to: Hashable) -> None:
        """The blocks of `owner` become those of `to` (who holds none): e.g. a slot held back as its sequence ends,
        whose blocks stay out of the pool until they are zeroed."""
        self._complete()
        blocks = self._owned.get(owner)
        if blocks is None:  # (none, or transferred already)
            return
        if to in self._owned:
            raise ValueError(f"{to!r} holds KV-cache blocks already")
        self._pending = ("transfer", owner, to, blocks, self._hits.get(owner, 0))
        self._apply()

    def register(self, owner: Hashable, keys: Sequence[bytes], start: int = 0) -> None:
        """The blocks of `owner` from index `start` on are written with the contents named by `keys` (one each):
        cache them. A block whose content another block caches already stays the owner's alone. A repeat, or one
        cut short and repeated, changes nothing more."""
        self._complete()
        blocks = self._owned.get(owner, ())
        for b, key in zip(blocks[start:], keys):
            if self._cached.get(key, b) != b or self._key.get(b, key) != key:
                continue  # the content cached in another block, or this block cached under another key
            self._key[b] = key  # first: a block named by _cached always has its key (an eviction forgets both)
            self._cached[key] = b

    def uncache_written(self, owner: Hashable) -> None:
        """Forget the keys of the blocks `owner` wrote itself (past its hits): its end was not clean (abort, a
        failure) and their contents are not to be shared from now on; holders they have keep them."""
        self._complete()
        blocks = self._owned.get(owner, ())[self._hits.get(owner, 0):]
        if any(b in self._key for b in blocks):
            self._pending = ("uncache", owner, blocks)
            self._apply()

    def to_zero(self, owner: Hashable, n: int) -> list[int]:
        """Of the first n blocks of `owner`, those it alone holds that are not cached: what zeroing its positions
        may clear (a cached block keeps its content for the next prompt that finds it; a shared one is others')."""
        self._complete()
        return [b for b in self._owned.get(owner, ())[:n] if self._holders.get(b) == {owner} and b not in self._key]

    # --- planning and applying a change --------------------------------------------------------------------------

    def _plan(self, owner: Hashable, n: int, keys: Sequence[bytes], query: int, spare: int = 0) -> tuple | None:
        """The reservation of n blocks for `owner` (the cached ones under `keys` first), or None: too few free (or
        fewer than `spare` left free after it)."""
        hit: list[int] = []
        for key in keys[:n]:
            b = self._cached.get(key)
            if b is None:
                break
            hit.append(b)
        need = n - len(hit)
        taken = need + sum(1 for b in hit if b in self._lru)  # a hit no one held leaves the free ones too
        if taken + spare > len(self._free) + len(self._lru):  # (at once: a sequence waiting asks every step)
            return None
        fresh = list(islice(reversed(self._free), need))  # the blocks released last come first
        evict: list[int] = []
        if len(fresh) < need:
            found = set(hit)
            for b in self._lru:  # least recently released first
                if len(fresh) + len(evict) == need:
                    break
                if b not in found:
                    evict.append(b)
            if len(fresh) + len(evict) < need:
                return None
        stats = (self.queried_tokens + query, self.hit_tokens + (len(hit) * self.block_size if query else 0))
        return "reserve", owner, tuple(hit + fresh + evict), len(hit), evict, stats

    def _complete(self) -> None:
        if self._pending is not None:
            self._apply()

    def _apply(self) -> None:
        """Apply `_pending`: every step may be repeated (a pass cut short is completed by the next)."""
        kind, owner, *rest = self._pending
        if kind == "reserve":
            blocks, hits, evict, stats = rest
            for b in evict:
                self._forget(b)
            for b in blocks:
                self._free.pop(b, None)
                self._lru.pop(b, None)
                self._holders[b] = self._holders.get(b, _NONE) | {owner}
            self._hits[owner], self._owned[owner] = hits, blocks
            self.queried_tokens, self.hit_tokens = stats
        elif kind == "release":
            for b in reversed(rest[0]):  # reserved again in the same order; the last blocks evicted first
                left = self._holders.get(b, _NONE) - {owner}
                if left:
                    self._holders[b] = left
                    continue
                (self._lru if b in self._key else self._free)[b] = None
                self._holders.pop(b, None)
            self._hits.pop(owner, None)
            self._owned.pop(owner, None)
        elif kind == "uncache":
            for b in rest[0]:
                self._forget(b)
        else:  # transfer
            to, blocks, hits = rest
            for b in blocks:
                self._holders[b] = self._holders.get(b, _NONE) - {owner} | {to}
            self._owned[to], self._hits[to] = blocks, hits
            self._owned.pop(owner, None)
            self._hits.pop(owner, None)
        self._pending = None

    def _forget(self, b: int) -> None:
        """Block b is cached no more (a no-one's block: free). May be repeated."""
        key = self._key.get(b)
        if key is not None and self._cached.get(key) == b:
            del self._cached[key]
        if b in self._lru:
            self._free[b] = None
            del self._lru[b]
        self._key.pop(b, None)
