"""Prefix caching: the block pool's shared and cached blocks (holders, LRU eviction), then engines with it on and
off giving the same tokens and logprobs (and transformers' tokens), fewer prefill tokens for a shared prefix, off
for a linear-attention family, and cached blocks evicted for a new request in a small cache. (Prompts waiting for a
prefix prefilled beside them: test_prefix_cache_waits.py; outputs' blocks: test_prefix_cache_outputs.py.)"""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.prefix_cache import block_keys
from elasticmoe.model.tiny import make_tiny_model
from tests.prefix_util import GREEDY, PROMPTS, SHARED, assert_transformers_alone, run, same
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

K = [bytes([i]) * 32 for i in range(8)]  # stand-in keys (the pool takes any bytes)


def test_blocks_found_cached_are_shared_and_counted():
    """b reserves under a's registered keys: it shares a's first blocks (two holders each) and gets fresh ones
    after; the lookup stops at the first key not cached; the stats count b's prompt tokens and those found."""
    pool = BlockPool(8, 4)
    assert pool.reserve("a", 3) and pool.blocks("a") == (0, 1, 2)
    pool.register("a", K[:2])  # a's first two blocks written
    assert pool.num_cached == 2
    assert pool.reserve("b", 4, [K[0], K[1], K[2]], query=13) and pool.blocks("b") == (0, 1, 3, 4)
    assert pool.hits("b") == 2 and [pool.refs(b) for b in range(5)] == [2, 2, 1, 1, 1]
    assert (pool.queried_tokens, pool.hit_tokens) == (13, 8) and pool.num_free == 3
    assert pool.reserve("c", 2, [K[5], K[1]], query=9) and pool.hits("c") == 0  # a chain broken at its first key
    assert pool.release("a") == (0, 1, 2) and [pool.refs(b) for b in range(3)] == [1, 1, 0]
    assert pool.release("a") == () and pool.num_free == 2  # again: nothing; a's unshared block is free
    pool.release("b")
    assert pool.num_free == 6 and pool.num_cached == 2  # b's blocks back; the cached ones stay cached, free


def test_cached_blocks_no_one_holds_are_evicted_least_recently_released_first():
    """Free blocks go first; then cached ones no one holds, the least recently released first (a prompt's last
    block before its first, so its chain keeps its start), their keys forgotten; a held cached block never."""
    pool = BlockPool(6, 4)
    for owner, keys in (("a", K[0:2]), ("b", K[2:4]), ("c", K[4:6])):
        assert pool.reserve(owner, 2)
        pool.register(owner, keys)
    assert pool.blocks("c") == (4, 5) and pool.num_free == 0
    pool.release("b")  # 2, 3 cached, released first
    pool.release("a")  # 0, 1
    assert not pool.reserve("d", 5) and pool.blocks("d") == ()  # c's cached blocks are held: 4 to take
    assert pool.reserve("d", 2) and pool.blocks("d") == (3, 2)  # b's (released first), its last block first
    assert pool.num_cached == 4  # a's and c's
    assert pool.reserve("e", 2, K[0:2]) and pool.hits("e") == 2 and pool.blocks("e") == (0, 1)
    assert not pool.reserve("f", 1, K[2:3])  # b's blocks went to d: nothing cached under b's keys, none free
    assert pool.refs(4) == pool.refs(5) == 1 and pool.num_free == 0
    pool.release("d")
    assert pool.reserve("f", 1, K[0:1]) and pool.blocks("f") == (0,) and pool.refs(0) == 2


def test_zeroing_spares_shared_and_cached_blocks_and_uncaches_what_an_aborted_owner_wrote():
    """An ending not clean (abort, failure) zeroes what its owner alone holds: its cached blocks found at admission
    stay cached and unzeroed; the blocks it wrote and cached are forgotten (not to be found again), and zeroed
    where no one else holds them."""
    pool = BlockPool(8, 4)
    assert pool.reserve("a", 2)
    pool.register("a", K[0:1])
    assert pool.reserve("b", 4, K[0:2]) and pool.blocks("b") == (0, 2, 3, 4)
    pool.register("b", K[1:3], start=1)  # b wrote 2 and 3
    assert pool.reserve("c", 3, K[0:3]) and pool.hits("c") == 3  # c shares 0, 2, 3
    pool.release("c")
    pool.uncache_written("b")
    assert pool.num_cached == 1 and pool.to_zero("b", 4) == [2, 3, 4]
    assert pool.reserve("d", 2, K[0:2]) and pool.hits("d") == 1  # K[1] is forgotten
    assert pool.to_zero("a", 2) == [1] and pool.to_zero("d", 2) == [pool.blocks("d")[1]]


