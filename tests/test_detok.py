"""The incremental detokenizer against full decodes: random token sequences of real tokenizers (byte-level BPE,
SentencePiece-style with byte fallback), multi-byte text, stop strings across tokens; streamed == unary through
the engine; a bounded decode window per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.detok import STUCK_TOKENS, Detokenizer
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.model.tokenizer import CORPUS, make_tokenizer

TEXTS = ["Hello wörld 😀 中文字符 ünïcödé — “quotes” 🇫🇷 ok, the sea.",
         "The quick brown fox 🦊 jumps over 懒狗 the lazy dog. 👩‍👩‍👧 naïve café ½ ∑ ∞"]


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: Metaspace BPE with <0xXX> byte fallback and the leading space stripped on decode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    raw = json.loads(tok.to_str())["model"]
    vocab = dict(raw["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw["merges"]]
    out = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    out.add_special_tokens(["<unk>", "<s>", "</s>"])
    out.pre_tokenizer = pre_tokenizers.Metaspace()
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=out, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


TOKENIZERS = {"bytelevel512": lambda: make_tokenizer(512), "bytelevel300": lambda: make_tokenizer(300),
              "sentencepiece": _sentencepiece_like}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _sequences(tok, rng: random.Random, n: int) -> list[list[int]]:
    """Encoded multi-byte texts (some with a special token inside) and uniformly random ids (invalid UTF-8)."""
    out = []
    for i in range(n):
        if i % 2:
            out.append([rng.randrange(len(tok)) for _ in range(rng.randrange(1, 50))])
            continue
        ids = tok.encode(rng.choice(TEXTS) * rng.randrange(1, 3), add_special_tokens=False)
        if i % 4 == 0:
            ids.insert(rng.randrange(len(ids)), tok.eos_token_id)
        out.append(ids)
    return out


def _full(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def test_text_equals_a_full_decode_after_every_token(tok):
    rng = random.Random(0)
    for ids in _sequences(tok, rng, 120):
        d, streamed = Detokenizer(tok), ""
        for n in range(1, len(ids) + 1):
            d.update(ids[:n])
            streamed += d.delta()
            assert d.text == _full(tok, ids[:n]), (ids, n)
            assert _full(tok, ids[:n]).startswith(streamed)  # never taken back
        assert streamed + d.delta(final=True) == _full(tok, ids)


def test_special_tokens_kept_the_text_equals_a_full_decode_keeping_them(tok):
    """skip_special=False (vLLM's skip_special_tokens false): the text is decode(ids, skip_special_tokens=False)
    after every token, special tokens among the text included, and the deltas join to it."""
    rng = random.Random(4)
    for ids in _sequences(tok, rng, 60):
        ids = ids + [tok.eos_token_id] if tok.eos_token_id not in ids else ids
        d, streamed = Detokenizer(tok, skip_special=False), ""
        for n in range(1, len(ids) + 1):
            d.update(ids[:n])
            streamed += d.delta()
            assert d.text == tok.decode(ids[:n], skip_special_tokens=False), (ids, n)
        assert streamed + d.delta(final=True) == tok.decode(ids, skip_special_tokens=False) != _full(tok, ids)


def test_lazy_updates_many_tokens_at_once_give_the_same_text(tok):
    rng = random.Random(1)
    for ids in _sequences(tok, rng, 40):
        d, streamed, n = Detokenizer(tok), "", 0
        while n < len(ids):
            n = min(len(ids), n + rng.randrange(1, 9))
            d.update(ids[:n])
            streamed += d.delta()
        assert d.text == _full(tok, ids) and streamed + d.delta(final=True) == _full(tok, ids)


def _reference_stop(tok, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str]:
    """The engine's former rule: decode everything after each token; stop at the first token whose text holds a
    stop string, cut before its earliest occurrence."""
    for n in range(1, len(ids) + 1):
        text = _full(tok, ids[:n])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return n, text[: min(found)]
    return len(ids), _full(tok, ids)


def test_stop_strings_end_at_the_same_token_and_streamed_text_equals_unary(tok):
    rng = random.Random(2)
    for i, ids in enumerate(_sequences(tok, rng, 150)):
        full = _full(tok, ids)
        k = rng.randrange(1, 7)
        at = rng.randrange(max(1, len(full) - k))
        stops = (full[at:at + k], rng.choice(["zz", "🦊 j", "dog", "中文", " the", "\ufffd"]))
        d, streamed = Detokenizer(tok, stops), ""
        for n in range(1, len(ids) + 1):
            d.update(ids[:n])
            if d.stop_at is not None:
                break
            streamed += d.delta()
            assert not any(s in streamed for s in stops)  # nothing of a stop string is ever streamed
        ref_n, ref_text = _reference_stop(tok, ids, stops)
        assert (n, d.text) == (ref_n, ref_text), (stops, ids)
        assert streamed + d.delta(final=True) == ref_text


def test_text_before_min_tokens_is_not_searched():
    tok = make_tokenizer(512)
    ids = tok.encode("the sea is wide, the sea is deep", add_special_tokens=False)
    d = Detokenizer(tok, ("sea",))
    d.update(ids[:3], search=False)  # "the sea" came while under min_tokens
    for n in range(4, len(ids) + 1):
        d.update(ids[:n])
        if d.stop_at is not None:
            break
    assert d.text == "the sea is wide, the " and d.stop_at == len(d.text)


def test_a_completion_is_decoded_after_its_prompt_as_transformers_pipeline(tok):
    """With its prompt's last tokens as context, a completion's text (and its deltas joined) is transformers'
    text-generation pipeline's (and vLLM's): decode(prompt + completion) less decode(prompt); a Llama-style
    decoder's leading space is kept at the prompt's end, where a decode of the completion alone strips it."""
    from elasticmoe.engine.detok import prompt_context

    for text in [*TEXTS, "The capital of France is Paris, and the sea is wide."]:
        ids = tok.encode(text)
        for k in range(1, len(ids)):
            whole, before = _full(tok, ids), _full(tok, ids[:k])
            if not whole.startswith(before):  # the prompt ends inside a character: no reference text
                continue
            d, streamed = Detokenizer(tok, context=prompt_context(tok, ids[:k])), ""
            for n in range(k + 1, len(ids) + 1):
                d.update(ids[k:n])
                streamed += d.delta()
            assert d.text == whole[len(before):] == streamed + d.delta(final=True), (text, k)


def test_special_tokens_kept_a_completion_is_decoded_after_its_prompt_keeping_them(tok):
    """skip_special=False, special tokens in the prompt and in the completion: decode(prompt + completion) less
    decode(prompt), both keeping them; the context holds the prompt's special tokens too."""
    from elasticmoe.engine.detok import prompt_context

    full = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    checked = 0
    for text in [*TEXTS, "The capital of France is Paris, and the sea is wide."]:
        ids = tok.encode(text, add_special_tokens=False)
        ids[3:3] = [tok.eos_token_id]
        ids[-4:-4] = [tok.eos_token_id, tok.bos_token_id]
        for k in range(1, len(ids)):
            whole, before = full(ids), full(ids[:k])
            if not whole.startswith(before):  # the prompt ends inside a character: no reference text
                continue
            d, streamed = Detokenizer(tok, context=prompt_context(tok, ids[:k], False), skip_special=False), ""
            for n in range(k + 1, len(ids) + 1):
                d.update(ids[k:n])
                streamed += d.delta()
            assert d.text == whole[len(before):] == streamed + d.delta(final=True), (text, k)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("n_tokens", [1000, 4000])
