"""What the detokenizer's property tests (tests/test_detok_props.py) found, each as a plain example: the same
offline tokenizers (kit), decoded one token at a time against transformers' full decode."""

from __future__ import annotations

import pytest

from elasticmoe.engine.detok import BYTE_RUN_TOKENS, STUCK_TOKENS, Detokenizer, prompt_context
from elasticmoe.model.tokenizer import make_tokenizer
from tests.test_detok_props import kit


def _per_token(tok, ids: list[int], stops: tuple[str, ...], min_tokens: int, context: list[int] = ()) -> Detokenizer:
    d = Detokenizer(tok, stops, list(context))
    for n in range(1, len(ids) + 1):
        d.update(ids[:n], search=n >= min_tokens)
        if d.stop_at is not None:
            break
    return d


def test_a_prompt_ending_in_special_tokens_keeps_the_completions_leading_space():
    """'Paris' + four </s>, then '▁is': the context (the last 4 tokens, all skipped) decoded to '', so '▁is' was
    decoded as a text's start and lost its space; transformers' pipeline gives ' is'."""
    tok = kit("sentencepiece").tok
    prompt = tok.encode("Paris", add_special_tokens=False) + [tok.eos_token_id] * 4
    ids = tok.encode("is", add_special_tokens=False)
    d = _per_token(tok, ids, (), 0, prompt_context(tok, prompt))
    assert d.text == tok.decode(prompt + ids, skip_special_tokens=True)[len("Paris"):] == " is"


def test_a_special_token_only_the_tokenizers_library_marks_does_not_end_a_byte_run():
    """'中' as byte tokens, Mistral's [INST] (special in tokenizer.json, not in transformers' all_special_ids; a
    decode skips it) and a stray byte: the decoder sees one run, e4 b8 ad 80, invalid, so four U+FFFD; '中' was
    made stable at [INST], as if that ended the run, and stayed."""
    tok = kit("sentencepiece").tok
    ids = tok.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0xAD>", "[INST]", "<0x80>"])
    d = Detokenizer(tok)
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        assert d.text == tok.decode(ids[:n], skip_special_tokens=True), n
    assert d.text == "\ufffd" * 4 and d.delta() + d.delta(final=True) == d.text


def test_a_partial_character_followed_by_many_empty_tokens_stays_pending():
    """'?', the lead byte of '¡' (c2), STUCK_TOKENS + 1 pads (skipped, no text), then its continuation byte (a1):
    the stuck window was split before the pads, where '?' + lone c2 and the pads decode apart as together, and
    '?\ufffd' became stable; the full decode is '?¡'."""
    tok = make_tokenizer(512)
    lead, cont = tok.convert_tokens_to_ids(["Â", "¡"])
    ids = tok.encode("?", add_special_tokens=False) + [lead] + [tok.pad_token_id] * (STUCK_TOKENS + 1) + [cont]
    d, streamed = Detokenizer(tok), ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
        assert d.text == tok.decode(ids[:n], skip_special_tokens=True), n
    assert d.text == streamed + d.delta(final=True) == "?¡"


def test_a_stop_string_generated_before_min_tokens_does_not_stop_it_later():
    """'中' as three byte-fallback tokens, then '▁a' (min_tokens = 4): '中' came before min_tokens (a byte run's
    text is held pending until the run ends, yet it was there); found at token 4, it cut the text to ''."""
    tok = kit("sentencepiece").tok
    ids = tok.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0xAD>", "▁a"])
    d = _per_token(tok, ids, ("中",), min_tokens=4)
    assert (d.stop_at, d.text) == (None, "中 a")


def test_a_partial_character_before_min_tokens_is_not_searched_at_min_tokens():
    """'ok' + a lone lead byte (U+FFFD) + a pad that adds no text at min_tokens: the stop '\ufffd' came before."""
    tok = make_tokenizer(512)
    ids = tok.encode("ok", add_special_tokens=False) + [tok.convert_tokens_to_ids("ä"), tok.pad_token_id]
    d = _per_token(tok, ids, ("\ufffd",), min_tokens=len(ids))
    assert (d.stop_at, d.text) == (None, "ok\ufffd")


