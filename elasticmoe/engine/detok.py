"""Incremental detokenization: each new token decodes a few recent tokens, never the whole output."""

from __future__ import annotations

import codecs
import re
import weakref
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete (or invalid) UTF-8 sequence
STUCK_TOKENS = 8  # a window whose text still ends mid-character after this many tokens is split where exact
BYTE_RUN_TOKENS = 64  # a run of byte tokens longer than this is split where exact too (else each token decodes it)
CONTEXT_TOKENS = (4, 24)  # a prompt suffix of this many tokens (fewest that decode whole) precedes the output
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte fallback: one raw byte per token
_TOKEN_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_sets(tokenizer: Any) -> tuple[dict[int, int], frozenset[int]]:
    """(a tokenizer's <0xXX> byte tokens: id -> byte, ids a decode with skip_special_tokens drops): the former
    empty for byte-level BPE; looked up once per tokenizer.

    A byte-fallback decoder turns a whole run of byte tokens into text at once (each byte a U+FFFD if the run is
    not valid UTF-8), so a complete character can still change while the run goes on: text is stable only after
    a run. The dropped ids are the special tokens, those transformers lists and those only tokenizer.json marks
    special (e.g. Mistral's [INST]): the decoder never sees them, so they add no text, end no run and need no
    place in a decode window.
    """
    try:
        return _TOKEN_SETS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids = {i: int(t[3:5], 16) for t, i in vocab.items() if len(t) == 6 and BYTE_PIECE.fullmatch(t)}
    maybe = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    found = ids, frozenset(i for i in maybe if tokenizer.decode([i], skip_special_tokens=True) == ""
                           and tokenizer.decode([i], skip_special_tokens=False) != "")
    try:
        _TOKEN_SETS[tokenizer] = found
    except TypeError:  # not weak-referenceable: not cached
        pass
    return found


def prompt_context(tokenizer: Any, prompt_ids: list[int], skip_special: bool = True) -> list[int]:
    """The prompt's last tokens that the completion is decoded after, as vLLM does: the fewest (4 to 23, counting
    only those a decode keeps: special tokens are left out, but with skip_special false) whose text has no U+FFFD
    (so it starts on a character) and is not empty (else the completion is at a text's start, where a decoder drops
    its leading space); none if no such suffix. After a
    prompt whose own text has U+FFFD at or near its end (it ends mid-character, or in a byte-fallback run with an
    invalid byte), the completion's text can differ from transformers' pipeline's, which decodes it all again."""
    lo, hi = CONTEXT_TOKENS
    skipped, kept = token_sets(tokenizer)[1] if skip_special else frozenset(), []
    for i in reversed(prompt_ids):  # the last hi - 1 kept, however many special tokens come after them
        if i not in skipped:
            kept.append(i)
            if len(kept) == hi - 1:
                break
    kept.reverse()
    if len(kept) <= lo:
        return kept
    for n in range(lo, len(kept) + 1):
        text = tokenizer.decode(kept[-n:], skip_special_tokens=skip_special)
        if text and REPLACEMENT not in text:
            return kept[-n:]
    return []