def test_each_token_decodes_a_bounded_window(n_tokens):
    """Decode work per token does not grow with the output: 1k and 4k tokens of emoji / CJK / accents."""
    tok = make_tokenizer(512)
    ids = (tok.encode(" ".join(TEXTS) * 60, add_special_tokens=False) * 4)[:n_tokens]
    rng = random.Random(3)
    at = rng.randrange(n_tokens - 20)
    ids[at:at + 20] = [rng.randrange(len(tok)) for _ in range(20)]  # a patch of random ids (invalid UTF-8)
    d = Detokenizer(tok, ("never appears",))
    for n in range(1, n_tokens + 1):
        d.update(ids[:n])
        d.delta()
    assert d.text == _full(tok, ids)
    assert d.max_window <= STUCK_TOKENS + 4 and d.decoded_tokens <= 6 * n_tokens, (d.max_window, d.decoded_tokens)


# --- through the engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("dt") / "mixtral", layers=2, experts=4)))


async def _stream(runner: EngineRunner, ids: list[int], params: SamplingParams) -> tuple[str, str, list[int]]:
    text, tokens = "", []
    async for u in runner.generate("s", ids, params):
        text += u.delta
        tokens += u.token_ids
        last = u
    assert last.text == text  # the final update's whole text is the deltas joined
    return text, last.finish_reason, tokens


