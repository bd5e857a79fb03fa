"""bfloat16 end to end: served greedy tokens equal LLM.generate's on 2 and 3 shards and across a live
re-placement."""

# The experts' weighted sums travel as float64 partials and are combined exactly (model.experts.COMBINE_DTYPE), and each
# expert's rows are computed the same way on whichever shard holds it, so the split of experts over shards cannot change
# a bit of the result.

from __future__ import annotations

import threading
import time

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from tests.serving_util import GRPC, app_entry, deploy, handle, make_skewed_model

pytestmark = pytest.mark.e2e
PROMPTS = ["The expert said", "Once upon a time in a land far away", "Mixture of experts routes tokens", "Zebra"]
MAX_TOKENS = 16
# 2 shards x 5 slots for 8 experts: a rebalance copies the hot experts onto the other shard, and the gateway then
# splits their tokens between the copies (the CPU kernel computes a bf16 row the same way whatever its segment's size)
AUTO = {"min_shards": 2, "max_shards": 2, "rebalance_interval_s": 3600.0, "max_moves": 8, "target_utilization": 1.0,
        "slots_per_shard": 5}


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> dict[str, list[int]]:
    """Deploy bf16 apps with 2 (re-placeable) and 3 shards; prompt -> LLM.generate's bf16 greedy tokens. (No 1-shard
    app: it would split neither a layer's experts nor an expert's tokens, and its 3 replicas take ~30 s to start.)"""
    tmp = tmp_path_factory.mktemp("bf16")
    model = make_skewed_model(tmp / "skew")  # hot experts: a rebalance has load to even out
    deploy(ray_cluster, [app_entry("bf2", model, 2, dtype="bfloat16", autoscaling=AUTO),
                         app_entry("bf3", model, 3, dtype="bfloat16")], tmp / "bf16.yaml")
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    bf16, fp32 = LLM(str(model), dtype="bfloat16"), LLM(str(model))
    # one prompt at a time: every step has the same batch here and on the server (batch composition is not
    # what this test is about: dense GEMMs over a different number of rows may round differently)
    ours = {p: bf16.generate([p], greedy)[0].token_ids for p in PROMPTS}
    theirs = {p: fp32.generate([p], greedy)[0].token_ids for p in PROMPTS}
    # the check means something only if bf16 is not fp32 in disguise: their tokens differ somewhere
    assert ours != theirs, "bf16 and fp32 gave identical tokens"
    return ours


def _greedy(app: str, prompt: str) -> list[int]:
    r = GenerationClient(GRPC, app=app).generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return list(r.token_ids)


def _all(app: str) -> dict[str, list[int]]:
    return {p: _greedy(app, p) for p in PROMPTS}  # one at a time, like the reference


@pytest.mark.parametrize("app", ["bf2", "bf3"])
def test_bf16_tokens_equal_offline_whatever_the_shard_count(app, reference):
    assert _all(app) == reference


def test_bf16_tokens_equal_offline_across_a_live_replacement(reference):
    controller = handle("Controller", "bf2")
    before = controller.status.remote().result()
    stop, seen, errors, spans = threading.Event(), [], [], []

    def traffic():  # requests in flight while experts move
        while not stop.is_set():
            began = time.monotonic()
            try:
                seen.append(_all("bf2"))
            except Exception as e:  # noqa: BLE001 - asserted empty below
                errors.append(repr(e))
            spans.append((began, time.monotonic()))  # when this round of PROMPTS was in flight

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline, event = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            time.sleep(3)  # the controller's stats loop sees the skewed load
            moving = time.monotonic()
            event = controller.rebalance.remote().result()
            moved = time.monotonic()
            if event.get("reason") == "rebalance" and event["version"] > before["version"] and event["moves"] > 0:
                break
        assert event.get("reason") == "rebalance" and event["version"] > before["version"] and event["moves"] > 0, \
            f"the controller never re-placed an expert: {event}"
        time.sleep(2)
    finally:
        stop.set()
        worker.join(timeout=120)
    after = controller.status.remote().result()
    assert after["version"] > before["version"] and after["complete"], (before["version"], after["version"])
    assert max(max(row) for row in after["copies"]) > 1, after["copies"]  # some expert's tokens are now split
    assert not errors, errors[:3]
    assert seen and all(s == reference for s in seen), "a request during the re-placement diverged"
    assert any(a < moved and b > moving for a, b in spans), "no request was in flight while the experts moved"
    assert _all("bf2") == reference, "a request after the re-placement diverged"
