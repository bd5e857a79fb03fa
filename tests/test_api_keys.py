"""API keys at the front door, without Ray: the OpenAI HTTP app (ASGI, in process) answers 401 with an OpenAI error
body, and the gateway's own gRPC handlers, hosted on a real in-process grpc.aio server, answer UNAUTHENTICATED, unless
the request carries a configured key; /health stays open; no checkpoint path and no API docs reach clients."""

from __future__ import annotations


import grpc
import pytest
from fastapi.testclient import TestClient

from elasticmoe.config import AppArgs, default_served_name, served_name
from elasticmoe.engine.engine import Engine
from elasticmoe.gateway.auth import ENV_KEYS, ENV_KEYS_FILE, ApiKeys, Unauthenticated
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from tests.store_util import full_store

KEY, OTHER = "sk-test-0123456789abcdef", "sk-test-rotated-fedcba9876543210"


class Core:
    """What the front door needs of a GatewayCore (tokenizer, runner, args, metrics, api_keys, wait_ready)."""

    def __init__(self, path: str, **args):
        files = open_model(path)
        store = full_store(files)
        engine = Engine(files, LocalDispatcher(store), max_model_len=64, max_num_seqs=4)
        self.tokenizer, self.runner = engine.tokenizer, EngineRunner(engine)
        self.args = AppArgs(model=path, **args)
        self.api_keys = ApiKeys.from_args(self.args, environ={})
        spec = files.spec
        self.metrics = GatewayMetrics("off", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers, use_ray=False)

    async def wait_ready(self) -> None:
        return None


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    from elasticmoe.model.tiny import make_tiny_model

    return str(make_tiny_model("mixtral", tmp_path_factory.mktemp("keys") / "secret-dir" / "mixtral", layers=2,
                               experts=4))


@pytest.fixture(scope="module")
def core(path):
    c = Core(path, api_keys=[KEY])
    yield c
    c.runner.close()


# ----- the key set
def test_keys_from_args_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# rotated monthly\n{OTHER}\n")
    keys = ApiKeys.from_args(AppArgs(model="tiny:mixtral", api_keys=[KEY]),
                             environ={ENV_KEYS: "sk-env-aaaaaaaaaaaaaaaa, x", ENV_KEYS_FILE: str(f)})
    for k in (KEY, OTHER, "sk-env-aaaaaaaaaaaaaaaa", "x"):
        keys.check(f"Bearer {k}")
    for bad in (None, "", KEY, f"Basic {KEY}", "Bearer ", "Bearer sk-nope", f"Bearer {KEY}x", "Bearer rotated",
                "Bearer #"):  # a comment line holds no key
        with pytest.raises(Unauthenticated):
            keys.check(bad)
    assert not ApiKeys().enabled
    ApiKeys().check(None)  # no keys configured: open


def test_key_file_rotates_without_restart_and_fails_closed(tmp_path, monkeypatch):
    import elasticmoe.gateway.auth as auth

    monkeypatch.setattr(auth, "RELOAD_S", 0.0)
    f = tmp_path / "keys"
    f.write_text(KEY + "\n")
    keys = ApiKeys(file=f)
    keys.check(f"Bearer {KEY}")
    f.write_text(OTHER + "\n" + "#" * 8 + "\n")  # new size: seen at once
    keys.check(f"Bearer {OTHER}")
    with pytest.raises(Unauthenticated):
        keys.check(f"Bearer {KEY}")
    f.unlink()
    with pytest.raises(Unauthenticated):  # a missing file admits no one
        keys.check(f"Bearer {OTHER}")


def test_args_reject_weak_keys():
    with pytest.raises(ValueError, match="16 or more"):
        AppArgs(model="tiny:mixtral", api_keys=["short"])
    with pytest.raises(ValueError, match="16 or more"):
        AppArgs(model="tiny:mixtral", api_keys=["has a space in it, long enough"])