def test_engine_streamed_equals_unary_with_stop_strings(llm):
    """LLM.generate (unary) and the runner's deltas (what HTTP and gRPC stream) agree, and stop where the former
    full-decode rule stops, for greedy and sampled outputs of the tiny model (which emits partial UTF-8)."""
    prompts = [llm.encode(p) for p in ("The sea is", "中文 😀 Once upon")]
    free = [SamplingParams(max_tokens=32, temperature=t, seed=i, ignore_eos=True) for i in range(2) for t in (0, 1)]
    ids = [prompts[i] for i in range(2) for _ in (0, 1)]
    outs = llm.generate(ids, free)
    params = [dataclasses.replace(p, stop=(o.text[len(o.text) // 2:][:3], "\n\n\n\n")) for p, o in zip(free, outs)]
    unary = llm.generate(ids, params)  # before the runner owns the engine
    for o, p, u in zip(outs, params, unary):
        ref_n, ref_text = _reference_stop(llm.tokenizer, o.token_ids, p.stop)
        assert (u.token_ids, u.text, u.finish_reason) == (o.token_ids[:ref_n], ref_text, "stop")
    runner = EngineRunner(llm.engine)

    async def all_streams():
        return await asyncio.gather(*(_stream(runner, i, p) for i, p in zip(ids, params)))

    try:
        streamed = asyncio.run(all_streams())
    finally:
        runner.close()
    assert streamed == [(u.text, u.finish_reason, u.token_ids) for u in unary]


def test_grpc_stream_joined_equals_unary_generate(llm):
    """The gateway's own gRPC handlers (no Serve, no server): GenerateStream's text deltas joined equal Generate's
    text and LLM.generate's, with stop strings, for outputs full of partial UTF-8."""
    from elasticmoe.gateway.generation_service import GenerationService
    from elasticmoe.metrics import GatewayMetrics
    from elasticmoe.rpc import generation_pb2 as gen

    ids = llm.encode("中文 😀 The sea")
    free = [SamplingParams(max_tokens=20, temperature=t, seed=3, ignore_eos=True) for t in (0, 1)]
    outs = llm.generate([ids, ids], free)
    params = [dataclasses.replace(p, stop=(o.text[len(o.text) // 3:][:2],)) for p, o in zip(free, outs)]
    unary = llm.generate([ids, ids], params)
    spec = llm.files.spec
    core = type("Core", (), {})()
    core.runner, core.tokenizer = EngineRunner(llm.engine), llm.tokenizer
    core.metrics = GatewayMetrics("off", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers, use_ray=False)
    core.wait_ready = lambda: asyncio.sleep(0)
    service = GenerationService(core)

    async def both(p: SamplingParams) -> tuple[str, str]:
        req = gen.GenerateRequest(prompt_token_ids=ids, sampling=gen.SamplingParams(
            max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, ignore_eos=True, stop=list(p.stop)))
        whole = (await service.generate(req)).text
        return whole, "".join([r.text async for r in service.generate_stream(req)])

    try:
        got = [asyncio.run(both(p)) for p in params]
    finally:
        core.runner.close()
    assert got == [(u.text, u.text) for u in unary] and all(u.finish_reason == "stop" for u in unary)


def test_the_engine_decodes_a_completion_after_its_prompt(llm):
    """Through the engine with a Llama-style tokenizer: '▁P' three times after 'The capital of France is' is the
    completion ' P P P' (transformers' pipeline, vLLM), not 'P P P' (the completion decoded alone)."""
    from elasticmoe.engine.engine import Engine

    tok = _sentencepiece_like()
    engine = Engine(llm.files, llm.engine.dispatcher, tokenizer=tok)
    prompt, p = tok.encode("The capital of France is"), tok.convert_tokens_to_ids("\u2581P")
    seq = engine.add_request("a", prompt, SamplingParams(max_tokens=3, temperature=0, logit_bias={p: 100}))
    while engine.has_work():
        engine.step()
    assert seq.output_ids == [p] * 3
    assert seq.text == _full(tok, prompt + seq.output_ids)[len(_full(tok, prompt)):] == " P P P"
