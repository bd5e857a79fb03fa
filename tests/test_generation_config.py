"""The checkpoint's generation_config.json as vLLM reads it: its sampling defaults for the offline LLM and the HTTP
API, over a tiny Mixtral written by transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.gateway.openai_protocol import CompletionRequest, sampling_params
from elasticmoe.model.tiny import make_tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("gc") / "mixtral", layers=1, experts=4)


def _with_generation_config(checkpoint, tmp_path, **values):
    path = tmp_path / "m"
    shutil.copytree(checkpoint, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **values}))
    return LLM(str(path))


def test_a_float_top_k_is_taken_as_the_integer_it_is(checkpoint, tmp_path):
    """generation_config.json files write top_k as 20.0 too; that float made every request that left top_k to the
    checkpoint invalid ("top_k: must be an integer"), offline and over HTTP. It is now top_k 20."""
    llm = _with_generation_config(checkpoint, tmp_path, top_k=20.0, temperature=0.6)
    assert llm.get_default_sampling_params() == SamplingParams(top_k=20, temperature=0.6)
    assert llm.generate(["The expert said"])[0].token_ids
    params = sampling_params(CompletionRequest(prompt="x"), 16, None, llm.engine.generation_defaults)
    assert (params.top_k, params.temperature) == (20, 0.6)
