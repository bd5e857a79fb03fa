"""What an engine step sends from the host to the device: its index tensors in one copy, the sampler's in one read."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

import elasticmoe.kernels
import elasticmoe.model.batch as batch_mod
from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.sampling import sample
from elasticmoe.model.batch import SeqChunk, build_batch, group_decodes

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def count_host_tensors(monkeypatch) -> list[str]:
    """Every tensor built from host data (torch.tensor / as_tensor / frombuffer) outside elasticmoe/kernels (the CPU
    expert kernels' own host-side arguments, never sent to a device), by name: on CUDA each one the dense half or
    the engine sends to the device is a copy, a host sync unless pinned and non-blocking."""
    made: list[str] = []
    kernels = str(Path(elasticmoe.kernels.__file__).parent)

    def counted(name, real):
        def build(*a, **k):
            if not sys._getframe(1).f_code.co_filename.startswith(kernels):
                made.append(name)
            return real(*a, **k)
        return build

    for name in ("tensor", "as_tensor", "frombuffer"):
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    return made


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_a_decode_step_sends_its_indices_in_one_copy(tiny_models, monkeypatch):
    """16 decodes in 4 groups: the step built 4 + 3 x 4 index tensors from host lists and one more for the rows
    to sample (on CUDA 17 copies, each waiting for the device's queued work); now one, sliced into views."""
    monkeypatch.setattr(batch_mod, "DECODE_GROUP_MIN", 1)
    llm = LLM(str(tiny_models["mixtral"]), max_num_seqs=16)
    engine = llm.engine
    prompts = _prompts(engine.spec.vocab_size, [1, 2, 3, 4, 6, 7, 9, 12, 14, 17, 21, 25, 30, 34, 40, 45])
    seqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    engine.step()  # the prefills
    decodes = [SeqChunk(s.slot, s.num_cached, 1, i) for i, s in enumerate(engine.scheduler.running)]
    assert len(decodes) == 16 and len(group_decodes(decodes)) == 4
    made = count_host_tensors(monkeypatch)
    assert len(engine.step()) == 16
    assert made == ["frombuffer"]
    monkeypatch.undo()
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_a_partial_prefill_step_sends_the_rows_to_sample_in_one_more_copy(tiny_models, monkeypatch):
    """A step with a prefill chunk short of its prompt's end samples only the other rows: their index is one copy
    more (none where every row samples, as above); 8 before."""
    llm = LLM(str(tiny_models["mixtral"]), max_num_seqs=4, max_num_batched_tokens=8)
    engine = llm.engine
    a, b = _prompts(engine.spec.vocab_size, [3, 20], seed=1)
    engine.add_request("a", a, GREEDY)
    engine.step()
    engine.add_request("b", b, GREEDY)
    made = count_host_tensors(monkeypatch)
    assert [s.request_id for s in engine.step()] == ["a"]  # b's first 7 tokens ran beside a's decode
    assert made == ["frombuffer", "frombuffer"]


def test_micro_batches_share_one_copy_and_equal_their_own_batches():
    """build_batches: every part's tensors are views of one copy, equal to the part's own build_batch."""
    from elasticmoe.model.batch import build_batches  # new with it
    from elasticmoe.model.block_table import BlockTable

    parts = [[(0, 0, [5, 6, 7]), (1, 40, [8])], [(2, 700, [9]), (3, 3, [1]), (4, 0, [2, 3])], []]
    table = BlockTable(5, 44, 16, 5 * 44, torch.device("cpu"), static=True)  # 5 slots of 704 positions
    with pytest.MonkeyPatch.context() as mp:
        made = count_host_tensors(mp)
        got = build_batches(parts, torch.device("cpu"), table)
    assert made == ["frombuffer"]
    for part, b in zip(parts, got):
        want = build_batch(part, torch.device("cpu"), table)
        assert (b.chunks, b.prefill) == (want.chunks, want.prefill) and len(b.decode_groups) == len(want.decode_groups)
        for name in ("token_ids", "positions", "token_slots", "last_rows", "write_index"):
            assert getattr(b, name).tolist() == getattr(want, name).tolist(), name
        for g, w in zip(b.decode_groups, want.decode_groups):
            assert (g.rows.tolist(), g.slots.tolist(), g.lens.tolist(), g.max_len, g.read.tolist()) == \
                (w.rows.tolist(), w.slots.tolist(), w.lens.tolist(), w.max_len, w.read.tolist())
        assert [r.tolist() for r in b.prefill_reads] == [r.tolist() for r in want.prefill_reads]
    assert got[0].token_ids.tolist() == [5, 6, 7, 8] and got[0].positions.tolist() == [0, 1, 2, 40]
    assert [g.lens.tolist() for g in got[1].decode_groups] == [[4], [701]] and got[1].last_rows.tolist() == [0, 1, 3]


def test_sampling_greedy_rows_reads_the_device_once(monkeypatch):
    """The greedy tokens and the rows that are not finite came to the host in two reads (each a host sync on
    CUDA); now one."""
    logits = torch.randn(5, 32)
    logits[3, 7] = float("nan")
    reads: list[int] = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    tokens, _, errors = sample(logits, [GREEDY] * 5, [None] * 5)
    monkeypatch.undo()
    assert len(reads) == 1
    want = logits.argmax(-1).tolist()
    assert tokens == [t if i != 3 else None for i, t in enumerate(want)]
    assert [e is not None for e in errors] == [False, False, False, True, False]