class Detokenizer:
    """One request's completion text, built as its tokens arrive (the prefix / read offset technique).

    The text that tokens `ids[read:]` add is `decode(ids[prefix:])` minus `decode(ids[prefix:read])`: decoding
    from an earlier token keeps the rules a full decode applies at token boundaries (a leading space dropped only
    at the very start). While the window's text ends in U+FFFD (part of a UTF-8 character; what the new tokens add
    can be "" when they continue one the context ends in) the tokens stay pending. `ids` are the context's and the
    completion's tokens less those a decode drops (special tokens): a run of them takes no room in a window.

    `text` is exactly `tokenizer.decode(context + ids, skip_special_tokens=skip_special)` less the text of `context`
    (the prompt's last tokens, see `prompt_context`; with none, a plain decode of ids; `_split` names the one
    exception, a run of byte tokens longer than BYTE_RUN_TOKENS), cut before the first stop string: as in vLLM
    and transformers' text-generation pipeline, a completion keeps the space that a decoder drops at the start of
    a text (Llama-style "▁Paris" after a prompt is " Paris"). `delta()` hands out text that is never taken back:
    it holds back a partial character and any tail that may still become a stop string, so the deltas of a
    request joined are its `text`.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = (), context: list[int] = (),
                 skip_special: bool = True):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # stable chars a stop string can start in
        self.byte_ids, skipped = token_sets(tokenizer)
        self.skip = skip_special  # False (vLLM's skip_special_tokens false): special tokens are decoded as text
        self.skipped = skipped if skip_special else frozenset()
        self.ids = [i for i in context if i not in self.skipped]  # context + completion, less the skipped ids
        self.prefix, self.read = 0, len(self.ids)  # window ids[prefix:]; ids[:read] are stable
        self.lead: list[int] = []  # a byte token decoded before the window where a byte run goes on across it
        by_value = {b: i for i, b in self.byte_ids.items()}
        self.leads = (by_value.get(0x41), by_value.get(0x80))  # 'A' and a lone continuation byte: see _lead
        self.taken = 0  # the caller's ids taken in
        self.pieces: list[str] = []  # the stable text, as decoded
        self.length = 0  # chars of stable text
        self.tail = ""  # its last `keep` chars
        self.pending = ""  # what ids[read:] add now (ends mid-character)
        self.stop_at: int | None = None  # where the first stop string starts in the text
        self.unsearched: tuple[int, str] | None = None  # (stable chars, pending) at an update under min_tokens
        self.sent = 0  # chars handed out by delta()
        self._next = (0, 0)  # (piece, char in it) where delta() resumes
        self.decoded_tokens = 0  # tokens passed to decode over all calls (cost accounting)
        self.max_window = 0  # the most tokens one decode call saw
        self._before = self._decode(self.ids)  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        self.max_window = max(self.max_window, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def update(self, ids: list[int], search: bool = True) -> None:
        """Take in the tokens appended to `ids` since the last call. search=False: a stop string is not looked
        for in the text they add (the request is still under min_tokens)."""
        if self.stop_at is not None or len(ids) <= self.taken:
            return
        new = [i for i in ids[self.taken:] if i not in self.skipped]
        self.taken = len(ids)
        if not new:  # only skipped tokens: the text is as it was
            return
        ids = self.ids
        ids += new
        old_len, old_tail = self.length, self.tail
        now = self._decode(self.lead + ids[self.prefix:])
        added = now[len(self._before):]
        if not now.endswith(REPLACEMENT) and not self._in_byte_run(ids, len(ids)):
            self._advance(ids, len(ids), added)
            self.pending = ""
        elif len(ids) - self.read > STUCK_TOKENS and self._split(ids, now):  # rare: invalid bytes
            self.pending = self._decode(self.lead + ids[self.prefix:])[len(self._before):]
        else:
            self.pending = added
        if search and self.stops:
            self._search(old_len, old_tail)
        elif self.stops and self.pending:  # under min_tokens: a later stop must end past the text it keeps of this
            self.unsearched = (self.length, self.pending)
        elif self.stops:
            self.unsearched = None

    def _in_byte_run(self, ids: list[int], end: int) -> bool:
        """Whether ids[:end] ends inside a run of byte tokens."""
        return end > 0 and ids[end - 1] in self.byte_ids

    def _long_run_split(self, ids: list[int], end: int) -> bool:
        """Whether ids[:end] ends with more than BYTE_RUN_TOKENS byte tokens, and its bytes with no character
        begun and not ended (invalid bytes end as they come: U+FFFD each)."""
        n = BYTE_RUN_TOKENS + 1
        if end < n or None in self.leads or not all(t in self.byte_ids for t in ids[end - n:end]):
            return False
        last = bytes(self.byte_ids[t] for t in ids[end - 4:end])
        return codecs.utf_8_decode(last, "replace", False)[1] == len(last)  # nothing held for the next bytes

    def _lead(self, ids: list[int], at: int) -> list[int]:
        """What a window starting at ids[at] is decoded after: nothing, or inside a byte run one byte token that
        stands for the run's bytes before `at` (closed there): 'A' while they are valid UTF-8, a lone continuation
        byte once not, as a decoder shows the run's later bytes then (all U+FFFD). Either shows as one char."""
        if not 0 < at < len(ids) or ids[at - 1] not in self.byte_ids or ids[at] not in self.byte_ids:
            return []
        i = at
        while i > self.prefix and ids[i - 1] in self.byte_ids:
            i -= 1
        if i == self.prefix and self.lead == [self.leads[1]]:  # the run came into the window invalid
            return self.lead
        try:
            bytes(self.byte_ids[t] for t in ids[i:at]).decode("utf-8")
        except UnicodeDecodeError:
            return [self.leads[1]]
        return [self.leads[0]]

    def _advance(self, ids: list[int], upto: int, added: str) -> None:
        """ids[read:upto] are stable now, adding `added`; the next window starts at the old read offset, or at
        upto after its lead where a long byte run was split there (the run's text before it no longer changes)."""
        if added:
            self.pieces.append(added)
            self.length += len(added)
            self.tail = (self.tail + added)[-self.keep:] if self.keep else ""
        lead = self._lead(ids, upto)
        if lead:
            prefix, before = upto, self._decode(lead)
        else:
            lead = self._lead(ids, self.read)
            prefix, before = self.read, self._decode(lead + ids[self.read:upto])
        if not before and self.prefix < prefix:  # e.g. a lone space a decoder strips at a text's start
            lead, prefix, before = self.lead, self.prefix, self._decode(self.lead + ids[self.prefix:upto])
        self.lead, self.prefix, self.read, self._before = lead, prefix, upto, before

    def _split(self, ids: list[int], now: str) -> bool:
        """Many tokens and still mid-character (e.g. invalid bytes): make stable the longest part whose text a
        full decode cannot change, i.e. where decoding the two sides apart gives the same text as together and
        the other side has text (its first byte tells that a partial character before it stays one; tokens
        without text, e.g. a lone space a decoder strips, tell nothing).

        Not inside a run of byte tokens, whose text a later byte can still change (one invalid byte turns the
        whole run into U+FFFDs), unless the run is longer than BYTE_RUN_TOKENS: each token would decode all of it.
        A long run that was valid and then meets an invalid byte keeps the text of its split-off part, the bytes
        after it a U+FFFD each (a full decode shows a U+FFFD per byte for all of it). A run already invalid where
        it is split shows a U+FFFD per byte after it too, valid or not, as a full decode does (see _lead)."""
        for j in range(len(ids) - 1, max(self.read, len(ids) - 5), -1):  # 4 back: a 4-byte character
            if self._in_byte_run(ids, j) and not self._long_run_split(ids, j):
                continue
            lead = self._lead(ids, j)
            head, rest = self._decode(self.lead + ids[self.prefix:j]), self._decode(lead + ids[j:])[len(lead):]
            if rest and head + rest == now:
                self._advance(ids, j, head[len(self._before):])
                return True
        return False

    def _search(self, old_len: int, old_tail: str) -> None:
        """Look for the stop strings in what this update added (reaching back into the last `keep` chars)."""
        region = old_tail + self._stable_from(old_len) + self.pending
        base, best, floor = old_len - len(old_tail), None, self._floor()
        for s in self.stops:
            at = region.find(s, max(0, len(old_tail) - len(s) + 1, floor - base - len(s) + 1))
            if at != -1 and (best is None or at < best):
                best = at
        if best is not None:
            self.stop_at = base + best

    def _floor(self) -> int:
        """Chars at the text's start that it had, the same, at the last update under min_tokens (those before
        the pending part of then, and what of that part is still there): a stop string within them is not one."""
        if self.unsearched is None:
            return 0
        start, was = self.unsearched
        now = (self._stable_from(start)[:len(was)] + self.pending)[:len(was)]
        same = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
        if self.length >= start + len(was):  # stable past it: later searches start beyond the floor
            self.unsearched = None
        return start + same

    def _stable_from(self, start: int) -> str:
        """The stable text from char `start` on (a short walk back over the last pieces)."""
        out, end = [], self.length
        for piece in reversed(self.pieces):
            if end <= start:
                break
            out.append(piece[max(0, start - (end - len(piece))):])
            end -= len(piece)
        return "".join(reversed(out))

    @property
    def text(self) -> str:
        """The whole text so far (pending part included), cut before the first stop string; O(length)."""
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
            self._next = (0, min(self.sent, self.length))
        full = (self.pieces[0] if self.pieces else "") + self.pending
        return full if self.stop_at is None else full[: self.stop_at]

    def held(self) -> int:
        """Chars at the end of the stable text that could be the start of a stop string."""
        best, tail = 0, self.tail
        for s in self.stops:
            i = tail.find(s[0], max(0, len(tail) - len(s) + 1))
            while i != -1 and len(tail) - i > best:
                if s.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return best

    def mark_sent(self, chars: int) -> None:
        """Count the text's first `chars` characters (of the stable text) as handed out by delta(): a resumed stream's
        client has them already."""
        self.text  # noqa: B018 - joins the pieces: delta() resumes in the one piece
        self.sent = chars
        self._next = (0, chars)

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet that can no longer change; final=True: all the rest of `text`."""
        if final:
            text = self.text
            out, self.sent = text[self.sent:], max(self.sent, len(text))
            return out
        end = self.length - self.held()
        if self.stop_at is not None:
            end = min(end, self.stop_at)
        out: list[str] = []
        piece, at = self._next
        while self.sent < end:
            if at == len(self.pieces[piece]):
                piece, at = piece + 1, 0
                continue
            chunk = self.pieces[piece][at:at + end - self.sent]
            out.append(chunk)
            self.sent += len(chunk)
            at += len(chunk)
        self._next = (piece, at)
        return "".join(out)
