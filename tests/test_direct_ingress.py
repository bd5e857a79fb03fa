"""The gateway's direct gRPC port (`direct_grpc`) without Ray: a real grpc.aio server over a real engine answers
like LLM.generate, refuses bad or excess requests with the gRPC status and keeps serving, frees a cancelled
call's place, drains calls in flight when it stops, names the setting when its port is taken, and shares a port
among one application's replicas only (PortClaim)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from pydantic import ValidationError

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from elasticmoe.config import AppArgs, DirectGrpc
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress, PortClaim
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from tests.openai_util import Core, model  # noqa: F401 - the module-scoped tiny model fixture

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _port(core, number: int = 0, **kw) -> DirectIngress:
    """The port over `core` (no API keys) on 127.0.0.1:`number` (0: any); kw: app, claims, max_rpcs."""
    core.api_keys = ApiKeys()
    return DirectIngress(GenerationService(core), "127.0.0.1", number, **{"max_rpcs": 16, **kw})


def _wait_idle(core, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while core.runner.stats()["admitted"]:
        assert time.monotonic() < deadline, core.runner.stats()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    llm = LLM(model[0])
    return llm.generate([llm.encode(PROMPT)], SamplingParams(max_tokens=24, **GREEDY))[0]


def test_the_port_answers_like_llm_generate_and_survives_bad_input(model, reference):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        unary = client.generate(PROMPT, max_tokens=24, **GREEDY)
        chunks = list(client.stream(PROMPT, max_tokens=24, **GREEDY))
        assert list(unary.token_ids) == list(reference.token_ids) and unary.text == reference.text
        assert [t for c in chunks for t in c.token_ids] == list(reference.token_ids)
        assert "".join(c.text for c in chunks) == reference.text and len(chunks) > 1
        for kw, field in [({"temperature": 1e-45}, "temperature"), ({"max_tokens": 10**6}, "max_tokens")]:
            with pytest.raises(grpc.RpcError) as e:
                client.generate(PROMPT, **kw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details(), kw
            assert not e.value.details().startswith("Unexpected"), e.value.details()  # the message alone
        assert list(client.generate(PROMPT, max_tokens=24, **GREEDY).token_ids) == list(reference.token_ids)
        assert core.metrics.requests[("grpc", "invalid")] == 2 and core.metrics.requests[("grpc", "ok")] == 3
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_a_full_gateway_refuses_at_once_and_a_cancelled_call_frees_its_place(model):  # noqa: F811
    core = Core(*model, max_num_seqs=1, max_queue=0, max_model_len=256)
    core.dispatcher.delay_s = 0.05  # a 200-token request lasts >= 20 s
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        busy = client.stream(PROMPT, max_tokens=200, **GREEDY)
        next(busy)  # running: the only place is taken
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_tokens=2)
        # refused, not queued until the busy one ends (>= 20 s); the bound leaves room for a loaded machine
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 10.0
        assert e.value.details().startswith("the gateway is at capacity"), e.value.details()
        assert dict(e.value.trailing_metadata())["retry-after"] == "1"
        steps = core.runner.stats()["steps"]
        busy.cancel()
        _wait_idle(core)
        assert core.runner.stats()["steps"] - steps < 100  # aborted, not run to its 200 tokens
        core.dispatcher.delay_s = 0.0
        assert client.generate(PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_a_call_the_client_cancels_is_counted_as_http_counts_a_client_that_left(model):  # noqa: F811
    """A cancelled call (a stream after its first response, a unary call while it runs) counts once as
    requests_total{api="grpc", status="cancelled"} and request_errors_total{code="CANCELLED"}, as HTTP counts a
    client that left (cancelled, 499): it was counted in neither, though its TTFT was observed. (Each point of a
    call's life it may leave at: tests/test_cancel_grpc.py.)"""
    from elasticmoe.client import make_request

    core = Core(*model, max_num_seqs=2, max_model_len=256)
    core.dispatcher.delay_s = 0.005  # a 200-token request lasts >= 2 s
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        busy = client.stream(PROMPT, max_tokens=200, **GREEDY)
        next(busy)
        busy.cancel()
        _wait_idle(core)
        unary = client.stub.Generate.future(make_request(PROMPT, max_tokens=200, **GREEDY), timeout=60)
        deadline = time.monotonic() + 10
        while not core.runner.stats()["steps"] or not core.runner.stats()["admitted"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        unary.cancel()
        _wait_idle(core)
        assert core.metrics.requests == {("grpc", "cancelled"): 2} and core.metrics.errors == {"CANCELLED": 2}
        core.dispatcher.delay_s = 0.0
        client.generate(PROMPT, max_tokens=2)
        assert core.metrics.requests == {("grpc", "cancelled"): 2, ("grpc", "ok"): 1}
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_a_server_error_is_internal_without_its_raw_text_and_the_port_keeps_serving(model):  # noqa: F811
    """A bug while serving (injected: the readiness check raises) ends that call INTERNAL with the exception's type
    only (its text stays in the log), unary and streaming alike, counted as an error (code INTERNAL, as HTTP counts
    its 500s: tests/test_metrics_server_errors.py); the next call is served."""
    core = Core(*model, max_num_seqs=2, max_model_len=128)
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)

    async def broken() -> None:
        raise RuntimeError("secret path /etc/internal")
    try:
        core.wait_ready = broken
        for call in (lambda: client.generate(PROMPT, max_tokens=2), lambda: list(client.stream(PROMPT, max_tokens=2))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert e.value.details() == "internal server error (RuntimeError)", e.value.details()
        assert core.metrics.requests == {("grpc", "error"): 2} and core.metrics.errors == {"INTERNAL": 2}  # as HTTP
        core.ready = False
        del core.wait_ready  # the class's: shards not ready
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_tokens=2)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE, "expert shards are not ready")
        core.ready = True
        assert client.generate(PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_stop_drains_the_calls_in_flight_and_refuses_new_ones(model, reference, tmp_path, reserve):  # noqa: F811
    """stop(): new calls are refused at once and the port's claim is let go while the call in flight still runs;
    that call finishes, exact, before stop() returns."""
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    core.dispatcher.delay_s = 0.5  # 24 tokens x 2 layers: about 24 s, until the checks below lift it
    number = reserve()
    port = _port(core, number, app="x", claims=tmp_path)
    client = GenerationClient(port.address, timeout_s=60)
    got: list[int] = []
    ended: list[float] = []

    def read(stream) -> None:
        for c in stream:
            got.extend(c.token_ids)
        ended.append(time.monotonic())

    try:
        stream = client.stream(PROMPT, max_tokens=24, **GREEDY)
        got.extend(next(stream).token_ids)
        reader = threading.Thread(target=read, args=(stream,))
        reader.start()
        assert port.alive()
        stopper = threading.Thread(target=port.stop, args=(60,))
        stopper.start()
        assert _refused(number), "stop() never closed the listener"  # stop() under way (a sleep raced it)
        PortClaim(number, "y", tmp_path).release()  # another application could take the port already
        with pytest.raises(grpc.RpcError) as e:
            GenerationClient(port.address, timeout_s=10).generate(PROMPT, max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # refused while the drain goes on
        assert not ended and 0 < len(got) < 24 and stopper.is_alive()  # ... which it does: mid-stream
        core.dispatcher.delay_s = 0.0  # the rest of the stream at full speed
        stopper.join(timeout=60)
        finished_at_stop = core.metrics.requests.get(("grpc", "ok"), 0)  # the server's side, when stop() returned
        reader.join(timeout=30)
        assert got == list(reference.token_ids) and ended  # drained: not cut
        assert finished_at_stop == 1  # stop() returned only once the call had finished
        assert not port.alive()
    finally:
        client.close()
        core.runner.close()


def test_a_taken_port_names_the_setting(model, tmp_path):  # noqa: F811
    core = Core(*model, max_num_seqs=1, max_model_len=64)
    taken = socket.socket()  # no SO_REUSEPORT: nobody else may bind it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match=rf"direct_grpc: cannot listen on 127\.0\.0\.1:{taken.getsockname()[1]}"):
            _port(core, taken.getsockname()[1], claims=tmp_path)
    finally:
        taken.close()
        core.runner.close()


@pytest.fixture
def reserve():
    """reserve(): a port of 127.0.0.1 held until the test ends: bound (not listening) with SO_REUSEPORT, as the direct
    port binds it. Picking a free port and closing it let another process take it before the test bound it again (a
    busy CI machine); held so, it is refused to anyone else, and no connection reaches this socket."""
    with contextlib.ExitStack() as held:
        def one() -> int:
            s = held.enter_context(socket.socket())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
        yield one


def _refused(number: int, within_s: float = 30.0) -> bool:
    """Whether connections to 127.0.0.1:number are refused within `within_s` (its listener closed)."""
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", number)) != 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_one_applications_replicas_share_the_port_and_another_is_refused(model, tmp_path, reserve):  # noqa: F811
    """Two replicas of app "a" serve one port (SO_REUSEPORT) and 16 client connections reach both; app "b" is
    refused naming "a" while one of them holds it, also after one stopped, and gets it once both have stopped."""
    core = Core(*model, max_num_seqs=4, max_model_len=64)
    core.api_keys = ApiKeys()
    number, served = reserve(), []

    class Counted(GenerationService):  # which replica answered
        def __init__(self, name: str):
            super().__init__(core)
            self.name = name

        async def generate(self, request, grpc_context=None):
            served.append(self.name)
            return await super().generate(request, grpc_context)

    start = (lambda app, name="b": DirectIngress(Counted(name), "127.0.0.1", number, max_rpcs=4, app=app,
                                                claims=tmp_path))
    a1, a2 = start("a", "a1"), start("a", "a2")
    try:
        req = gen.GenerateRequest(prompt=PROMPT, sampling=gen.SamplingParams(max_tokens=1))
        for _ in range(16):  # a connection each (no shared subchannel): the kernel picks a listener per connection
            with grpc.insecure_channel(a1.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert gen_grpc.GenerationStub(ch).Generate(req, timeout=60).usage.completion_tokens == 1
        assert sorted(set(served)) == ["a1", "a2"], served  # all on one: 2 ** -15
        with pytest.raises(OSError, match=rf"direct_grpc: port {number} is already served by application 'a'"):
            start("b")
        a1.stop(0)
        with pytest.raises(OSError, match="application 'a'"):
            start("b")
        a2.stop(0)  # a stopping replica lets the port go at once, before its drain
        b = start("b")  # the files of "a" are still there, but nobody holds them
        b.stop(0)
    finally:
        a1.stop(0)
        a2.stop(0)
        core.runner.close()


def test_a_killed_holder_claims_nothing(tmp_path, reserve):
    """Another process (a gateway replica) holds app "c"'s claim: app "d" is refused; once it is SIGKILLed, "d" gets
    the port (the kernel dropped the lock with the process; its file stays)."""
    number = reserve()  # claims only: no bind
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                              "from pathlib import Path\n"
                              "from elasticmoe.gateway.direct_ingress import PortClaim\n"
                              f"PortClaim({number}, 'c', Path(sys.argv[1]))\nprint('held', flush=True)\n"
                              "time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OSError, match="application 'c'"):
            PortClaim(number, "d", tmp_path)
    finally:
        child.kill()
        child.wait(timeout=30)
    PortClaim(number, "d", tmp_path).release()


def test_application_names_that_differ_only_in_unsafe_characters_claim_apart(tmp_path, reserve):
    """The lock file kept only [A-Za-z0-9_.-] of the application's name: "my app" and "my_app" (or "" and "_")
    took one lock, and the second shared the first one's port silently; now the second is refused naming the
    first, and a long or odd name still gives a short, safe file name."""
    from elasticmoe.gateway.direct_ingress import lock_name

    number = reserve()  # claims only: no bind
    for first, second in [("my app", "my_app"), ("", "_"), ("a/b", "a:b"), ("x" * 300, "x" * 301)]:
        assert lock_name(first) != lock_name(second)
        held = PortClaim(number, first, tmp_path)
        try:
            with pytest.raises(OSError, match=rf"direct_grpc: port {number} is already served by application"):
                PortClaim(number, second, tmp_path)
            PortClaim(number, first, tmp_path).release()  # its own replicas still share it
        finally:
            held.release()
    assert lock_name("my_app") == "my_app" and lock_name("app-1.prod") == "app-1.prod"  # safe names unchanged
    assert all(len(lock_name(n)) <= 64 and "/" not in lock_name(n) for n in ["x" * 300, "a/../b", "例 app"])


def test_direct_grpc_settings_are_checked():
    assert AppArgs(model="m", direct_grpc={"port": 9100}).direct_grpc == DirectGrpc(port=9100)
    assert DirectGrpc(port=9100).host == "127.0.0.1"
    for bad in ({"port": 0}, {"port": 70000}, {"port": 9100, "tls": True}, {"port": 9100, "drain_s": -1}, {}):
        with pytest.raises(ValidationError):
            AppArgs(model="m", direct_grpc=bad)


def test_a_replica_whose_port_server_stopped_fails_its_health_check():
    """README: "A replica whose port server stopped fails its health check" (Serve then replaces it); the port's
    own alive() going false on stop is test_stop_drains_the_calls_in_flight_and_refuses_new_ones."""
    from types import SimpleNamespace

    from elasticmoe.gateway.deployment import Gateway

    def replica(alive: bool | None):
        port = None if alive is None else SimpleNamespace(alive=lambda: alive)
        return SimpleNamespace(core=SimpleNamespace(healthy=lambda: None), direct=port)

    check = Gateway.func_or_class.check_health
    check(replica(None))  # no direct_grpc
    check(replica(True))
    with pytest.raises(RuntimeError, match="direct_grpc server stopped"):
        check(replica(False))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stop_and_a_failed_start_close_their_event_loop(model, tmp_path):  # noqa: F811
    """Each port runs its own asyncio loop (an epoll fd and a self-pipe); stop() and a start that failed close it
    at once, not when the garbage collector happens to find it (the ports stay referenced here to show that)."""
    core = Core(*model, max_num_seqs=1, max_model_len=64)
    taken = socket.socket()  # no SO_REUSEPORT: nobody else may bind it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    kept = []

    def cycle() -> None:
        port = _port(core)
        port.stop(0)
        kept.append(port)
        assert port.loop.is_closed()
        with pytest.raises(OSError, match="cannot listen") as failed:
            _port(core, taken.getsockname()[1], claims=tmp_path)
        kept.append(failed)  # its traceback holds the half-made port and so its loop

    try:
        cycle()  # gRPC opens a few fds of its own once, for the process
        before = _open_fds()
        for _ in range(4):
            cycle()
        assert _open_fds() <= before + 2, (before, _open_fds())  # 4 x ~6 more before the loops were closed
    finally:
        taken.close()
        core.runner.close()
