"""A whole gateway in-process for the soak test: the engine over a GrpcDispatcher, two real expert shards (gRPC, frame
listeners, mTLS), the direct gRPC port and the OpenAI HTTP API; the kinds of request a gateway sees for weeks; and
what it holds, read so that a soak can compare it before and after."""

from __future__ import annotations

import asyncio
import collections
import gc
import http.client
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import grpc

from elasticmoe.client import GenerationClient, make_request
from elasticmoe.config import AppArgs
from elasticmoe.engine.detok import Detokenizer
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import Sequence
from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.failover import Step
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.request_stream import RequestStream
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.gateway.step_groups import Call
from elasticmoe.gateway.stream_transport import _Stream
from elasticmoe.metrics import GatewayMetrics
from tests.openai_util import MODEL, Server
from tests.store_util import full_store, tiny_mixtral

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
GREEDY = dict(temperature=0.0, ignore_eos=True)
LONG = 80  # tokens of a request that is cut short (32 prompt tokens + 80 within max_model_len 128)
CAPACITY = 12  # requests running or waiting: one of each kind fits (10 places: the chat request has 2 choices)
CALL_S, SUSPECT_S = 1.0, 0.2  # the dispatcher's call deadline and how long a failed shard is avoided
# per-request and per-call objects: what a finished request leaves behind, counted by type
TRACKED = (Sequence, Detokenizer, RequestStream, Step, Call, _Stream)
# the metrics' label sets: a finite vocabulary, whatever the requests were
REQUESTS = {(api, s) for api in ("grpc", "http") for s in ("ok", "invalid", "rejected", "cancelled")}
ERRORS = {"400", "429", "499", "503", "CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
POOLS = ("expert-rpc", "fanout")  # ThreadPoolExecutor workers: as many as the most calls at once (bounded)


class Rig:
    """The gateway (GatewayCore's parts without Ray) over shards s0 and s1, each holding every expert."""

    def __init__(self, folder: Path, transport: str):
        self.wire = transport  # the dispatcher's transport: unary, stream or socket
        self.foreign = set(threading.enumerate())  # earlier tests' threads (they may end during the soak): not counted
        path, self.files, _ = tiny_mixtral(folder)
        spec = self.files.spec
        # [server, servicer, port] of shards s0 and s1
        self.shards = [list(start_server(full_store(self.files), f"s{i}")) for i in range(2)]
        self.version = 0
        self.reports: list[str] = []  # the shards the dispatcher reported failed (a controller answering nothing new)
        self.dispatcher = GrpcDispatcher(CALL_S, on_failure=self.reports.append, failover_s=1.0, suspect_s=SUSPECT_S,
                                         transport=transport)
        self.route([0, 1])
        engine = Engine(self.files, self.dispatcher, max_num_seqs=4, max_model_len=128, max_queue=CAPACITY - 4,
                        retry_backoff_s=(0.0,))
        self.tokenizer, self.runner = engine.tokenizer, EngineRunner(engine)
        self.args, self.api_keys = AppArgs(model=path), ApiKeys()
        self.metrics = GatewayMetrics("per_expert", len(spec.moe.sparse_layers), spec.moe.num_experts,
                                      spec.moe.moe_layers, use_ray=False)
        self.port = DirectIngress(GenerationService(self), "127.0.0.1", 0, max_rpcs=64)
        self.web = Server(build_openai_app(self))
        self.client = GenerationClient(self.port.address, timeout_s=30)

    async def wait_ready(self) -> None:
        return None

    def route(self, alive: list[int]) -> None:
        """Publish a new table routing every expert to the shards `alive` (a placement change)."""
        self.version += 1
        experts = [[(i, 1.0 / len(alive)) for i in range(len(alive))]] * self.files.spec.moe.num_experts
        shards = [{"id": f"s{i}", "address": f"127.0.0.1:{self.shards[i][2]}"} for i in alive]
        self.dispatcher.set_table(RoutingTable.from_dict(
            {"version": self.version, "layers": {l: experts for l in self.files.spec.moe.moe_layers},
             "shards": shards}))

    def stop(self, i: int) -> None:
        assert self.shards[i][0].stop(None).wait(10)

    def start(self, i: int) -> None:
        """Start shard i again on its port (its experts in a fresh store, as a restarted shard loads them), and wait
        until the gateway's channel to it has reconnected (until then its calls fail at once: UNAVAILABLE)."""
        self.shards[i][:2] = start_server(full_store(self.files), f"s{i}", port=self.shards[i][2])[:2]
        kept = self.dispatcher.transport._stubs.get(f"127.0.0.1:{self.shards[i][2]}")
        if kept is not None:
            grpc.channel_ready_future(kept[1]).result(timeout=10)

    def close(self) -> None:
        self.client.close()
        self.web.stop()
        self.port.stop(0)
        self.runner.close()
        self.dispatcher.close()
        for server, _, _ in self.shards:
            server.stop(None).wait(10)


# ----- the kinds of request (each raises if its answer is not what a client of that kind gets)

def grpc_unary(rig: Rig) -> None:
    assert len(rig.client.generate(PROMPT, max_tokens=6, **GREEDY).token_ids) == 6


def grpc_stream(rig: Rig) -> None:
    assert sum(len(r.token_ids) for r in rig.client.stream(PROMPT, max_tokens=6, **GREEDY)) == 6


def grpc_longer(rig: Rig) -> None:
    """A stream long enough (24 tokens) to be running still when a burst's last requests come."""
    assert sum(len(r.token_ids) for r in rig.client.stream(PROMPT, max_tokens=24, **GREEDY)) == 24


def grpc_cancelled(rig: Rig) -> None:
    """A stream the client cancels after its first answer."""
    call = rig.client.stub.GenerateStream(make_request(PROMPT, max_tokens=LONG, **GREEDY), timeout=30)
    next(call)
    call.cancel()


def grpc_gone(rig: Rig) -> None:
    """A stream whose client closes its channel mid-stream (the connection goes)."""
    client = GenerationClient(rig.port.address, timeout_s=30)
    try:
        next(client.stream(PROMPT, max_tokens=LONG, **GREEDY))
    finally:
        client.close()


def grpc_deadline(rig: Rig) -> None:
    try:
        rig.client.stub.Generate(make_request(PROMPT, max_tokens=LONG, **GREEDY), timeout=0.05)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    else:
        raise AssertionError("a call past its deadline was answered")


def grpc_invalid(rig: Rig) -> None:
    try:
        rig.client.generate(PROMPT, temperature=1e-45)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    else:
        raise AssertionError("a bad temperature was served")


def _post(rig: Rig, body: dict, path: str = "/v1/completions") -> tuple[int, bytes]:
    host, port = rig.web.url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, json.dumps({"model": MODEL, **body}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_ok(rig: Rig) -> None:
    status, body = _post(rig, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert status == 200, f"HTTP {status}: {body[:200]!r}"


def http_chat_stream(rig: Rig) -> None:
    status, body = _post(rig, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2,
                               "temperature": 0, "stream": True}, "/v1/chat/completions")
    assert status == 200 and body.endswith(b"data: [DONE]\n\n"), f"HTTP {status}: {body[-200:]!r}"


def http_invalid(rig: Rig) -> None:
    status, body = _post(rig, {"prompt": PROMPT, "max_tokens": -1})
    assert status == 400, f"HTTP {status}: {body[:200]!r}"


def _send(rig: Rig, body: dict) -> socket.socket:
    """A completion request written on a raw connection (whose client then goes away at a chosen point)."""
    host, port = rig.web.url.split("//")[1].split("/")[0].split(":")
    raw = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, **GREEDY, **body}).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


