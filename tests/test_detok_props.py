"""Property-based tests (hypothesis) of the incremental detokenizer against transformers' full decode: random ids
of five offline tokenizers (partial UTF-8, byte fallback, special / added / blank / empty tokens), random stop-string
sets, updates one token or many at a time, min_tokens, a prompt's context and byte-fallback runs longer than
BYTE_RUN_TOKENS (their one documented exception encoded: see _renders)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from elasticmoe.engine.detok import BYTE_RUN_TOKENS, Detokenizer, prompt_context, token_sets
from elasticmoe.model.tokenizer import CORPUS, make_tokenizer

PROPS = settings(max_examples=int(os.environ.get("ELASTICMOE_DETOK_EXAMPLES", "100")), deadline=None,
                 derandomize=os.environ.get("ELASTICMOE_FUZZ_RANDOM") != "1", database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])
MULTI = "Hello wörld 😀 中文字符 ünïcödé — “quotes” 🇫🇷 👩‍👩‍👧 naïve café ½ ∑ ∞ 懒狗 ok.\n\tThe sea  is."
ALPHABET = sorted(set(MULTI + "abc ,.!?\n\ufffd€𝄞éÃ©"))
LINES = CORPUS.splitlines(keepends=True) + [MULTI]
ADDED = ["<tool>", " hello", "wörld", "😀", "\n\n", "   ", "naÃ", "©x"]  # Ã / ©: a lead / continuation byte


def _wrap(tok: Tokenizer, bos: str, eos: str, **kw) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   clean_up_tokenization_spaces=False, **kw)


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 style byte-level BPE; specials that only the tokenizers library marks special (as Llama-3's
    reserved ones, not in transformers' all_special_ids) and plain added tokens (multi-byte, blank, stray bytes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=450, special_tokens=["<|begin|>", "<|eot|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|reserved_0|>", special=True), AddedToken("<|tool_call|>", special=True)])
    tok.add_tokens(ADDED)
    return _wrap(tok, "<|begin|>", "<|eot|>")


def _metaspace(byte_fallback: bool) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: Metaspace BPE, <0xXX> byte fallback and a Strip decoder; or (no byte fallback) a
    Metaspace decoder and <unk>. Control tokens only the tokenizers library marks special, as Mistral's [INST]."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = tok.model
    if byte_fallback:
        vocab = tok.get_vocab()
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in
                  __import__("json").loads(tok.to_str())["model"]["merges"]]
        model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    out = Tokenizer(model)
    out.add_special_tokens(["<unk>", "<s>", "</s>", AddedToken("[INST]", special=True),
                            AddedToken("[/INST]", special=True)])
    out.add_tokens(ADDED)
    out.pre_tokenizer = pre_tokenizers.Metaspace()
    out.decoder = (decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)]) if byte_fallback else decoders.Metaspace())
    return _wrap(out, "<s>", "</s>", unk_token="<unk>")


TOKENIZERS = {"tiny512": lambda: make_tokenizer(512), "tiny300": lambda: make_tokenizer(300),
              "bytelevel": _byte_level, "sentencepiece": lambda: _metaspace(True),
              "metaspace": lambda: _metaspace(False)}


@dataclass(frozen=True)
class Kit:
    """A tokenizer and its ids by kind (each as decode([id]) shows it)."""

    tok: PreTrainedTokenizerFast
    pools: tuple[tuple[int, ...], ...]  # partial UTF-8 / byte, special (skipped), blank, empty, added

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@functools.cache
def kit(name: str) -> Kit:
    tok = TOKENIZERS[name]()
    one = {i: tok.decode([i], skip_special_tokens=True) for i in range(len(tok))}
    raw = {i: tok.decode([i]) for i in range(len(tok))}
    added = set(tok.added_tokens_decoder)
    pools = ([i for i, t in one.items() if "\ufffd" in t], [i for i, t in one.items() if not t and raw[i]],
             [i for i, t in one.items() if t and t.isspace()], [i for i, t in one.items() if not t],
             sorted(added))
    return Kit(tok, tuple(tuple(p) for p in pools if p))


def id_lists(k: Kit, max_pieces: int = 12) -> st.SearchStrategy:
    """Concatenated pieces: one id of any kind, or the encoding of a short multi-byte text."""
    one = st.one_of(st.integers(0, len(k.tok) - 1), *[st.sampled_from(p) for p in k.pools]).map(lambda i: [i])
    text = st.text(alphabet=ALPHABET, min_size=1, max_size=8).map(
        lambda t: k.tok.encode(t, add_special_tokens=False))
    return st.lists(st.one_of(one, one, text), min_size=1, max_size=max_pieces).map(
        lambda ps: [i for p in ps for i in p]).filter(lambda ids: 0 < len(ids) <= 48)


@st.composite
def long_byte_runs(draw, k: Kit) -> list[int]:
    """A byte-fallback run of about BYTE_RUN_TOKENS bytes or more (up to twice): text as <0xXX> tokens, sometimes
    with bytes that make it invalid (stray continuation, lone lead, never valid) anywhere in it."""
    unit = draw(st.text(alphabet=ALPHABET, min_size=1, max_size=24)).encode()
    data = bytearray(unit * (draw(st.integers(BYTE_RUN_TOKENS - 8, 2 * BYTE_RUN_TOKENS)) // len(unit) + 1))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        data.insert(draw(st.integers(0, len(data))), draw(st.sampled_from([0x80, 0xBF, 0xC3, 0xE4, 0xF0, 0xFF])))
    return k.tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def _renders(k: Kit, seq: list[int], text: str) -> bool:
    """Whether `text` is decode(seq) (seq: no skipped ids) but for the exception the Detokenizer documents: a byte
    run longer than BYTE_RUN_TOKENS that is not valid UTF-8 (a full decode: a U+FFFD per byte) may show its first p
    bytes as their text, p > BYTE_RUN_TOKENS where they are valid and end a character, the rest a U+FFFD each."""
    full, values, blocks, s = k.decode(seq), token_sets(k.tok)[0], [], 0
    while s < len(seq):
        e = s + 1 if seq[s] not in values else next((i for i in range(s, len(seq)) if seq[i] not in values), len(seq))
        data, c, n = bytes(values.get(i, 0) for i in seq[s:e]), len(k.decode(seq[:s])), e - s
        if n > BYTE_RUN_TOKENS and not _valid(data):
            assert full[c:c + n] == "\ufffd" * n, (s, e)
            cut = [p for p in range(BYTE_RUN_TOKENS + 1, n) if _valid(data[:p])]
            blocks.append((c, n, ["\ufffd" * n] + [k.decode(seq[:s + p])[c:] + "\ufffd" * (n - p) for p in cut]))
        s = e

    def match(b: int, at_full: int, at: int) -> bool:
        if b == len(blocks):
            return text[at:] == full[at_full:]
        c, n, options = blocks[b]
        if not text.startswith(full[at_full:c], at):
            return False
        at += c - at_full
        return any(text.startswith(o, at) and match(b + 1, c + n, at + len(o)) for o in options)
    return match(0, 0, 0)


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@st.composite
def stop_sets(draw, text: str, prompt: str) -> tuple[str, ...]:
    """Stop strings: substrings of the completion (across tokens) with prefixes of and overlaps with each other,
    substrings of the prompt, multi-byte or U+FFFD strings, random ones; sometimes empty ones."""
    out: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        src = draw(st.sampled_from([text, text, prompt])) or text or "x"
        a = draw(st.integers(0, len(src) - 1))
        b = draw(st.integers(a + 1, min(len(src), a + draw(st.sampled_from([3, 6, 12])))))
        out.append(src[a:b])
        kind = draw(st.sampled_from(["", "prefix", "longer", "shifted"]))
        if kind == "prefix" and b - a > 1:
            out.append(src[a:draw(st.integers(a + 1, b - 1))])
        elif kind == "longer" and b < len(src):
            out.append(src[a:draw(st.integers(b + 1, min(len(src), b + 3)))])
        elif kind == "shifted" and b - a > 1:
            out.append(src[a + 1:b + 1])
    out += draw(st.lists(st.one_of(st.text(alphabet=ALPHABET, min_size=1, max_size=3),
                                   st.sampled_from(["\ufffd", "", " ", "中文", "😀"])), max_size=2))
    return tuple(draw(st.permutations(out)))


def chunk_ends(draw, n: int) -> list[int]:
    """Update points 1..n: every token, or random chunks of 1 to 8 tokens."""
    if draw(st.booleans()):
        return list(range(1, n + 1))
    ends, at = [], 0
    while at < n:
        at = min(n, at + draw(st.integers(1, 8)))
        ends.append(at)
    return ends


def _lcp(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reference(texts: list[str], stops: tuple[str, ...], ends: list[int], min_tokens: int) -> tuple[int, str]:
    """(the update that stops, the text): at each update from min_tokens on, the full decode is cut before the
    earliest stop string that ends in text not there before min_tokens (the decode at the last update before)."""
    before = None
    for n in ends:
        t = texts[n]
        if n < min_tokens:
            before = t
            continue
        floor = _lcp(before, t) if before is not None else 0
        hits = [p for s in stops if s for p in _occurrences(t, s) if p + len(s) > floor]
        if hits:
            return n, t[:min(hits)]
    return ends[-1], texts[ends[-1]]


def _occurrences(t: str, s: str) -> list[int]:
    out, p = [], t.find(s)
    while p != -1:
        out.append(p)
        p = t.find(s, p + 1)
    return out


def _texts(k: Kit, context: list[int], ids: list[int]) -> list[str]:
    """The completion's text after each token: decode(context + ids[:n]) less decode(context)."""
    base = k.decode(context)
    out = [k.decode(context + ids[:n]) for n in range(len(ids) + 1)]
    assume(all(t.startswith(base) for t in out))  # else the prompt's own text changes: no reference
    return [t[len(base):] for t in out]


