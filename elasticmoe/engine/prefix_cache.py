"""Prefix caching's keys: a sequence's full blocks named by a hash chain, and which models it is exact for."""

from __future__ import annotations

import hashlib
import logging
from array import array

from elasticmoe.model.spec import ModelSpec

log = logging.getLogger("elasticmoe.engine.engine")  # the engine's: its lines under one name


def block_keys(token_ids: list[int], block_size: int, prev: bytes = b"") -> list[bytes]:
    """The key of each full block of `token_ids`: SHA-256 of the previous block's key and this block's ids, so a
    key names the whole prefix up to its block's end (a cryptographic hash: a crafted prompt cannot take another's
    cached blocks, as it could with Python's hash). [len(token_ids) // block_size] keys of 32 bytes. `prev`: the
    key of the block before token_ids[0] (the chain continued over a sequence's later tokens), none at its start."""
    keys = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.sha256(prev)
        h.update(array("q", token_ids[start:start + block_size]).tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def exact_for(spec: ModelSpec, name: str) -> bool:
    """Whether cached blocks give the model (`name`, logged where not) the exact state of their positions. Not
    where a linear-attention layer (Gated DeltaNet) keeps a recurrent state per slot, not per position: a prompt
    sharing cached blocks would start its state from zeros past them."""
    if spec.linear is not None and any(spec.linear.layers):
        log.info("prefix caching is off for %s: its linear-attention layers keep a recurrent state per sequence, "
                 "not per position", name)
        return False
    return True