def test_served_name_never_a_local_path():
    assert default_served_name("tiny:mixtral") == "tiny:mixtral"
    assert default_served_name("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert default_served_name("/models/hub/models--Qwen--Qwen3-30B-A3B/snapshots/abc123") == "Qwen/Qwen3-30B-A3B"
    assert default_served_name("/home/alice/ckpts/moe-v7") == "moe-v7"
    assert default_served_name("./ckpt") == "ckpt"
    assert served_name(AppArgs(model="/x/y/z", served_model_name="prod-moe")) == "prod-moe"


# ----- HTTP
def test_http_needs_a_key(core, path):
    http = TestClient(build_openai_app(core))
    body = {"model": "mixtral", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer sk-wrong-wrong-wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        r = http.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and err["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text
    assert http.get("/v1/models").status_code == 401
    assert core.metrics.requests[("http", "unauthenticated")] >= 5
    auth = {"Authorization": f"Bearer {KEY}"}
    r = http.post("/v1/completions", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["model"] == "mixtral"
    r = http.get("/v1/models", headers=auth)
    assert [m["id"] for m in r.json()["data"]] == ["mixtral"] and path not in r.text and "secret-dir" not in r.text


def test_health_is_open_and_docs_are_gone(core):
    http = TestClient(build_openai_app(core))
    assert http.get("/health").status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    for p in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(p, headers=auth).status_code == 404, p


def test_openai_client_sends_the_key(core):
    """The official client's api_key is the Bearer key."""
    from openai import AuthenticationError, OpenAI

    http = TestClient(build_openai_app(core), base_url="http://test")
    ok = OpenAI(base_url="http://test/v1", api_key=KEY, http_client=http, max_retries=0)
    assert ok.completions.create(model="mixtral", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    bad = OpenAI(base_url="http://test/v1", api_key="sk-wrong-wrong-wrong", http_client=http, max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.models.list()


# ----- gRPC: the gateway's own handlers behind its direct port (a real grpc.aio server, no Serve replica)
@pytest.fixture(scope="module")
def grpc_address(core):
    ingress = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=16)
    yield ingress.address
    ingress.stop(0)


def _request() -> gen.GenerateRequest:
    return gen.GenerateRequest(prompt="Hello", sampling=gen.SamplingParams(max_tokens=2, temperature=0))


def test_grpc_needs_a_key(grpc_address):
    with grpc.insecure_channel(grpc_address) as ch:
        stub = gen_grpc.GenerationStub(ch)
        for md in ((), (("authorization", "Bearer sk-wrong-wrong-wrong"),), (("authorization", KEY),)):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as e:
                    call(_request(), metadata=md, timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        md = (("authorization", f"Bearer {KEY}"),)
        r = stub.Generate(_request(), metadata=md, timeout=60)
        assert r.usage.completion_tokens == 2
        assert sum(len(x.token_ids) for x in stub.GenerateStream(_request(), metadata=md, timeout=60)) == 2


def test_python_client_sends_the_key(grpc_address):
    from elasticmoe.client import GenerationClient

    client = GenerationClient(grpc_address, api_key=KEY)
    try:
        assert client.generate("Hello", max_tokens=1, temperature=0).usage.completion_tokens == 1
    finally:
        client.close()
    client = GenerationClient(grpc_address)
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.generate("Hello", max_tokens=1)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()


# ----- keys no header can carry
BAD = "sk-cl\u00e9-0123456789abcdef"  # HTTP sends header bytes, read as latin-1: this key could never match


def test_keys_no_header_can_carry_are_refused_at_startup(tmp_path):
    with pytest.raises(ValueError, match=f"{ENV_KEYS}: .*printable ASCII"):
        ApiKeys.from_args(AppArgs(model="tiny:mixtral"), environ={ENV_KEYS: f"{KEY},{BAD}"})
    with pytest.raises(ValueError, match="printable ASCII"):
        ApiKeys([BAD])
    f = tmp_path / "keys"
    f.write_text(f"{KEY}\n{BAD}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{f}:2: .*printable ASCII") as e:
        ApiKeys(file=f)
    assert BAD not in str(e.value) and KEY not in str(e.value)  # a key never reaches a log


def test_a_rotated_key_no_header_can_carry_is_dropped_and_logged(tmp_path, monkeypatch, caplog):
    import elasticmoe.gateway.auth as auth

    monkeypatch.setattr(auth, "RELOAD_S", 0.0)
    f = tmp_path / "keys"
    f.write_text(KEY + "\n")
    keys = ApiKeys(file=f)
    f.write_text(f"{OTHER}\n{BAD}\n", encoding="utf-8")
    keys.check(f"Bearer {OTHER}")  # the good keys of the file still admit
    with pytest.raises(Unauthenticated):
        keys.check(f"Bearer {BAD}")
    assert f"{f}:2" in caplog.text and BAD not in caplog.text


def test_http_non_ascii_authorization_is_401(core):
    http = TestClient(build_openai_app(core))
    r = http.get("/v1/models", headers={"Authorization": f"Bearer {BAD}".encode("utf-8")})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("env", [{ENV_KEYS: ""}, {ENV_KEYS: " , \n"}, {ENV_KEYS: "# no key yet"}, {ENV_KEYS_FILE: ""}])
def test_a_key_variable_set_without_a_key_does_not_open_the_api(env):
    """docs/DEPLOY.md: the proxies answer without a key unless ELASTICMOE_API_KEYS is set; set but holding no key
    (an unset shell variable expanded into it, say) refuses to start rather than serve everyone."""
    with pytest.raises(ValueError, match=f"{next(iter(env))} is set but holds no key"):
        ApiKeys.from_args(AppArgs(model="tiny:mixtral"), environ=env)
    keys = ApiKeys.from_args(AppArgs(model="tiny:mixtral", api_keys=[KEY]), environ=env)  # the args hold one
    keys.check(f"Bearer {KEY}")
    assert not ApiKeys.from_args(AppArgs(model="tiny:mixtral"), environ={}).enabled  # unset: no keys, open


# ----- the key is checked first (docs/SECURITY.md: "HTTP: before the body is read; gRPC: before the request is
# validated"): a request without a key that is also bad in another way is a 401 / UNAUTHENTICATED, never told why else
def test_http_checks_the_key_before_reading_the_body(core):
    import asyncio

    from tests.doc_util import REPO

    assert "HTTP: before the body is read" in (REPO / "docs" / "SECURITY.md").read_text()
    app, reads, sent = build_openai_app(core), [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{not json", "more_body": False}

    async def send(message):
        sent.append(message)

    for length in (b"9", b"abc", b"99999999999"):  # otherwise a 400 (bad JSON, Content-Length not a count) or a 413
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", length)],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        sent.clear()
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 401 and reads == [], (length, sent[0]["status"])


def test_grpc_checks_the_key_before_validating_the_request(grpc_address):
    bad = [gen.GenerateRequest(prompt="Hello", request_id="forged\nline", sampling=gen.SamplingParams(max_tokens=2)),
           gen.GenerateRequest(prompt="", sampling=gen.SamplingParams(max_tokens=2)),
           gen.GenerateRequest(prompt="Hello", sampling=gen.SamplingParams(max_tokens=2, temperature=-1))]
    with grpc.insecure_channel(grpc_address) as ch:
        stub = gen_grpc.GenerationStub(ch)
        for request in bad:
            with pytest.raises(grpc.RpcError) as e:  # with the key: refused as invalid (the control holds that)
                stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, request


@pytest.mark.parametrize("key", [BAD, "sk-line\n0123456789abcdef", "sk-tab\t0123456789abcdef"])
def test_the_cli_names_a_key_no_metadata_can_carry_in_one_line(grpc_address, key, capsys, monkeypatch):
    """gRPC refused such a key itself: "INTERNAL: Invalid metadata" after a C-core trace on stderr, naming neither
    the flag nor the variable; now the client refuses it first, naming where it came from (never the key)."""
    from elasticmoe.cli import main
    from elasticmoe.client import GenerationClient

    monkeypatch.delenv("ELASTICMOE_API_KEY", raising=False)
    assert main(["generate", "Hello", "--address", grpc_address, "--max-tokens", "1", "--api-key", key]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elasticmoe generate: error: ")
    assert "--api-key: an API key must be printable ASCII" in err and key not in err
    monkeypatch.setenv("ELASTICMOE_API_KEY", key)
    with pytest.raises(ValueError, match="^ELASTICMOE_API_KEY: an API key must be printable ASCII") as e:
        GenerationClient(grpc_address)
    assert key not in str(e.value)
    with pytest.raises(ValueError, match="^api_key: an API key must be printable ASCII"):
        GenerationClient(grpc_address, api_key=key)


@pytest.mark.parametrize("ca", [b"", b"\n  \n"])
def test_empty_root_certificates_are_refused_not_plaintext(ca):
    """GenerationClient(tls=<CA bytes>) with the bytes of an empty file (a CA not mounted yet) made a plaintext
    channel (b"" is falsy): the key went out in the clear, as the HTTP/2 preface's headers, before the TLS server
    hung up. Now a ValueError naming tls."""
    from elasticmoe.client import GenerationClient

    with pytest.raises(ValueError, match="^tls: "):
        GenerationClient("127.0.0.1:1", api_key=KEY, tls=ca)


@pytest.mark.parametrize("timeout", ["1e10", "1e300"])
def test_a_timeout_grpc_cannot_keep_is_refused_naming_it(grpc_address, timeout, capsys):
    """gRPC's deadline (now + timeout, as int64 nanoseconds) overflowed past some 7e9 s: `generate --timeout 1e10`
    (meant as "no limit") failed at once with DEADLINE_EXCEEDED. Now the flag and GenerationClient(timeout_s=) refuse
    more than MAX_TIMEOUT_S (1e9 s), naming themselves; that much still answers."""
    from elasticmoe import client
    from elasticmoe.cli import main

    argv = ["generate", "Hello", "--address", grpc_address, "--api-key", KEY, "--max-tokens", "1", "--timeout"]
    with pytest.raises(SystemExit) as e:
        main(argv + [timeout])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--timeout: must be at most 1e+09 seconds" in err, err
    with pytest.raises(ValueError, match="^timeout_s: must be at most"):
        client.GenerationClient(grpc_address, api_key=KEY, timeout_s=float(timeout))
    assert client.MAX_TIMEOUT_S == 1e9 and main(argv + ["1e9"]) == 0
    assert client.GenerationClient(grpc_address, api_key=KEY, timeout_s=1e9).generate("Hello", max_tokens=1).text