def test_a_context_ending_mid_character_keeps_the_completion_pending():
    """A prompt ending in the lead byte f0 (its context: a 1-token prompt is kept whole), then a1 a1 (f0 a1 a1: one
    truncated character, U+FFFD, so the completion adds no text) and '!': the first a1 added '' and was made
    stable, so the next was decoded alone as a second U+FFFD; text and stream were '\ufffd!', not '!'."""
    tok = make_tokenizer(512)
    prompt, ids = tok.convert_tokens_to_ids(["ð"]), tok.convert_tokens_to_ids(["¡", "¡", "!"])
    d, streamed = Detokenizer(tok, (), prompt_context(tok, prompt)), ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
        assert d.text == tok.decode(prompt + ids[:n], skip_special_tokens=True)[1:], n
    assert d.text == streamed + d.delta(final=True) == "!"


@pytest.mark.parametrize("name", ["tiny512", "sentencepiece"])
def test_a_run_of_skipped_special_tokens_keeps_the_window_bounded(name):
    """Text, 2000 EOS (a model run with ignore_eos), more text: each EOS (no text) kept the window's start where it
    was, so the window grew with the run and the decode work with its square (2 M tokens decoded, 2 s)."""
    tok = kit(name).tok
    text = tok.encode("The sea is wide, 中文 😀", add_special_tokens=False)
    ids = text + [tok.eos_token_id] * 2000 + text
    d = _per_token(tok, ids, ("never there",), 0)
    assert d.text == tok.decode(ids, skip_special_tokens=True)
    assert d.max_window <= STUCK_TOKENS + 4 and d.decoded_tokens <= 6 * len(ids), (d.max_window, d.decoded_tokens)


def test_a_prompt_ending_in_many_special_tokens_keeps_the_completions_leading_space():
    """'Paris' + thirty </s>: the 4 to 23 last tokens were all skipped ones, so there was no context and '▁is' lost
    its space; the context now counts the tokens a decode keeps."""
    tok = kit("sentencepiece").tok
    prompt = tok.encode("Paris", add_special_tokens=False) + [tok.eos_token_id] * 30
    ids = tok.encode("is", add_special_tokens=False)
    d = _per_token(tok, ids, (), 0, prompt_context(tok, prompt))
    assert d.text == tok.decode(prompt + ids, skip_special_tokens=True)[len("Paris"):] == " is"


def _bytes(tok, data: bytes) -> list[int]:
    return tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def test_a_long_valid_byte_run_that_turns_invalid_shows_one_replacement_per_later_byte():
    """96 bytes of CJK as byte tokens, then 20 stray bytes: the part split off past BYTE_RUN_TOKENS keeps its text
    (the documented exception), every byte after it is one U+FFFD; the window's start was the last split-off part,
    whose 3-byte characters turned into 3 U+FFFDs each behind text counted as 1 char: 4 U+FFFDs too many."""
    tok = kit("sentencepiece").tok
    valid = "中文字符" * 8
    ids = tok.encode("The sea", add_special_tokens=False) + _bytes(tok, valid.encode() + b"\x80" * 20)
    d, streamed = Detokenizer(tok), ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
    kept = d.text[len("The sea"):].rstrip("\ufffd")
    assert valid.startswith(kept) and len(kept.encode()) > BYTE_RUN_TOKENS, d.text
    assert d.text == "The sea" + kept + "\ufffd" * (len(valid.encode()) - len(kept.encode()) + 20)
    assert streamed + d.delta(final=True) == d.text


def test_a_long_byte_run_invalid_before_it_is_split_stays_as_a_full_decode_shows_it():
    """A stray byte, then 120 CJK characters as byte tokens: the run is invalid, so a full decode shows a U+FFFD
    per byte; once a split moved the window's start past the stray byte, the rest decoded as valid text."""
    tok = kit("sentencepiece").tok
    ids = tok.encode("The sea", add_special_tokens=False) + _bytes(tok, b"\x80" + ("中文字符" * 30).encode())
    d, streamed = Detokenizer(tok), ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
    assert d.text == tok.decode(ids, skip_special_tokens=True) == "The sea" + "\ufffd" * 361
    assert streamed + d.delta(final=True) == d.text and d.max_window <= BYTE_RUN_TOKENS + STUCK_TOKENS + 8
