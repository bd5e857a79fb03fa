"""Long prompts are tokenized, and large request bodies parsed, on one worker thread, off the event loop, so other
requests' streams keep flowing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")
# Prompts of this many characters or more go to the worker: a 1 MiB prompt takes about a second to tokenize (the
# tokenizer releases the GIL meanwhile), a short one less than the thread hop would cost.
OFF_LOOP_CHARS = 16 << 10
# Bodies of this many bytes or more are parsed there (JSON, the string checks, pydantic): about 0.4 s a MiB of small
# objects, 16 KiB some 7 ms.
OFF_LOOP_BYTES = 16 << 10
_POOL = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # one, as vLLM's: long prompts queue, not the loop


async def _maybe_off_loop(off: bool, fn: Callable[..., T], *args: Any) -> T:
    if not off:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


async def tokenized(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) (a prompt's checks and tokenizing, which may raise InvalidRequest) on the tokenize thread when the
    prompt has `chars` characters or more, else here."""
    return await _maybe_off_loop(chars >= OFF_LOOP_CHARS, fn, *args)


async def parsed(nbytes: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) (a body's parsing and validation, which may raise) on the same thread when the body has `nbytes`
    bytes or more, else here."""
    return await _maybe_off_loop(nbytes >= OFF_LOOP_BYTES, fn, *args)


def chars_of(prompt: Any) -> int:
    """A prompt's characters: a string's; summed over a list's strings, chat messages' contents and their parts'
    text ({"type": "text", "text": ...}, an assistant's {"type": "refusal", "refusal": ...}); token ids count none."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict):  # a content part
        return chars_of(prompt.get("text")) + chars_of(prompt.get("refusal"))
    if isinstance(prompt, list):
        return sum(chars_of(p) for p in prompt)
    return chars_of(getattr(prompt, "content", None)) if hasattr(prompt, "content") else 0