def test_block_keys_name_the_whole_prefix():
    """Full blocks only; a block's key changes with any token before it, not after it."""
    ids = list(range(3, 14))  # 11 tokens: 2 full blocks of 4
    keys = block_keys(ids, 4)
    assert len(keys) == 2 and all(len(k) == 32 for k in keys) and block_keys(ids[:7], 4) == keys[:1]
    assert block_keys(ids[:8] + [99], 4) == keys
    other = block_keys([4] + ids[1:], 4)
    assert other[0] != keys[0] and other[1] != keys[1]
    assert block_keys(ids[4:8], 4)[0] != keys[1]  # the same tokens after another prefix


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {"mixtral": make_tiny_model("mixtral", root / "mixtral", layers=2, experts=4),
            "deepseek_v2": make_family_checkpoint("deepseek_v2", root / "deepseek_v2"),
            "qwen3_next": make_family_checkpoint("qwen3_next", root / "qwen3_next", case=MORE_CASES.get("qwen3_next"))}


@pytest.mark.parametrize("family, bs", [("mixtral", 4), ("deepseek_v2", 5)])
def test_cached_prefixes_give_the_tokens_of_an_engine_without_them(checkpoints, family, bs):
    """A plain and an MLA family, blocks of 4 or 5: prompts sharing a 20-29 token prefix, in one call (a step
    budget of 16: the first prompt's prefill spans two steps, the others are admitted after it drew) and one after
    another, with prefix caching on and off: the same tokens (transformers' for each prompt alone) and logprobs;
    on, each later prompt runs only what its cached whole blocks (all but its last token at most) do not hold."""
    path, kw = checkpoints[family], dict(kv_block_size=bs, max_num_batched_tokens=16, max_model_len=64)
    off, ran_off = run(LLM(str(path), prefix_caching=False, **kw), PROMPTS, together=True)
    assert_transformers_alone(path, PROMPTS, off)
    assert [ran_off[o.request_id] for o in off] == [len(p) + 5 for p in PROMPTS]
    for together in (True, False):
        llm = LLM(str(path), **kw)
        on, ran = run(llm, PROMPTS, together)
        same(on, off)
        full = (len(SHARED) - 1) // bs * bs  # the cached positions a later prompt found (all within SHARED)
        hits = [0] + [min(full, (len(p) - 1) // bs * bs) for p in PROMPTS[1:]]
        assert [ran[o.request_id] for o in on] == [len(p) - h + 5 for p, h in zip(PROMPTS, hits)]
        pool = llm.engine.scheduler.pool
        assert (pool.queried_tokens, pool.hit_tokens) == (sum(map(len, PROMPTS)), sum(hits)), together
        assert pool.num_free == pool.num_blocks and pool.num_cached > 0


def test_a_linear_attention_family_has_it_off_and_matches_transformers(checkpoints):
    """Qwen3-Next (Gated DeltaNet layers: a recurrent state per slot): prefix caching stays off, asked for or not;
    prompts sharing a prefix, one after another, each get transformers' tokens and run whole."""
    path = checkpoints["qwen3_next"]
    llm = LLM(str(path), kv_block_size=4, max_num_batched_tokens=16, max_model_len=64)
    assert not llm.engine.prefix_caching
    outs, ran = run(llm, PROMPTS, together=False)
    assert_transformers_alone(path, PROMPTS, outs)
    assert [ran[o.request_id] for o in outs] == [len(p) + 5 for p in PROMPTS]
    pool = llm.engine.scheduler.pool
    assert (pool.queried_tokens, pool.hit_tokens, pool.num_cached) == (0, 0, 0)


def test_a_small_cache_evicts_cached_blocks_for_a_new_request(checkpoints):
    """A cache of 16 blocks of 4: the first prompt's 9 cached blocks (8 of its prompt, 1 of prompt and outputs) stay
    (no one holds them) until a prompt of another prefix needs 14 blocks: some are evicted (the prefix's last blocks
    first), its tokens are exact, and the first prompt again finds only the blocks left (its start), its tokens exact
    too."""
    path = checkpoints["mixtral"]
    kw = dict(kv_block_size=4, kv_cache_tokens=64, max_model_len=64)
    llm, off = LLM(str(path), **kw), LLM(str(path), prefix_caching=False, **kw)
    other = torch.randint(3, 400, (50,), generator=torch.Generator().manual_seed(8)).tolist()
    pool = llm.engine.scheduler.pool
    first, _ = run(llm, [PROMPTS[0]], together=False)
    assert pool.num_cached == 9 and pool.num_free == 16
    second, _ = run(llm, [other], together=False)  # 50 + 6 tokens: 14 blocks, 7 of them free: 7 evicted
    assert pool.num_cached == 2 + 13  # the first prompt's first two blocks, and the other's 13 (55 positions)
    again, ran = run(llm, [PROMPTS[0]], together=False)
    assert ran[again[0].request_id] == 32 - 8 + 5 and pool.hit_tokens == 8
    same(first + second + again, run(off, [PROMPTS[0], other, PROMPTS[0]], together=False)[0])


def test_an_abort_or_a_failure_leaves_the_cache_exact(checkpoints):
    """b finds a's first 6 blocks cached (of a's 9: its prompt's 8, and one of prompt and outputs) and writes (and
    caches) 4 of its own; aborted, its own are uncached and
    zeroed, a's stay cached and intact. c fails on a numerical fault (NaN experts) before its first token: nothing
    of it is cached. b's prompt then runs again from a's 6 blocks and gets an uncached engine's tokens."""
    from elasticmoe.engine.engine import Engine
    from tests.test_runner import NanDispatcher

    path = checkpoints["mixtral"]
    off = LLM(str(path), prefix_caching=False, kv_block_size=4, max_model_len=64)
    disp = NanDispatcher(off.store)
    engine = Engine(off.files, disp, max_model_len=64, tokenizer=off.tokenizer, kv_block_size=4)
    pool, cache = engine.scheduler.pool, engine.cache
    nonzero = lambda blocks: all(cache.layers[i][0][k].abs().sum() > 0 for i in cache.owned for k in blocks)  # noqa
    tail = torch.randint(3, 400, (16,), generator=torch.Generator().manual_seed(9)).tolist()
    b_prompt = SHARED[:24] + tail  # 40 tokens: a's first 6 blocks, then 4 of its own
    a = engine.add_request("a", PROMPTS[0], GREEDY)
    while engine.has_work():
        engine.step()
    assert pool.num_cached == 9
    b = engine.add_request("b", b_prompt, GREEDY)
    engine.step()
    assert pool.hits(b) == 6 and pool.num_cached == 13 and b.output_ids
    shared, own = pool.blocks(b)[:6], pool.blocks(b)[6:10]
    engine.abort("b")
    assert pool.num_cached == 9 and nonzero(shared) and not any(cache.layers[i][0][k].any() for i in cache.owned
                                                                 for k in own)
    disp.poisoned = True
    c = engine.add_request("c", SHARED[:24] + tail[:8] + [5] * 8, GREEDY)
    engine.step()
    disp.poisoned = False
    assert c.error is not None and pool.num_cached == 9 and nonzero(shared)
    again = engine.add_request("again", b_prompt, GREEDY)
    while engine.has_work():
        engine.step()
    assert pool.hit_tokens == 24 + 24 + 24 and a.error is None
    (want,) = off.generate([b_prompt], GREEDY)
    assert again.output_ids == want.token_ids and again.error is None
    assert max(abs(p.logprob - q.logprob) for p, q in zip(again.logprobs, want.logprobs)) < 1e-4
