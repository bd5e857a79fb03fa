"""Serve's HTTP proxy holds no more than 4 MiB of a request body (elasticmoe.rpc.serve_http_proxy), in process without
Ray: Serve's own HTTP server start (its proxy callback from the environment every place that starts Ray sets, on
uvicorn) in front of Serve's own receive loop (HTTPProxy.proxy_asgi_receive, which reads a body into memory while the
request waits for a gateway place), then the real gateway app (API keys, the tiny model). A client without a key
streaming a large body gets 413 once 4 MiB have come, a Content-Length over 4 MiB gets 413 with no byte read, and a
keyed request still reaches the gateway."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from elasticmoe import local_cluster as lc
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.rpc import serve_http_proxy as shp
from tests.test_api_keys import KEY, core, path  # noqa: F401
from tests.test_direct_ingress import reserve  # noqa: F401

WAIT_S = 3.0  # how long a request waits in the proxy for a gateway place
CHUNK = 1 << 20


class WaitingProxy:
    """What Serve's HTTP proxy does with a request that waits for a place on a gateway replica: its receive loop
    (Serve's code) puts the body into the request's MessageQueue meanwhile; once a place frees (WAIT_S), the gateway
    reads the queue (as a replica does through receive_asgi_messages). A request whose client left first (its
    receive loop ended) is dropped, as Serve drops it (a 499 sends nothing). `held`: the body bytes it read."""

    def __init__(self, gateway):
        self.gateway, self.held = gateway, []

    async def __call__(self, scope, receive, send):
        from ray.serve._private.http_util import MessageQueue
        from ray.serve._private.proxy import HTTPProxy

        queue, n = MessageQueue(), len(self.held)
        self.held.append(0)  # this request's, as it reads them

        async def counted():
            message = await receive()
            self.held[n] += len(message.get("body", b""))
            return message

        task = asyncio.ensure_future(HTTPProxy.proxy_asgi_receive(None, counted, queue))
        await asyncio.wait([task], timeout=WAIT_S)
        if task.done():
            return
        pending: list = []

        async def from_queue():
            while not pending:
                await queue.wait_for_message()
                pending.extend(queue.get_messages_nowait())
            return pending.pop(0)
        try:
            await self.gateway(scope, from_queue, send)
        finally:
            task.cancel()


@pytest.fixture
def proxy(core, monkeypatch, reserve):  # noqa: F811
    """Serve's HTTP server (http_util.start_asgi_http_server) with the middlewares of the proxy callback that
    local_cluster.ray_env() names, around WaitingProxy; yields (port, the WaitingProxy). The port is held
    (reserve) until the test ends and the server binds it beside the holder with SO_REUSEPORT: a port picked free
    and closed could be taken by another process first on a busy machine."""
    from ray.serve._private import http_util
    from ray.serve.config import HTTPOptions

    monkeypatch.setattr(http_util, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
                        lc.ray_env().get(shp.CALLBACK_ENV))
    port = reserve()
    options = http_util.configure_http_middlewares(HTTPOptions(host="127.0.0.1", port=port))
    app, loop = WaitingProxy(build_openai_app(core)), asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    _, server = asyncio.run_coroutine_threadsafe(
        http_util.start_asgi_http_server(app, options, event_loop=loop, enable_so_reuseport=True), loop).result(30)
    yield port, app
    asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _exchange(port: int, head: bytes, body_mib: int = 0) -> tuple[int, bytes]:
    """Send `head`, then up to `body_mib` 1 MiB chunks (chunked) while reading the answer: (status, body)."""
    sock = socket.create_connection(("127.0.0.1", port))
    answer = bytearray()

    def read():
        try:
            while data := sock.recv(1 << 16):
                answer.extend(data)
        except OSError:
            pass
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head)
        for _ in range(body_mib):
            sock.sendall(b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n")
        if body_mib:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the proxy stopped reading and closed: the answer is in
    reader.join(WAIT_S + 30)
    sock.close()
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_chunked_body_without_a_key_is_cut_at_4_mib_in_the_proxy(proxy):
    """Before: the proxy read all 64 MiB into memory while the request waited, and the gateway then answered 401."""
    port, app = proxy
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, body = _exchange(port, head, body_mib=64)
    assert status == 413 and "over the limit of 4194304 bytes" in json.loads(body)["error"]["message"]
    assert app.held and app.held[0] <= shp.MAX_BODY_BYTES + CHUNK, app.held


def test_a_content_length_over_4_mib_is_refused_before_a_byte_is_read(proxy):
    port, app = proxy
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    status, body = _exchange(port, head)
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert app.held == []  # the proxy was never called


def test_a_keyed_request_within_the_cap_reaches_the_gateway(proxy):
    port, app = proxy
    payload = json.dumps({"model": "mixtral", "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    status, body = _exchange(port, head)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    assert app.held == [len(payload)]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status, _ = _exchange(port, head, body_mib=1)  # chunked, within the cap, no key: the gateway's 401
    assert status == 401


@pytest.mark.parametrize("raw, ok", [("", shp.MAX_BODY_BYTES), ("16777216", 16 << 20), ("0", None), ("4MiB", None)])
def test_the_cap_comes_from_its_variable(raw, ok):
    if ok is None:
        with pytest.raises(ValueError, match=shp.MAX_BODY_ENV):
            shp.max_body_bytes({shp.MAX_BODY_ENV: raw})
    else:
        assert shp.max_body_bytes({shp.MAX_BODY_ENV: raw}) == ok


# ----- every place that starts Ray names the callback (as for RAY_SERVE_GRPC_MAX_MESSAGE_SIZE)
def test_ray_env_names_the_callback_and_an_operators_value_wins(monkeypatch):
    monkeypatch.delenv(shp.CALLBACK_ENV, raising=False)
    assert lc.ray_env()[shp.CALLBACK_ENV] == shp.CALLBACK
    monkeypatch.setenv(shp.CALLBACK_ENV, "their.module:hooks")
    assert lc.ray_env()[shp.CALLBACK_ENV] == "their.module:hooks"


@pytest.mark.parametrize("where", ["cluster", "chart", "image"])
def test_the_cluster_configs_the_chart_and_the_image_name_it(where, tmp_path):
    from tests.test_deploy_configs import CLUSTER_FILES, ray_start_envs
    from tests.test_grpc_message_limit import _dockerfile_env, _ray_envs

    if where == "chart":
        envs = _ray_envs() + _ray_envs({"directGrpc": {"enabled": True}})
        assert len(envs) >= 5 and all(env.get(shp.CALLBACK_ENV) == shp.CALLBACK for env in envs), envs
    elif where == "image":
        assert _dockerfile_env().get(shp.CALLBACK_ENV) == shp.CALLBACK
    for path in CLUSTER_FILES if where == "cluster" else ():  # each `ray start`, run by bash up to ray itself
        for _cmd, value, err in ray_start_envs(path, shp.CALLBACK_ENV, tmp_path):
            assert value == shp.CALLBACK, (path.name, err)


def test_the_callback_is_what_serve_imports():
    """Serve's own loader and check of the callback's answer (a list of Starlette middlewares)."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    (mw,) = validate_http_proxy_callback_return(call_function_from_import_path(shp.CALLBACK))
    assert mw.cls is shp.BodyCap and mw.kwargs == {"max_bytes": shp.MAX_BODY_BYTES}


def test_the_chart_gives_the_proxies_a_raised_body_limit():
    from tests.test_grpc_message_limit import _ray_envs

    assert all(shp.MAX_BODY_ENV not in env for env in _ray_envs())  # the default: 4 MiB
    envs = _ray_envs({"limits": {"extra": {"max_body_bytes": 16777216}}})
    assert {env.get(shp.MAX_BODY_ENV) for env in envs} == {"16777216"}
    assert shp.max_body_bytes({shp.MAX_BODY_ENV: envs[0][shp.MAX_BODY_ENV]}) == 16 << 20
