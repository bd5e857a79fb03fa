"""A small gRPC client for the `elasticmoe.v1.Generation` API (through Serve's gRPC proxy, or a direct_grpc port)."""

from __future__ import annotations

import os
import time
from numbers import Real
import grpc

from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from elasticmoe.rpc.options import channel_options

_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "logprobs")
KEY_ENV = "ELASTICMOE_API_KEY"
# a call's longest timeout: gRPC's deadline (now + timeout, as int64 nanoseconds) overflowed past some 7e9 s, and the
# call failed at once with DEADLINE_EXCEEDED
MAX_TIMEOUT_S = 1e9
# sleeps before each try to resume a broken stream (GenerationClient.stream): some 16 s in all, for another gateway
# replica (or Serve's replacement of the dead one) to take it
RESUME_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def check_api_key(key: str, where: str) -> str:
    """`key`, unless gRPC metadata cannot carry it (not printable ASCII: gRPC failed the call with "INTERNAL: Invalid
    metadata", naming nothing, and no server could accept it): ValueError naming `where`, never the key."""
    if key.isascii() and key.isprintable():
        return key
    raise ValueError(f"{where}: an API key must be printable ASCII (gRPC metadata carries nothing else)")


def check_timeout(value, where: str) -> float:
    """`value` as a call's timeout in seconds, above 0 and at most MAX_TIMEOUT_S; else a ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"{where}: must be at most {MAX_TIMEOUT_S:g} seconds and above 0, got {value!r}")
    return float(value)


def make_request(prompt: str | None = None, prompt_token_ids: list[int] | None = None, request_id: str = "",
                 stop: str | list[str] | None = None, **sampling) -> gen.GenerateRequest:
    """A GenerateRequest; sampling fields left as None stay unset (server defaults). `stop`: one stop string or a
    list of them (as in SamplingParams and the OpenAI API)."""
    unknown = set(sampling) - set(_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling fields: {sorted(unknown)}")
    stops = [stop] if isinstance(stop, str) else _named("stop", list, stop or [])  # a str: one, not its characters
    params = _named("stop", gen.SamplingParams, stop=stops)
    for k, v in sampling.items():
        if k == "seed" and isinstance(v, int) and -(1 << 63) <= v < 0:
            v += 1 << 64  # a signed seed (offline, HTTP) as the unsigned 64 bits torch seeds with: the same draws
        if v is not None:
            _named(k, setattr, params, k, v)
    req = _named("request_id", gen.GenerateRequest, request_id=request_id, sampling=params)
    if prompt is not None:
        _named("prompt", setattr, req, "prompt", prompt)
    if prompt_token_ids:
        _named("prompt_token_ids", req.prompt_token_ids.extend, prompt_token_ids)
    return req


def _named(field: str, fn, *args, **kw):
    """fn(*args, **kw), protobuf's refusal of a value (TypeError "bad argument type for built-in operation",
    ValueError "Value out of range: ...", naming no field) as a ValueError naming `field`."""
    try:
        return fn(*args, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: {e}") from None


class ResumingStream:
    """GenerationClient.stream's answer: the messages of one GenerateStream call, resumed on a new call where one
    fails UNAVAILABLE after it delivered some (the request sent again with GenerateRequest.resume: the tokens and the
    text's characters received), after each sleep of `backoff_s` in turn until a call delivers a message; its
    messages follow on as the one stream's. Any other error, UNAVAILABLE before a first message, the tries spent or
    the deadline (`timeout_s` from the start, shared by every call) passed: that call's error is raised. `cancel()`
    (or dropping it) cancels the call under way; `resumes` counts the calls resumed; other attributes (code(),
    details(), ...) are the current call's."""

    def __init__(self, stub, request: gen.GenerateRequest, metadata, timeout_s: float, backoff_s: tuple[float, ...]):
        self._stub, self._request, self._metadata, self._backoff = stub, request, metadata, tuple(backoff_s)
        self._end = time.monotonic() + timeout_s
        self._tokens: list[int] = []
        self._chars, self._tries, self._cancelled, self.resumes = 0, 0, False, 0
        self._call = stub.GenerateStream(request, metadata=metadata, timeout=timeout_s)

    def __iter__(self) -> "ResumingStream":
        return self

    def __next__(self) -> gen.GenerateResponse:
        while True:
            try:
                msg = next(self._call)
            except grpc.RpcError as e:
                if not self._resumable(e):
                    raise
                self._resume()
                continue
            self._tokens += msg.token_ids
            self._chars += len(msg.text)
            if not self._request.request_id:  # the id the gateway gave it, echoed by the resumed calls too
                self._request.request_id = msg.request_id
            self._tries = 0
            return msg

    def _resumable(self, e: grpc.RpcError) -> bool:
        return (e.code() == grpc.StatusCode.UNAVAILABLE and bool(self._tokens) and not self._cancelled
                and self._tries < len(self._backoff) and self._end - time.monotonic() > self._backoff[self._tries])

    def _resume(self) -> None:
        time.sleep(self._backoff[self._tries])
        self._tries += 1
        self.resumes += 1
        request = gen.GenerateRequest()
        request.CopyFrom(self._request)
        request.resume.token_ids.extend(self._tokens)
        request.resume.text_chars = self._chars
        self._call = self._stub.GenerateStream(request, metadata=self._metadata,
                                               timeout=max(self._end - time.monotonic(), 1e-3))

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def __getattr__(self, name: str):
        if name == "_call":  # not made (its __init__ raised): no recursion
            raise AttributeError(name)
        return getattr(self._call, name)


class GenerationClient:
    """`GenerationClient("127.0.0.1:9000").generate("Hello", max_tokens=8, temperature=0)`.

    `api_key` (default: $ELASTICMOE_API_KEY) is sent as the `authorization: Bearer <key>` metadata; `tls` (or
    root certificates as PEM bytes) for a front door behind TLS. `timeout_s` is each call's deadline by default,
    and `generate(..., timeout=5)` / `stream(..., timeout=5)` one call's (seconds, a stream's from its start to its
    last message): past it the call fails DEADLINE_EXCEEDED (grpc.RpcError, raised by `generate` or by the stream's
    next message) and the server aborts the request, freeing its place in the engine. Errors are grpc.RpcError with
    generation.proto's codes; a value protobuf cannot carry, or a timeout out of range, is a ValueError naming its
    field (an unknown sampling field: TypeError).

    A stream survives the death of the gateway replica serving it: `stream` resumes it on another (ResumingStream),
    sleeping `resume_backoff_s` before each try (() turns that off). `generate` is not resumed: an UNAVAILABLE
    answer is raised, to be retried (a greedy or seeded request's answer is the same again).
    """

    def __init__(self, address: str = "127.0.0.1:9000", app: str = "elasticmoe", timeout_s: float = 300,
                 api_key: str | None = None, tls: bool | bytes = False,
                 resume_backoff_s: tuple[float, ...] = RESUME_BACKOFF_S):
        check_timeout(timeout_s, "timeout_s")
        self.resume_backoff_s = tuple(resume_backoff_s)
        options = channel_options(keepalive_s=None)  # Serve's proxy takes no keepalive pings
        if isinstance(tls, bytes) and not tls.strip():  # falsy: it made a plaintext channel, the key in the clear
            raise ValueError("tls: the root certificates are empty (give the CA's PEM bytes, or True for the "
                             "system's roots)")
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=tls if isinstance(tls, bytes) else None)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = gen_grpc.GenerationStub(self.channel)
        key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        if key:  # refused before a call: named as given (the argument or the variable)
            check_api_key(key, "api_key" if api_key is not None else KEY_ENV)
        self.metadata = (("application", app),) + ((("authorization", f"Bearer {key}"),) if key else ())
        self.timeout_s = timeout_s

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout_s if timeout is None else check_timeout(timeout, "timeout")

    def generate(self, prompt: str | None = None, timeout: float | None = None, **kw) -> gen.GenerateResponse:
        """One answer; `timeout`: this call's deadline in seconds (None: the client's timeout_s)."""
        deadline = self._deadline(timeout)
        return self.stub.Generate(make_request(prompt, **kw), metadata=self.metadata, timeout=deadline)

    def stream(self, prompt: str | None = None, timeout: float | None = None, **kw) -> ResumingStream:
        """The answer's messages as they come; `timeout`: the whole stream's deadline in seconds (None: timeout_s).
        To stop early, call its cancel() or drop it (leave a `for` loop over it: gRPC cancels a call it collects);
        either aborts the request on the server. A call that fails UNAVAILABLE after some messages (its gateway
        replica died) is resumed where it broke, on whichever replica answers (ResumingStream): the messages go on
        as one stream's, the same ones as unbroken for a greedy or seeded request."""
        deadline = self._deadline(timeout)
        return ResumingStream(self.stub, make_request(prompt, **kw), self.metadata, deadline, self.resume_backoff_s)

    def close(self) -> None:
        self.channel.close()