def _as_streamed(k: Kit, ids: list[int], ends: list[int], context: list[int], texts: list[str]) -> list[str]:
    """The texts a Detokenizer has at the updates `ends` (they do not depend on stops, min_tokens or reads), each
    checked to be texts[n] or, after a long invalid byte run, its documented exception (see _renders)."""
    d, out, base, skipped = Detokenizer(k.tok, (), context), list(texts), k.decode(context), token_sets(k.tok)[1]
    for n in ends:
        d.update(ids[:n])
        if d.text != texts[n]:
            assert _renders(k, [i for i in context + ids[:n] if i not in skipped], base + d.text), (n, d.text)
            out[n] = d.text
    return out


def _run(k: Kit, ids: list[int], stops, ends, min_tokens: int, context: list[int], texts: list[str],
         peeks: frozenset[int] = frozenset(range(1000))):
    """Drive a Detokenizer as the engine and a stream do; check each update (its `text` read at the updates in
    `peeks`: reading it joins the stable pieces delta() walks); (update that stopped, text, the deltas joined)."""
    d, streamed = Detokenizer(k.tok, stops, context), ""
    for n in ends:
        d.update(ids[:n], search=n >= min_tokens)
        if d.stop_at is not None:
            break
        if n in peeks:
            assert d.text == texts[n], n
        streamed += d.delta()
        assert texts[n].startswith(streamed), n  # only text that can no longer change
    return n, d.text, streamed, streamed + d.delta(final=True)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@PROPS
