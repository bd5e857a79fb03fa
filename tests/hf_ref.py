"""transformers' greedy tokens as the reference for ours, from one forward instead of `generate`'s one per token."""

from __future__ import annotations

import torch

# generation_config fields whose non-default values make ref.generate's greedy tokens other than the logits' argmax
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "sequence_bias": (None,), "min_length": (None, 0)}


def eos_ids(ref) -> list[int]:
    """ref.generation_config's EOS ids, as a list."""
    eos = ref.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def transformers_greedy(ref, ids: list[int], out: list[int], mask_eos: bool = True) -> list[int]:
    """The token transformers' `ref` picks greedily after `ids` + each prefix of `out` (EOS masked, as
    ref.generate's min_new_tokens does; `mask_eos` False: not masked, as without it), from one forward over
    ids + out[:-1]: it equals `out` exactly when `out` is ref.generate's greedy tokens (each is the argmax given the
    ones before it), at the cost of one forward instead of one per token (ref.generate was ~half of a family test's
    CPU). Without min_new_tokens, generate also stops after the first EOS: the caller checks where `out` ends."""
    gen = ref.generation_config
    bent = {k: getattr(gen, k, None) for k, ok in _NEUTRAL.items() if getattr(gen, k, None) not in ok}
    assert not bent, f"generate's greedy tokens are not the argmax with {bent}"
    with torch.no_grad():
        logits = ref(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1:].float()  # [len(out), V]
    if mask_eos:
        logits[:, eos_ids(ref)] = float("-inf")
    return logits.argmax(-1).tolist()


def assert_greedy_alone(ref, prompts: list[list[int]], got: list, lengths: list[int]) -> None:
    """Each of `got` (an engine's output ids per prompt; anything else, e.g. its error, fails) is what
    ref.generate(prompt, min_new_tokens = max_new_tokens = its length, greedy) gives for that prompt alone."""
    assert [len(g) if isinstance(g, list) else g for g in got] == list(lengths)
    assert got == [transformers_greedy(ref, p, g) for p, g in zip(prompts, got)]
