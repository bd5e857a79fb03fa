"""Ctrl-C at every bytecode of the scheduler's slot bookkeeping (schedule, finish) and of the engine's freeing of slots
held back (Endings.zero_held): no KV slot or block lost or shared."""

from __future__ import annotations

import sys

import pytest

from elasticmoe import LLM
from elasticmoe.engine import scheduler as scheduler_module
from elasticmoe.engine.endings import Endings
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.sampling import SamplingParams
from elasticmoe.engine.scheduler import Scheduler, Sequence, Status
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from tests.test_runner_request_faults import zeroing_fails_once

SLOTS = 3
BLOCKS = 2 * SLOTS  # of 4 positions: a sequence's prompt takes 1, with 4 tokens drawn 2 (5 drawn: 3, preempting)
CODES = {f.__code__ for f in vars(Scheduler).values() if callable(f) and getattr(f, "__module__", "") ==
         scheduler_module.__name__}


def _interrupt_at(k: int, call, codes: set = CODES) -> bool:
    """Run call() raising KeyboardInterrupt before the k-th bytecode run in a method of `codes` (the Scheduler's);
    whether it was."""
    seen = [0]

    def opcode(frame, event, arg):
        if event == "opcode":
            seen[0] += 1
            if seen[0] == k:
                raise KeyboardInterrupt
        return opcode

    def calls(frame, event, arg):
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        return opcode

    sys.settrace(calls)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