@given(data=st.data())
def test_stream_equals_full_decode_cut_at_the_first_stop(name, data):
    """Any ids, stop strings, chunking, min_tokens and prompt (its context as the engine passes it): the text
    after each update is decode(context + ids) less decode(context) (or, past a long invalid byte run, the one
    exception the Detokenizer documents: _renders), the stop falls at the reference's update and
    cut (a stop string in the prompt's text only where it is in the completion's), and the deltas joined (never
    one char of a stop string) are that text."""
    k = kit(name)
    prompt = data.draw(st.just([]) | id_lists(k, 6), "prompt")
    ids = data.draw(id_lists(k), "ids")
    if token_sets(k.tok)[0] and data.draw(st.booleans()):  # byte fallback: a run past BYTE_RUN_TOKENS somewhere
        at = data.draw(st.integers(0, len(ids)))
        ids = ids[:at] + data.draw(long_byte_runs(k), "run") + ids[at:]
    context = prompt_context(k.tok, prompt)
    ends = chunk_ends(data.draw, len(ids))
    texts = _as_streamed(k, ids, ends, context, _texts(k, context, ids))
    stops = data.draw(stop_sets(texts[-1], k.decode(prompt)), "stops") if data.draw(st.booleans()) else ()
    min_tokens = data.draw(st.integers(0, len(ids))) if data.draw(st.booleans()) else 0
    note(f"context={context} texts={texts}")
    ref_n, ref_text = reference(texts, stops, ends, min_tokens)
    peeks = frozenset(data.draw(st.sets(st.sampled_from(ends))) if data.draw(st.booleans()) else ends)
    n, text, streamed, joined = _run(k, ids, stops, ends, min_tokens, context, texts, peeks)
    assert (n, text) == (ref_n, ref_text)
    assert ref_text.startswith(streamed) and joined == ref_text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@PROPS
@given(data=st.data())
def test_the_context_gives_transformers_pipeline_text(name, data):
    """decode(context + ids) less decode(context) is decode(prompt + ids) less decode(prompt), the text of
    transformers' text-generation pipeline (and vLLM's), for a prompt whose text is valid (no U+FFFD: see
    prompt_context) and stays so."""
    k = kit(name)
    prompt, ids = data.draw(id_lists(k, 6), "prompt"), data.draw(id_lists(k), "ids")
    whole, head, context = k.decode(prompt + ids), k.decode(prompt), prompt_context(k.tok, prompt)
    assume("\ufffd" not in head and whole.startswith(head) and context)
    note(f"context={context}")
    assert _texts(k, context, ids)[-1] == whole[len(head):]
