"""A request's state in the engine (Sequence): prompt, outputs, cache slot and progress; its status; its failure."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from elasticmoe.engine.detok import Detokenizer
from elasticmoe.engine.sampling import PenaltyState, SamplingParams, TokenLogprob


class RequestFailed(RuntimeError):
    """This request could not be served (experts unavailable after retries, or a step failed for its row);
    only it ends (mapped to UNAVAILABLE / HTTP 503), the others continue."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state: prompt, outputs, cache slot and progress."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "abort"
    text: str = ""  # the completion's text, set when it finishes (detok builds it as tokens come)
    detok: Detokenizer | None = None
    generator: torch.Generator | None = None
    penalty: PenaltyState = field(default_factory=PenaltyState)  # the penalties' inputs, kept across steps
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    error: RequestFailed | None = None  # set when the engine ended this request on a failure
    text_end: int | None = None  # output tokens the text renders: all but a stop token / EOS that ended it (vLLM)
    scheduled_at: int = -1  # the scheduler's step that last gave it work (decodes over the budget: oldest first)
    block_keys: list[bytes] | None = field(default=None, repr=False)  # prefix caching: its blocks' keys so far (of
    # its prompt, then its outputs: Scheduler._chain)
    registered: int = 0  # prefix caching: its first blocks that are cached (found so, or registered as written)
    cached_tokens: int = 0  # prefix caching: prompt tokens it took from the cache at admission (usage's cached_tokens)
    preempted: int = 0  # times it was preempted (its tokens so far recomputed at its next admission)
    draws_owed: int = 0  # a resumed stream's: generator draws its given outputs took, made before its next draw

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def text_ids(self) -> list[int]:
        """The output tokens whose text is the completion's (output_ids less the stop token that ended it)."""
        return self.output_ids if self.text_end is None else self.output_ids[:self.text_end]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