def http_gone(rig: Rig) -> None:
    """A streamed completion whose client closes its connection after the first event."""
    with _send(rig, {"stream": True}) as s:
        got = b""
        while b"data: " not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
            status = got.split(b" ", 2)[1].decode() if got.count(b" ") >= 2 else "200"
            assert status == "200", f"HTTP {status}: {got[-200:]!r}"


def http_gone_early(rig: Rig) -> None:
    """A completion (not streamed) whose client closes its connection before any answer."""
    with _send(rig, {}):
        time.sleep(0.02)


KINDS = (grpc_unary, grpc_stream, grpc_cancelled, grpc_gone, grpc_deadline, grpc_invalid, http_ok, http_chat_stream,
         http_invalid, http_gone, http_gone_early)


def _is(e: Exception, code: grpc.StatusCode, status: int) -> bool:
    return isinstance(e, grpc.RpcError) and e.code() == code or f"HTTP {status}:" in str(e)


def at_once(rig: Rig, kinds=KINDS, failing: bool = False) -> list[str]:
    """One request of each kind, all at once; the failures, as 'kind: error'. A refusal at capacity (429,
    RESOURCE_EXHAUSTED) is none, nor, with `failing`, a request the cluster could not serve (503, UNAVAILABLE)."""
    bad: list[str] = []

    def one(kind) -> None:
        try:
            kind(rig)
        except Exception as e:  # noqa: BLE001 - reported
            if not (_is(e, grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
                    or failing and _is(e, grpc.StatusCode.UNAVAILABLE, 503)):
                bad.append(f"{kind.__name__}: {e!r}")
    threads = [threading.Thread(target=one, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return bad


# ----- what the gateway and the shards hold

def _threads(foreign: set[threading.Thread]) -> dict[str, int]:
    """Live threads by name, digits dropped (thread pools' workers and `foreign` threads apart: see POOLS)."""
    names = ("".join(c for c in t.name if not c.isdigit()) for t in threading.enumerate() if t not in foreign)
    return dict(collections.Counter(n for n in names if not n.startswith(POOLS)))


def _fds() -> dict[str, int]:
    """This process's open file descriptors, by kind (socket, pipe, anon_inode, file)."""
    kinds: collections.Counter = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own, closed since
            continue
        kinds[target.split(":")[0] if not target.startswith("/") else "file"] += 1
    return dict(kinds)


def objects(collect: bool = True) -> dict[str, int]:
    """The TRACKED objects by type: those alive, after a full collection; else (`collect` False) those alive and those
    that only the cyclic collector would free. pytest's log capture keeps every record, and a record's args (a
    step's failure, its traceback, the frames' locals) hold sequences and steps: the records are let go first (the
    text stays in the report)."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "LogCaptureHandler":
            handler.records.clear()
    if collect:
        gc.collect()
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects() if type(o) in TRACKED)
    return {t.__name__: counts.get(t.__name__, 0) for t in TRACKED}


def held(rig: Rig) -> dict:
    """Everything the gateway and its shards keep that a request, a call, a reconnect or a table could add to."""
    d, t, r = rig.dispatcher, rig.dispatcher.transport, rig.runner
    e = r.engine
    gc.collect()  # before the fds are counted: garbage (an earlier test's channel, say) closes its sockets now
    conns = getattr(t, "_conns", getattr(t, "_streams", {}))
    addresses, ids = {f"127.0.0.1:{port}" for _, _, port in rig.shards}, {"s0", "s1"}  # kept per shard: these at most
    return {
        "threads": _threads(rig.foreign), "fds": _fds(), "objects": objects(),
        "runner": {"streams": len(r._streams), "admitted": r._live, "refused_groups": len(r._refused_groups)},
        "engine": {"seqs": len(e.seqs), "free_slots": e.scheduler.num_free_slots, "running": len(e.scheduler.running),
                   "waiting": len(e.scheduler.waiting), "held_slots": len(e.held_slots),
                   "unreported": len(e.unreported)},
        "dispatcher": {"suspects": set(d.suspects) <= ids, "shard_tokens": set(d.shard_tokens) <= ids,
                       "stuck": len(d._stuck), "reporting": len(d._reporting), "left_epochs": len(d._left_epochs)},
        "transport": {"channels": set(t._stubs) <= addresses, "limits": set(t._limits) <= addresses,
                      "conns": set(conns) <= addresses,
                      "pending": sum(len(c.pending) for c in conns.values()),
                      "deadlines": len(t._deadlines._heap) if hasattr(t, "_deadlines") else 0},
        "metrics": {"requests": set(rig.metrics.requests) <= REQUESTS, "errors": set(rig.metrics.errors) <= ERRORS},
        "tasks": {"grpc": rig.port._call(_tasks(), 5),  # the event loops' tasks: each door's
                  "http": asyncio.run_coroutine_threadsafe(_tasks(), rig.web.server.servers[0].get_loop()).result(5)},
        "shards": [{"readers": len(svc.readers), "conns": len(srv.listener._conns),
                    "threads": len(srv.listener._threads), "opening": len(srv.listener._opening),
                    "refusing": len(srv.listener._refusing)} for srv, svc, _ in rig.shards],
    }


async def _tasks() -> int:
    return len(asyncio.all_tasks())


def _idle(rig: Rig) -> bool:
    """Nothing admitted or running, no call pending, every call's deadline entry expired."""
    t = rig.dispatcher.transport
    conns = getattr(t, "_conns", getattr(t, "_streams", {}))
    deadlines = getattr(t, "_deadlines", None)
    return (not any(rig.runner.stats()[k] for k in ("running", "waiting", "admitted"))
            and not any(c.pending for c in conns.values()) and (deadlines is None or not deadlines._heap))


def wait_idle(rig: Rig, deadline: float) -> None:
    """Until nothing is admitted or running, no call pending and every call's deadline entry expired."""
    while not _idle(rig):
        assert time.monotonic() < deadline, held(rig)
        time.sleep(0.02)


def settled(rig: Rig) -> None:
    """Until the gateway is idle, then past the shards' suspicion one normal request (both shards answer), idle
    again: the state a soak's figures are read in."""
    deadline = time.monotonic() + 15
    wait_idle(rig, deadline)
    time.sleep(SUSPECT_S + 0.1)
    assert not at_once(rig, (grpc_unary,))  # alone: the engine thread's last step held it only
    wait_idle(rig, deadline)
