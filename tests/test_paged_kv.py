"""The paged KV cache: blocks through a block table, a prompt's at admission, one more as a sequence grows (the newest
preempted where none is free), given back on every end;
outputs against transformers with blocks that cut chunks; the refusal of a request that can never fit."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.model.attention import KVCache
from elasticmoe.model.batch import build_batch
from elasticmoe.model.block_table import BlockTable
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from tests.controller_util import controller, model  # noqa: F401 - fixtures
from tests.test_families import assert_batched_chunks_match_transformers_alone, make_family_checkpoint
from tests.test_families_more import MORE_CASES
from tests.test_runner import NanDispatcher
from tests.test_runner_request_faults import zeroing_fails_once
from tests.test_step_host_copies import count_host_tensors

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. Experts and their layers", "Once upon a time", "Z"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("paged") / "mixtral", layers=2, experts=4)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(llm: LLM, dispatcher=None, **kw) -> Engine:
    return Engine(llm.files, dispatcher or LocalDispatcher(llm.store), max_model_len=128, tokenizer=llm.tokenizer,
                  **kw)


def test_the_pool_reserves_all_or_nothing_and_gives_back():
    pool = BlockPool(6, 4)
    assert pool.blocks_for(1) == 1 and pool.blocks_for(8) == 2 and pool.blocks_for(9) == 3
    assert pool.reserve("a", 4) and pool.blocks("a") == (0, 1, 2, 3) and pool.num_free == 2
    assert not pool.reserve("b", 3) and pool.blocks("b") == () and pool.num_free == 2  # nothing taken
    assert pool.reserve("a", 4) and pool.num_free == 2  # again: the same blocks (an admission completed)
    assert pool.reserve("b", 2) and pool.num_free == 0
    pool.transfer("b", ("held", 1))
    assert pool.release("b") == () and pool.blocks(("held", 1)) == (4, 5)
    with pytest.raises(ValueError, match="held"):
        pool.transfer("a", ("held", 1))
    assert pool.release("a") == (0, 1, 2, 3) and pool.release("a") == () and pool.num_free == 4
    assert pool.reserve("c", 3) and pool.blocks("c") == (0, 1, 2)  # the blocks given back last, in order
    pool.release(("held", 1))
    pool.release("c")
    assert sorted(pool.blocks(o) for o in "abc") == [(), (), ()] and pool.num_free == 6


def test_positions_go_through_the_block_table_in_the_steps_one_copy(monkeypatch):
    """A slot's blocks need not be contiguous: position p is row blocks[p // bs] * bs + p % bs, for the writes
    [T] and for the reads of a prefill chunk [1, L] and of a decode group [B, L] (the shorter row's positions past
    its blocks: the null block's rows, kept zero). The rows assigned since the last step go in its one copy."""
    table = BlockTable(num_slots=3, max_blocks=4, block_size=3, null=8, device=CPU)
    table.assign(1, (7, 2, 5))
    table.assign(2, (0,))
    made = count_host_tensors(monkeypatch)
    batch = build_batch([(1, 2, [11, 12, 13, 14, 15]), (2, 1, [16])], CPU, table)
    monkeypatch.undo()
    assert made == ["frombuffer"] and table.pending == {}
    assert batch.write_index.tolist() == [23, 6, 7, 8, 15, 1]
    assert batch.prefill_reads[0].tolist() == [[21, 22, 23, 6, 7, 8, 15]]
    assert table.tensor[1].tolist() == [7, 2, 5, 8] and table.tensor[2].tolist() == [0, 8, 8, 8]
    decode = build_batch([(1, 6, [17]), (2, 2, [18])], CPU, table)
    (group,) = decode.decode_groups
    assert group.slots.tolist() == [2, 1] and group.read.tolist() == [[0, 1, 2, 24, 25, 26, 24],
                                                                          [21, 22, 23, 6, 7, 8, 15]]
    with pytest.raises(ValueError, match="slot 2: positions up to 4 past the 3 its blocks hold"):
        build_batch([(2, 3, [19])], CPU, table)


# block sizes that cut the 7-token prefill chunks and the prompts; a cache too small for all four at once (the
# long prompt and max_tokens take 10 of its 15 blocks of 5, 16 of its 24 of 3): some wait, blocks are reused
FAMILIES = {"deepseek_v2": 5, "gpt_oss": 3, "gemma4_text": 5, "deepseek_v32": 3, "qwen3_next": 5}
CACHE_TOKENS = {5: 75, 3: 72}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_blocks_cutting_chunks_give_transformers_tokens(model_type, tmp_path):
    """MLA (deepseek_v2), sinks and sliding windows (gpt_oss), KV-shared layers (gemma4_text), the DSA indexer's
    keys (deepseek_v32), linear beside full attention (qwen3_next): four prompts batched in a cache too small for
    them all, prefilled in chunks of 7 across blocks of 3 or 5, each gets transformers' tokens for it alone."""
    path = make_family_checkpoint(model_type, tmp_path / model_type, case=MORE_CASES.get(model_type))
    bs = FAMILIES[model_type]
    llm = assert_batched_chunks_match_transformers_alone(path, PROMPTS, budget=7, max_tokens=10, kv_block_size=bs,
                                                         kv_cache_tokens=CACHE_TOKENS[bs])
    pool = llm.engine.scheduler.pool
    assert (pool.block_size, pool.num_blocks, pool.num_free) == (bs, CACHE_TOKENS[bs] // bs, CACHE_TOKENS[bs] // bs)
    cache = llm.engine.cache
    assert {t.shape[:2] for i in cache.owned for t in cache.layers[i]} == {(CACHE_TOKENS[bs] // bs + 1, bs)}  # + null


def test_admission_waits_for_blocks_and_proceeds_as_sequences_finish(llm):
    """A cache of 10 blocks of 4, prompts of 9-12 tokens (3 blocks each), room for 4 sequences: three are admitted
    (their prompts' 9 blocks), the fourth waits; each holds the blocks of its tokens, one more as they cross a
    boundary, and when r1's 13th token finds none free the newest, r2, is preempted: back to the front of the
    queue, before r3, and recomputed once r0 ended. All get their tokens alone; every block is free at the end."""
    prompts = [_ids(n, seed=n) for n in (9, 10, 11, 12)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 8, 8, 8)]
    engine = _engine(llm, max_num_seqs=4, kv_cache_tokens=40, kv_block_size=4)
    pool = engine.scheduler.pool
    seqs = [engine.add_request(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))]
    running, waiting = [], []
    while engine.has_work():
        engine.step()
        running.append([seqs.index(s) for s in engine.scheduler.running])
        waiting.append([seqs.index(s) for s in engine.scheduler.waiting])
        assert all(len(pool.blocks(s)) == pool.blocks_for(s.num_cached) for s in engine.scheduler.running)  # ran
        assert pool.num_free == 10 - sum(len(pool.blocks(s)) for s in engine.scheduler.running)
    assert running == [[0, 1, 2]] * 3 + [[1]] + [[1, 2]] * 3 + [[2]] + [[3]] * 7 + [[]]
    assert waiting == [[3]] * 3 + [[2, 3]] + [[3]] * 4 + [[]] * 8
    assert [s.preempted for s in seqs] == [0, 0, 1, 0] and engine.scheduler.preemptions == 1
    assert [s.output_ids for s in seqs] == [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, params)]
    assert [s.error for s in seqs] == [None] * 4 and pool.num_free == 10


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(llm, tiny):
    """prompt + max_tokens over limits.kv_cache_tokens (here under max_model_len): refused at once, naming
    max_tokens and the limit (HTTP 400 / INVALID_ARGUMENT), nothing queued; one that fits exactly runs; an unset
    max_tokens is cut to the room the cache leaves."""
    engine = _engine(llm, max_num_seqs=2, kv_cache_tokens=30, kv_block_size=4)
    with pytest.raises(InvalidRequest, match=r"prompt \(20\) \+ max_tokens \(11\) exceeds the KV cache's 30 tokens "
                                             r"\(limits.kv_cache_tokens\)") as e:
        engine.add_request("big", _ids(20, 1), SamplingParams(max_tokens=11))
    assert e.value.field == "max_tokens" and not engine.has_work() and engine.seqs == {}
    seq = engine.add_request("fits", _ids(20, 1), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert len(seq.output_ids) == 10 and seq.error is None
    assert engine.validator.default_max_tokens(20, 16) == 10 and engine.validator.default_max_tokens(20, 4) == 4
    small = LLM(str(tiny), kv_cache_tokens=24, max_model_len=64)
    with pytest.raises(InvalidRequest, match="limits.kv_cache_tokens"):
        small.generate([_ids(20, 2)], SamplingParams(max_tokens=5))
    assert len(small.generate([_ids(20, 2)])[0].token_ids) <= 4  # the default: within the cache's room


def test_the_refusal_is_an_http_400(llm, tiny):
    """Through the OpenAI door: the refusal is a 400 naming the limit; a request that fits is served."""
    from elasticmoe.gateway.openai_api import build_openai_app
    from tests.openai_util import Core, Server, post_json

    core = Core(str(tiny), llm.store, max_num_seqs=2, max_model_len=128, kv_cache_tokens=32)
    server = Server(build_openai_app(core))
    try:
        status, body = post_json(server.url + "/completions", {"model": "mixtral", "prompt": _ids(30, 3),
                                                                "max_tokens": 8})
        assert status == 400 and "limits.kv_cache_tokens" in body["error"]["message"], body
        status, body = post_json(server.url + "/completions", {"model": "mixtral", "prompt": _ids(20, 3),
                                                                "max_tokens": 8, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body
        assert core.runner.stats()["kv_blocks"] == 2 and core.runner.stats()["preemptions"] == 0
    finally:
        server.stop()
        core.runner.close()


def _blocks_zero(engine: Engine, blocks: tuple[int, ...]) -> bool:
    return all(not t[list(blocks)].any() for i in engine.cache.owned for t in engine.cache.layers[i])


def test_blocks_come_back_after_a_finish_an_abort_and_a_failed_step(llm):
    """Every end gives its blocks back: a request that finished, one aborted mid-decode and one queued behind it,
    and the requests a step failed (NaN experts: each row fails its own request); the aborted and failed ones'
    blocks are zeroed (a masked NaN would poison their next owner's sums)."""
    disp = NanDispatcher(llm.store)
    engine = _engine(llm, disp, max_num_seqs=4, kv_cache_tokens=64, kv_block_size=4)
    pool = engine.scheduler.pool
    done = engine.add_request("done", _ids(6, 1), GREEDY)
    while engine.has_work():
        engine.step()
    assert done.finish_reason == "length" and pool.num_free == 16
    a, b = (engine.add_request(r, _ids(20, k), GREEDY) for r, k in (("a", 2), ("b", 7)))  # 5 blocks each, then 6
    # (21 tokens; prompts of their own: one sharing a's would wait for a's prefill, prefix caching)
    queued = engine.add_request("queued", _ids(20, 3), GREEDY)  # 5 blocks: 4 left free
    engine.step()
    engine.step()
    taken = pool.blocks(a)
    assert len(taken) == 6 and pool.num_free == 4 and queued in engine.scheduler.waiting
    engine.abort("a")
    engine.abort("queued")
    assert pool.num_free == 10 and pool.blocks(a) == () and _blocks_zero(engine, taken)
    disp.poisoned = True
    c = engine.add_request("c", _ids(5, 4), GREEDY)
    engine.step()  # b's decode, c's prefill: NaN keys and values written, then both fail
    disp.poisoned = False
    assert b.error is not None and c.error is not None and not engine.has_work()
    rows = engine.cache.table.rows  # (a finished slot's row stays until the slot is given again)
    assert len(rows[b.slot]) == 6 and len(rows[c.slot]) == 2
    assert pool.num_free == 16 and _blocks_zero(engine, rows[b.slot] + rows[c.slot])


def test_a_held_slot_keeps_its_blocks_until_a_step_zeroes_them(llm):
    """An abort whose zeroing raised (a device error) holds its slot back, and its blocks with it: given to no one
    (not free) until the next step zeroes them; then all are free, and the next request gets its tokens alone."""
    engine = _engine(llm, max_num_seqs=2, kv_cache_tokens=32, kv_block_size=4)
    zeroed, pool = zeroing_fails_once(engine), engine.scheduler.pool
    seq = engine.add_request("a", _ids(10, 5), GREEDY)
    engine.step()
    blocks = pool.blocks(seq)
    engine.abort("a")
    assert list(engine.held_slots) == [seq.slot] == zeroed and pool.blocks(("held", seq.slot)) == blocks
    assert pool.num_free == 8 - len(blocks)
    after = engine.add_request("b", _ids(24, 6), GREEDY)  # needs every block: waits for the held ones
    while engine.has_work():
        engine.step()
    assert zeroed == [seq.slot, seq.slot] and engine.held_slots == {} and pool.num_free == 8
    assert after.output_ids == llm.generate([_ids(24, 6)], GREEDY)[0].token_ids


def test_the_cache_allocates_its_blocks_not_slots_times_context(llm):
    """kv_cache_tokens sizes the cache: 16 slots of 128 tokens with room for 64 tokens hold 4 blocks of 16 (and the
    null block), not 16 x 128 positions; unset, it is every slot's whole context, as before paging."""
    spec = llm.engine.spec
    small = _engine(llm, max_num_seqs=16, kv_cache_tokens=64)
    full = _engine(llm, max_num_seqs=16)
    held = {e: sum(t.numel() * t.element_size() for i in e.cache.owned for t in e.cache.layers[i])
            for e in (small, full)}
    per = KVCache.bytes_per_token(spec, torch.float32)
    assert held[small] == (4 + 1) * 16 * per == KVCache.nbytes(spec, torch.float32, 16, 4, 16)
    assert held[full] == (16 * 8 + 1) * 16 * per and full.scheduler.pool.num_blocks == 16 * 128 // 16


def test_a_cache_the_device_cannot_hold_is_refused_naming_the_fields():
    """make_cache compares the bytes with torch.cuda.mem_get_info on CUDA before allocating (check_fits), and
    refuses sizes that are not positive integers by name."""
    from elasticmoe.engine.kv_space import check_fits, num_blocks

    with pytest.raises(ValueError, match=r"the KV cache \(limits.kv_cache_tokens 262144 tokens\) needs 32.00 GiB "
                                         r"and the dense weights 0.00 GiB, 32.00 GiB in all, and the device has 20.00 "
                                         r"GiB free; lower limits.kv_cache_tokens"):
        check_fits(32 << 30, 20 << 30, "limits.kv_cache_tokens 262144 tokens")
    check_fits(20 << 30, 20 << 30, "fits")
    assert num_blocks(64, 4096, None, 16) == 64 * 256 and num_blocks(64, 4100, None, 16) == 64 * 257
    assert num_blocks(64, 4096, 65536, 16) == 4096 and num_blocks(64, 4096, 100, 16) == 7
    for kw, field in (({"kv_block_size": 0}, "kv_block_size"), ({"kv_cache_tokens": 0}, "kv_cache_tokens")):
        with pytest.raises(ValueError, match=f"{field}: must be a positive integer"):
            num_blocks(4, 128, kw.get("kv_cache_tokens"), kw.get("kv_block_size", 16))


def test_the_limits_reach_the_gateways_engine(controller):  # noqa: F811
    """limits.kv_cache_tokens and limits.kv_block_size (AppArgs) size a GatewayCore's cache: its stats count the
    blocks, and its validator refuses by the limit's name; unset, the cache is every slot's whole context.
    limits.prefix_caching (default on) reaches its engine."""
    from elasticmoe.config import Limits
    from elasticmoe.gateway.deployment import GatewayCore
    from tests.controller_util import _args, _LoopHandle

    ctrl, loop = controller
    limits = {"max_num_seqs": 4, "max_model_len": 64, "kv_cache_tokens": 50, "kv_block_size": 8,
              "prefix_caching": False}
    core = GatewayCore(_args(ctrl.args.model, num_shards=1, limits=limits), _LoopHandle(ctrl, loop))
    try:
        st = core.runner.stats()
        assert (st["kv_blocks"], st["kv_blocks_free"]) == (7, 7) and not core.runner.engine.prefix_caching
        with pytest.raises(InvalidRequest, match="limits.kv_cache_tokens"):
            core.runner.engine.validate(_ids(40, 1), SamplingParams(max_tokens=11))
    finally:
        core.close()
    assert Limits().kv_cache_tokens is None and Limits().kv_block_size == 16 and Limits().prefix_caching


def test_the_readme_figure_for_mixtral_8x7b(tmp_path):
    """README: "Mixtral-8x7B in bfloat16 takes 128 KiB of cache a token: 64 sequences x 4096 tokens are 32 GiB of
    gateway memory, `kv_cache_tokens: 65536` 8 GiB", from its config (transformers' MixtralConfig defaults are
    Mixtral-8x7B's: 32 layers, 8 KV heads of 128), by the cache's own count."""
    import json

    from transformers import MixtralConfig

    from elasticmoe.engine.kv_space import num_blocks
    from elasticmoe.model import read_spec
    from tests.doc_util import REPO

    readme = " ".join((REPO / "README.md").read_text().split())
    assert ("Mixtral-8x7B in bfloat16 takes 128 KiB of cache a token: 64 sequences x 4096 tokens are 32 GiB of gateway "
            "memory, `kv_cache_tokens: 65536` 8 GiB (16 whole contexts") in readme
    cfg = MixtralConfig()
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (32, 8, 128)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": ["MixtralForCausalLM"]}))
    spec, bf16 = read_spec(tmp_path), torch.bfloat16
    assert KVCache.bytes_per_token(spec, bf16) == 128 << 10
    full = KVCache.nbytes(spec, bf16, 64, num_blocks(64, 4096, None, 16), 16)
    assert full == (64 * 4096 + 16) * (128 << 10) and round(full / (1 << 30)) == 32
    assert round(KVCache.nbytes(spec, bf16, 64, num_blocks(64, 4096, 65536, 16), 16) / (1 << 30)) == 8
