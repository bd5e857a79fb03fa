"""What OpenAI clients send and expect beyond the basics, with the official `openai` client over uvicorn and a real
engine: an unknown model is a 404 `model_not_found` (as OpenAI and vLLM answer it), `models.retrieve` works, and
a message's text content parts reach the chat template joined by newlines (as vLLM joins them)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import openai
import pytest

from tests.openai_util import CHAT, MODEL, PROMPT, post_json
from tests.openai_util import model, served  # noqa: F401 - fixtures


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_is_a_404_model_not_found(served, chat, stream):
    """Any name was served by the one model: a client that asked for another model (a typo, or a client set up for
    another server) got this one's answer with no sign of it. OpenAI and vLLM answer 404 model_not_found."""
    core, client = served
    before = core.metrics.requests.get(("http", "invalid"), 0)
    create = client.chat.completions.create if chat else client.completions.create
    kw = {"messages": CHAT} if chat else {"prompt": PROMPT}
    with pytest.raises(openai.NotFoundError) as e:
        create(model="gpt-4o", max_tokens=2, stream=stream, **kw)
    err = e.value.body
    assert e.value.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert err["type"] == "invalid_request_error" and "gpt-4o" in err["message"] and MODEL in err["message"]
    assert core.metrics.requests[("http", "invalid")] == before + 1  # the client's mistake, not a server error
    out = create(model=MODEL, max_tokens=2, stream=stream, **kw)  # the served name is answered
    assert list(out) if stream else out.model == MODEL


def test_a_request_without_a_model_is_served_and_tokenize_checks_the_model(served):
    """As vLLM: `model` may be left out (the one model served); /tokenize and /detokenize check it too."""
    _, client = served
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    status, out = post_json(f"{base}/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and out["model"] == MODEL
    assert post_json(f"{base}/tokenize", {"model": MODEL, "prompt": "hi"})[0] == 200
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        status, out = post_json(base + path, {"model": "nope", **body})
        assert status == 404 and out["error"]["code"] == "model_not_found", (path, out)


def test_the_checkpoint_path_is_an_alias_of_the_served_name(served, model):
    """vLLM (no --served-model-name) serves under the path it was given, and clients set up for it send that path:
    here it was a 404. The path (written with a trailing slash or ./ too) is served, under the served name, on every
    route that takes `model`; /v1/models lists the served name alone (no local path leaks); others stay 404s."""
    _, client = served
    path = model[0]
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    for name in (path, path + "/", path.replace("/mixtral", "/./mixtral")):
        assert client.completions.create(model=name, prompt=PROMPT, max_tokens=2).model == MODEL, name
    chunks = list(client.chat.completions.create(model=path, messages=CHAT, max_tokens=2, stream=True))
    assert chunks and all(c.model == MODEL for c in chunks)
    assert post_json(f"{base}/tokenize", {"model": path, "prompt": "hi"})[0] == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{base}/v1/models/{urllib.parse.quote(path, safe='')}", timeout=10) as r:
        assert json.loads(r.read())["id"] == MODEL
    for other in (path + "x", path.rsplit("/", 1)[0], "/mixtral"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=other, prompt=PROMPT, max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model", other


@pytest.mark.parametrize("model,served_as,name,ok", [
    ("/hf/models--acme--tiny/snapshots/" + "a" * 40, "custom", "custom", True),
    ("/hf/models--acme--tiny/snapshots/" + "a" * 40, "custom", "acme/tiny", True),  # the hub id it was pinned from
    ("/hf/models--acme--tiny/snapshots/" + "a" * 40, "custom", "/hf/models--acme--tiny/snapshots/" + "a" * 40, True),
    ("/hf/models--acme--tiny/snapshots/" + "a" * 40, "custom", "/hf/models--acme--tiny", False),
    ("/hf/models--acme--tiny/snapshots/" + "a" * 40, "custom", "acme", False),
    ("/ckpt/mixtral", None, "/ckpt//mixtral/", True), ("/ckpt/mixtral", None, "mixtral", True),
    ("/ckpt/mixtral", None, "/ckpt", False), ("/ckpt/mixtral", None, "", False),
    ("tiny:mixtral", None, "tiny:mixtral", True), ("tiny:mixtral", "m", "tiny:mixtral", True),
    ("tiny:mixtral", "m", "tiny:dbrx", False),
])
def test_model_aliases(model, served_as, name, ok):
    from types import SimpleNamespace

    from elasticmoe.gateway.openai_protocol import is_served

    assert is_served(name, SimpleNamespace(model=model, served_model_name=served_as)) is ok


def test_models_retrieve_names_the_served_model(served):
    """`client.models.retrieve(name)` (GET /v1/models/{model}) was an 'Invalid URL' 404 even for the served name."""
    _, client = served
    got = client.models.retrieve(MODEL)
    assert (got.id, got.object, got.owned_by) == (MODEL, "model", "elasticmoe")
    assert got.created == client.models.list().data[0].created
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_text_content_parts_are_joined_by_newlines(served):
    """[{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about experts."}] reached the template as
    "Tell meabout experts." (words glued together); vLLM joins text parts with "\\n", so this equals the string
    content "Tell me\\nabout experts." token for token."""
    core, client = served
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about experts."}]
    joined = [{"role": "user", "content": "Tell me\nabout experts."}]
    want = core.tokenizer.apply_chat_template(joined, add_generation_prompt=True, tokenize=True)
    want = list(want if isinstance(want, list) else want["input_ids"])
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    status, out = post_json(f"{base}/tokenize", {"messages": [{"role": "user", "content": parts}]})
    assert status == 200 and out["tokens"] == want
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    b = client.chat.completions.create(messages=joined, **kw)
    assert a.usage.prompt_tokens == len(want) and a.choices[0].message.content == b.choices[0].message.content


BOOKKEEPING = {"store": False, "metadata": {"team": "search"}, "service_tier": "auto", "prompt_cache_key": "k1",
               "safety_identifier": "u-1", "user": "u-1"}


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_openai_bookkeeping_fields_are_accepted_and_change_nothing(served, chat):
    """OpenAI's bookkeeping fields (store, metadata, service_tier, prompt_cache_key, safety_identifier) were 400
    'unrecognized' here, so a client that sets them for OpenAI failed; they change nothing in the tokens, so they
    are accepted and ignored. store: true stays a 400: nothing is stored, so a stored completion could never be
    retrieved."""
    _, client = served
    if chat:
        def create(**kw):
            return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, **kw)
        def text(out):
            return out.choices[0].message.content
    else:
        def create(**kw):
            return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                             extra_body=kw)
        def text(out):
            return out.choices[0].text
    plain = create()
    assert text(create(**BOOKKEEPING)) == text(plain) and text(plain)
    with pytest.raises(openai.BadRequestError) as e:
        create(store=True)
    assert e.value.status_code == 400 and e.value.body["param"] == "store", e.value.body
    assert text(create()) == text(plain)  # and the server goes on serving
