"""The chart's `limits.extra`: every field of the app's `limits` reachable from Helm values, passed through as
written, duplicates of the typed camelCase values refused at render, unknown or bad ones refused by the app."""

from __future__ import annotations

import re

import helm_python as helm  # helm-python-sdk (dev dependency): Helm's Go SDK as a shared library
import pytest
import yaml

from elasticmoe.app import resolve_args
from elasticmoe.config import Limits
from tests.helm_util import _chart, _check_rayservice, _objects, _one, _render

TYPED = {"max_num_seqs": "maxNumSeqs", "max_model_len": "maxModelLen", "max_queue": "maxQueue",
         "max_num_batched_tokens": "maxNumBatchedTokens", "expert_timeout_s": "expertTimeoutSeconds"}


def _limits_args(extra: dict) -> dict:
    """The `limits` of the rendered RayService's app args (serveConfigV2 as KubeRay gets it)."""
    rs = _one(_objects(_render({"limits": {"extra": extra}})), "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["limits"]


def test_extra_limits_reach_the_app_args():
    rs = _one(_objects(_render({"limits": {"extra": {"transport": "stream", "failover_s": 12}}})), "RayService")
    args = _check_rayservice(rs)  # KubeRay's CRD, Serve's schema, then AppArgs.model_validate
    assert (args.limits.transport, args.limits.failover_s) == ("stream", 12.0)
    raw = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["limits"]
    assert raw["transport"] == "stream" and raw["failover_s"] == 12
    assert raw["max_num_seqs"] == 16, "the typed values stay beside the extra ones"


def test_every_untyped_limit_is_settable():
    """Each Limits field the chart has no camelCase value for, set to a value other than its default (large
    integers too, which Helm holds as float64), comes out in the app's limits unchanged."""
    want = {"micro_batches": 3, "transport": "unary", "failover_s": 7.5, "max_ongoing_requests": 120,
            "max_queued_requests": 1000, "max_stop_strings": 4, "max_stop_len": 64, "max_request_id_len": 128,
            "max_prompt_bytes": 8388608, "max_prompt_tokens": 4000, "max_logprobs": 5, "max_body_bytes": 16777216,
            "max_stop_token_ids": 8, "max_logit_bias": 300, "kv_cache_tokens": 65536, "kv_block_size": 32,
            "prefix_caching": False}
    assert set(want) == set(Limits.model_fields) - set(TYPED), "a new Limits field: add it here"
    raw = _limits_args(want)
    parsed = Limits.model_validate(raw)
    for name, value in want.items():
        assert raw[name] == value and type(raw[name]) is type(value), name
        assert getattr(parsed, name) == value != Limits.model_fields[name].default, name


@pytest.mark.parametrize("key", list(TYPED))
def test_extra_duplicating_a_typed_limit_fails_the_render(key):
    with pytest.raises(helm.HelmError, match=re.escape(f"limits.extra.{key} duplicates limits.{TYPED[key]}")):
        _render({"limits": {"extra": {key: 8, "transport": "stream"}}})


@pytest.mark.parametrize("extra, field", [
    ({"transprot": "stream"}, "limits.transprot"),
    ({"transport": "carrier-pigeon"}, "limits.transport"),
    ({"failover_s": 0}, "limits.failover_s"),
])
def test_unknown_or_bad_extra_limit_fails_the_app_naming_it(extra, field):
    """The chart passes the key on (only the app knows its fields); the app's deploy-time validation
    (build_app -> resolve_args) refuses it, naming the field."""
    rs = _one(_objects(_render({"limits": {"extra": extra}})), "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["limits"].items() >= extra.items()
    with pytest.raises(ValueError, match=r"elasticmoe app args: .*\n%s\n" % re.escape(field)):
        resolve_args(args)


@pytest.mark.parametrize("extra", ["transport=stream", ["transport"], {"failoverS": 12}, {"Transport": "x"}],
                         ids=["string", "list", "camel-key", "capital-key"])
def test_schema_wants_a_map_of_snake_case_keys(extra):
    with pytest.raises(helm.HelmValuesError, match="extra"):
        _chart().validate_schema({"limits": {"extra": extra}})