def _scheduler(admitted: int, drawn: int = 0, prompts: list | None = None, prep=None
               ) -> tuple[Scheduler, list[Sequence]]:
    """SLOTS slots, blocks for as many sequences of 8 tokens, five queued sequences, the first `admitted` of them
    running, each with `drawn` tokens drawn (due a decode: its next step may need more blocks than are free).
    `prompts`: theirs, with prefix caching (else [1, 2, 3, 4] each, without); `prep(sched, seqs)` then."""
    sched = Scheduler(max_num_seqs=SLOTS, max_num_batched_tokens=4 * admitted, max_queue=8, pool=BlockPool(BLOCKS, 4),
                      prefix_caching=prompts is not None)
    prompts = prompts or [[1, 2, 3, 4]] * 5
    seqs = [Sequence(f"r{i}", list(p), SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    if admitted:
        assert len(sched.schedule()) == admitted
    for s in sched.running:
        s.output_ids += [5] * drawn
        s.num_cached = s.num_tokens - 1
    sched.max_tokens = 64
    if prep is not None:
        prep(sched, seqs)
    return sched, seqs


def _step(sched: Scheduler) -> None:
    """One engine step: the work counted run; a sequence whose last token ran has its blocks cached and draws."""
    for s, n in sched.schedule():
        s.num_cached += n
        if s.num_cached == s.num_tokens:
            sched.written(s)
            s.output_ids.append(100 + len(s.output_ids))


def _preempted_then_room(sched: Scheduler, seqs: list[Sequence]) -> None:
    """Steps until r2, the newest, is preempted (at its 5th token: its one block, of its prompt and 3 outputs, cached
    and kept), then r0 ends: the next step admits r2 again onto that block. Cached: r0's 3 blocks, r1's and r2's."""
    while not sched.preemptions:
        _step(sched)
    sched.finish(seqs[0], "length")
    assert list(sched.waiting)[:1] == [seqs[2]] and seqs[2].num_tokens == 5 and sched.pool.num_cached == 5


OWN = [list(range(10, 18)), [20], [30], [40], [50]]  # prompts of their own (none shares a block); r0: 2 blocks
PASSING = [list(range(10, 19))] * 2 + [[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53]]  # r1 waits for r0


def _check_owners(sched: Scheduler, lost_ok: frozenset = frozenset(), cut: tuple = ()) -> None:
    """Each slot free or held by one running sequence (or, only where said, by none yet); none waits and runs.
    Each block free or reserved by one running sequence (or by a sequence whose finish was `cut` short)."""
    held = [s.slot for s in sched.running]
    assert all(s.status is Status.RUNNING for s in sched.running)
    assert not set(map(id, sched.running)) & set(map(id, sched.waiting))
    assert len(held + sched.free_slots) == len(set(held + sched.free_slots)), (held, sched.free_slots)
    assert set(range(SLOTS)) - set(held) - set(sched.free_slots) <= lost_ok
    pool = sched.pool
    assert all(len(pool.blocks(s)) == pool.blocks_for(s.num_tokens) for s in sched.running)
    assert all(s.status is Status.WAITING and not pool.blocks(s) for s in sched.waiting)
    owned = [b for s in [*sched.running, *(s for s in cut if s not in sched.running)] for b in pool.blocks(s)]
    assert len(owned) == len(set(owned)) and len(owned) + pool.num_free == BLOCKS, (owned, pool.num_free)


CASES = {  # name: (sequences running before, the interrupted call[, tokens each has drawn before, their prompts
    # (prefix caching), what is done first])
    "schedule admits three": (0, lambda sched, seqs: sched.schedule()),
    "schedule preempts the newest": (3, lambda sched, seqs: sched.schedule(), 5),
    "schedule admits one more": (2, lambda sched, seqs: sched.schedule()),
    "finish a running one": (3, lambda sched, seqs: sched.finish(seqs[1], "stop")),
    "finish the last admitted": (3, lambda sched, seqs: sched.finish(seqs[2], "stop")),
    "finish a waiting one": (3, lambda sched, seqs: sched.finish(seqs[4], "abort")),
    "schedule admits a preempted one onto its cached blocks": (3, lambda sched, seqs: sched.schedule(), 0, OWN,
                                                               _preempted_then_room),
    "schedule admits two from behind one waiting for its prefix": (1, lambda sched, seqs: sched.schedule(), 0,
                                                                    PASSING),
}


def _each_interrupt(case: str):
    """(scheduler, its sequences, k) after CASES[case]'s call cut short at its k-th bytecode, for every k; the
    call then ran whole, past more than 20 of them."""
    admitted, call, *rest = CASES[case]
    k = 0
    while True:
        k += 1
        sched, seqs = _scheduler(admitted, *rest)
        if not _interrupt_at(k, lambda: call(sched, seqs)):
            break
        yield sched, seqs, k
    assert k > 20, k


@pytest.mark.parametrize("case", CASES)
def test_an_interrupt_anywhere_then_aborting_all_frees_every_slot(case):
    """As LLM.generate on Ctrl-C: every request of the call is aborted (Scheduler.finish); every slot is free."""
    for sched, seqs, k in _each_interrupt(case):
        for s in seqs:
            sched.finish(s, "abort")
        assert sorted(sched.free_slots) == list(range(SLOTS)), (case, k, sched.free_slots)
        assert not sched.running and not sched.waiting and all(s.finished for s in seqs), (case, k)
        assert sched.pool.num_free == BLOCKS, (case, k)


@pytest.mark.parametrize("case", CASES)
def test_an_interrupt_anywhere_then_carrying_on_shares_no_slot(case):
    """An interrupted call, then the engine carries on (schedule, finish): no slot is ever held twice or lost;
    one interrupted finish holds its slot back (from everyone) until that sequence is finished again. An
    interrupted schedule loses no sequence: every one runs, and ends."""
    for sched, seqs, k in _each_interrupt(case):
        cut_seqs = tuple(s for s in seqs if s.status is Status.RUNNING and s not in sched.running)
        cut = frozenset(s.slot for s in cut_seqs)
        sched.schedule()
        _check_owners(sched, lost_ok=cut if "finish" in case else frozenset(), cut=cut_seqs)
        while sched.running:  # the rest run to the end, one at a time, and the queue drains into the slots
            sched.finish(sched.running[0], "length")
            sched.schedule()
            _check_owners(sched, lost_ok=cut if "finish" in case else frozenset(), cut=cut_seqs)
        if "finish" not in case:  # (a finish cut short leaves its sequence to be finished again)
            assert not sched.waiting and all(s.finished for s in seqs), (case, k)
        for s in seqs:
            sched.finish(s, "abort")
        assert sorted(sched.free_slots) == list(range(SLOTS)), (case, k, sched.free_slots)
        assert sched.pool.num_free == BLOCKS, (case, k)


def test_an_interrupt_anywhere_in_freeing_a_held_slot_loses_neither_it_nor_its_blocks(tmp_path):
    """A slot whose zeroing raised is held back, with its blocks, until the next step zeroes and frees it
    (Endings.zero_held). A Ctrl-C there after it was unlisted left it neither free nor held, or its blocks owned by
    a held slot no one would free: lost for good. Now, cut anywhere, each slot is free or held and each block free
    or held, and the next step completes the freeing."""
    llm = LLM(str(make_tiny_model("mixtral", tmp_path / "mixtral", layers=2, experts=4)))
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_num_seqs=SLOTS, max_model_len=32, kv_cache_tokens=32,
                    kv_block_size=4, tokenizer=llm.tokenizer)
    sched, pool, real, k = engine.scheduler, engine.scheduler.pool, engine.cache.clear, 0
    while True:
        k += 1
        engine.cache.clear = real
        zeroed = zeroing_fails_once(engine)
        engine.logits(list(range(10, 30)))  # its slot's zeroing raises: held back with its 5 blocks
        assert list(engine.held_slots) == zeroed and pool.num_free == 8 - 5
        cut = _interrupt_at(k, engine.endings.zero_held, {f.__code__ for f in vars(Endings).values() if callable(f)})
        held = engine.held_slots
        assert sorted(set(sched.free_slots) | set(held)) == list(range(SLOTS)), (k, sched.free_slots, held)
        assert len(sched.free_slots) == len(set(sched.free_slots)), (k, sched.free_slots)
        assert pool.num_free + sum(len(pool.blocks(("held", s))) for s in held) == 8, (k, pool.num_free, held)
        assert engine.step() == []  # no work: the step frees what is held
        assert held == {} and sorted(sched.free_slots) == list(range(SLOTS)) and pool.num_free == 8, k
        if not cut:
            break
    assert k > 20, k


def test_a_ctrl_c_before_the_steps_table_assignment_zeroes_no_one_elses_blocks(tmp_path):
    """A Ctrl-C after the scheduler admitted d (slot 1) and before the step assigned d's blocks to slot 1 left the
    slot's row naming its last owner's blocks, now b's (slot 0); aborting d then zeroed b's prompt through that row.
    Now an ending zeroes the blocks the pool has for its owner, and each step assigns every running row."""
    llm = LLM(str(make_tiny_model("mixtral", tmp_path / "mixtral", layers=2, experts=4)))
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_num_seqs=2, max_model_len=32, kv_cache_tokens=32,
                    kv_block_size=4, tokenizer=llm.tokenizer, prefix_caching=False)  # blocks in release order
    pool, greedy = engine.scheduler.pool, lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    a = engine.add_request("a", list(range(10, 12)), greedy(2))  # slot 0, 1 block
    c = engine.add_request("c", list(range(20, 26)), greedy(1))  # slot 1, 2 blocks; ends first
    while engine.has_work():
        engine.step()
    stale = engine.cache.table.rows[c.slot]
    b_prompt = list(range(30, 40))
    b = engine.add_request("b", b_prompt, greedy(2))  # a's slot; a's block, then c's two
    engine.step()
    assert b.slot == a.slot != c.slot and pool.blocks(b)[1:] == stale
    real = engine.scheduler.schedule

    def then_ctrl_c(*args):
        real(*args)
        raise KeyboardInterrupt
    engine.scheduler.schedule = then_ctrl_c
    d = engine.add_request("d", list(range(50, 55)), greedy(3))
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    engine.scheduler.schedule = real
    assert d.slot == c.slot and engine.cache.table.rows[d.slot] == stale
    engine.abort("d")
    cache = engine.cache
    assert all(cache.layers[i][0][k].abs().sum() > 0 for i in cache.owned for k in pool.blocks(b))
    while engine.has_work():
        engine.step()
    assert b.output_ids == llm.generate([b_prompt], greedy(2))[0].token_ids
