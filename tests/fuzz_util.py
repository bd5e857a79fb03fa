"""Hypothesis strategies for the front door (GenerateRequests, raw protobuf bytes, OpenAI bodies) and greedy
neighbour traffic whose tokens must stay exact while the fuzzer runs (shared by test_fuzz and its e2e twin)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from elasticmoe.rpc import generation_pb2 as gen

# CI's 500 per surface: derandomized, the same examples each run (a regression check, ~40 s in all on 2 cores where
# 2000 took ~160 s); `make fuzz` runs 20,000
EXAMPLES = int(os.environ.get("ELASTICMOE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("ELASTICMOE_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck), database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink])

# Unicode edge cases: lone surrogates, NUL, BOM, RTL override, combining marks, astral emoji, replacement char.
EDGES = ["\ud800", "\udfff", "a\ud83d", "\x00", "\ufeff", "\u202e", "e\u0301", "\U0001f600", "\ufffd", "\n\r\t", ""]
edge_text = st.one_of(st.text(max_size=40), st.sampled_from(EDGES),
                      st.lists(st.sampled_from(EDGES + ["ab", " the"]), max_size=8).map("".join))
huge_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**31, 2**32, 2**63, 2**64, -2**63 - 1, 10**30]))
edge_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, -0.0, 1e-45, 1e-300, 5e-324, 1e-5, 1e300, 2.0, 0.5]))


def small_max_tokens() -> st.SearchStrategy:
    """Mostly small (so accepted requests finish fast), sometimes anything."""
    return st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(-2**31, 2**31 - 1))


# ----- gRPC GenerateRequest
def _set(msg: Any, name: str, value: Any) -> None:
    try:
        setattr(msg, name, value)
    except (ValueError, TypeError, UnicodeError):  # the client library refuses it: nothing to send
        pass


def _maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def generate_requests(draw) -> gen.GenerateRequest:
    """A GenerateRequest with every field present or not, in range or not."""
    req = gen.GenerateRequest()
    rid = draw(_maybe(st.one_of(edge_text, st.sampled_from(["r" * 257, "\U0001f600" * 300]))))
    if rid is not None:
        _set(req, "request_id", rid)
    kind = draw(st.sampled_from(["text", "text", "ids", "both", "none"]))
    if kind in ("text", "both"):
        _set(req, "prompt", draw(edge_text))
    if kind in ("ids", "both"):
        req.prompt_token_ids.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(0, 600), max_size=60)))
    floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-45, 1e-6, 0.7, 1.0])
    values = draw(st.fixed_dictionaries({
        "max_tokens": _maybe(small_max_tokens()), "temperature": _maybe(floats32), "top_p": _maybe(floats32),
        "top_k": _maybe(st.integers(-2**31, 2**31 - 1) | st.integers(0, 50)), "seed": _maybe(st.integers(0, 2**64 - 1)),
        "ignore_eos": _maybe(st.booleans()), "logprobs": _maybe(st.integers(0, 2**32 - 1) | st.integers(0, 25))}))
    for name, v in values.items():
        if v is not None:
            setattr(req.sampling, name, v)
    for x in draw(_maybe(st.lists(edge_text, max_size=20))) or ():
        try:
            req.sampling.stop.append(x)
        except (ValueError, TypeError, UnicodeError):
            pass
    return req


@st.composite
def raw_request_bytes(draw) -> bytes:
    """Random bytes, or a valid request's bytes truncated, flipped or spliced."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    good = gen.GenerateRequest(prompt="Hello experts", sampling=gen.SamplingParams(max_tokens=2, temperature=0))
    data = bytearray(good.SerializeToString())
    for _ in range(draw(st.integers(1, 6))):
        op, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


# ----- OpenAI bodies
json_scalars = st.one_of(st.none(), st.booleans(), huge_ints, edge_floats, edge_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(EDGES + ["type", "text", "x"]), inner, max_size=3),
                           max_leaves=5)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                 "content": st.one_of(edge_text, json_values)})
FIELDS: dict[str, st.SearchStrategy] = {
    "model": st.one_of(st.just("mixtral"), st.none(), json_values),  # the served name, none, or a 404
    "max_tokens": st.one_of(small_max_tokens(), json_values),
    "temperature": st.one_of(st.just(0), edge_floats, json_values), "top_p": st.one_of(edge_floats, json_values),
    "top_k": st.one_of(st.integers(-2, 50), huge_ints), "seed": st.one_of(st.integers(0, 2**64 - 1), huge_ints),
    "stop": st.one_of(edge_text, st.lists(edge_text, max_size=20), json_values),
    "stream": st.one_of(st.booleans(), json_values), "logprobs": st.one_of(st.integers(0, 25), json_values),
    "ignore_eos": st.one_of(st.booleans(), json_values), "n": st.one_of(st.just(1), json_values),
    "user": st.one_of(edge_text, json_values), "extra_field": json_values,
}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def openai_bodies(draw) -> tuple[str, bytes]:
    """(path, body bytes): JSON with type confusion, huge numbers, unicode edges, deep nesting, or not JSON."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    kind = draw(st.sampled_from(["fields", "fields", "fields", "deep", "bigint", "bytes"]))
    if kind == "deep":
        return path, ('{"prompt": "hi", "stop": ' + _deep(draw(st.integers(30, 5000))) + "}").encode()
    if kind == "bigint":
        return path, ('{"prompt": "hi", "max_tokens": ' + "9" * draw(st.integers(19, 6000)) + "}").encode()
    if kind == "bytes":
        return path, draw(st.binary(max_size=200))
    body: dict[str, Any] = {}
    if draw(st.integers(0, 4)):  # mostly a short completion, so what is accepted finishes fast
        body["max_tokens"] = draw(st.integers(1, 3))
    if chat:
        body["messages"] = draw(st.one_of(st.lists(message, max_size=3), json_values))
    else:
        body["prompt"] = draw(st.one_of(edge_text, st.lists(st.integers(-5, 600), max_size=20), json_values))
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=6)):
        body[name] = draw(FIELDS[name])
    return path, json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")


# ----- greedy neighbours
class Neighbours:
    """Threads that keep sending greedy requests (via `run(prompt) -> token ids`) and compare every answer with
    its reference; `mismatches` lists what differed, `done` counts exact answers."""

    def __init__(self, run: Callable[[str], list[int]], reference: dict[str, list[int]], threads: int = 2):
        self.run, self.reference, self.stop = run, reference, threading.Event()
        self.done, self.mismatches, self.lock = 0, [], threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i: int) -> None:
        prompts = sorted(self.reference)
        k = i
        while not self.stop.is_set():
            p = prompts[k % len(prompts)]
            k += 1
            try:
                got = self.run(p)
            except Exception as e:  # noqa: BLE001 - a neighbour must never fail
                got = repr(e)
            with self.lock:
                if got == self.reference[p]:
                    self.done += 1
                else:
                    self.mismatches.append((p, got))

    def __enter__(self) -> "Neighbours":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
