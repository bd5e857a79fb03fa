"""Config values at their edges (a zero sliding window), held to what transformers does with the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_families import FAMILY_CASES, _assert_matches, make_family_checkpoint

MIXTRAL = ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8), "")
QWEN2_SLIDING = ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                        shared_expert_intermediate_size=64, use_sliding_window=True,
                                        max_window_layers=3), "")


@pytest.mark.parametrize("model_type, case", [("mixtral", MIXTRAL), ("qwen2_moe", QWEN2_SLIDING)])
def test_a_zero_sliding_window_is_refused_naming_the_field(tmp_path, model_type, case):
    """sliding_window=0 on layers that slide: transformers fails every forward (its window mask keeps no key);
    we ran full attention instead, silently. Now the open fails, naming config.sliding_window."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint(model_type, tmp_path / "m", case=case, sliding_window=0)
    assert json.loads((ck / "config.json").read_text())["sliding_window"] == 0
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        ref(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(ModelSpecError, match=r"config\.sliding_window=0: .*1 or more"):
        open_model(str(ck))


def test_a_zero_window_that_is_switched_off_still_loads(tiny_models):
    """Qwen2-MoE writes sliding_window 0 whenever use_sliding_window is false: full attention, as transformers."""
    from elasticmoe import LLM
    from elasticmoe.model import open_model

    ck = tiny_models["qwen2_moe"]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["sliding_window"] == 0 and cfg["use_sliding_window"] is False
    assert set(open_model(str(ck)).spec.attention.sliding_window) == {None}
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "qwen2_moe")


ERNIE = FAMILY_CASES["ernie4_5_moe"]


@pytest.mark.parametrize("norm_min", [0.9, 2.0])
def test_ernie_moe_norm_min_floors_the_top_k_renormalisation(tmp_path, norm_min):
    """Ernie 4.5 divides its top-k weights by max(their sum, moe_norm_min): past the smallest top-k sum (k / E at
    least) it shrinks the routed output. It was taken for a harmless key and ignored."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("ernie4_5_moe", tmp_path / "e", moe_norm_min=norm_min)
    assert json.loads((ck / "config.json").read_text())["moe_norm_min"] == norm_min
    default = make_family_checkpoint("ernie4_5_moe", tmp_path / "d")
    ids = torch.tensor([list(range(4, 36))])
    with torch.no_grad():
        floored = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(default), dtype=torch.float32).eval()(ids).logits
    assert (floored - plain).abs().max() > 1e-3  # transformers' own outputs move with it
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "ernie4_5_moe")


def test_moe_norm_min_is_read_by_ernie_only(tmp_path):
    """Another family's modeling code never reads moe_norm_min: there it stays an inert key (transformers' logits
    equal the default's), accepted as before."""
    from elasticmoe.model import open_model

    ck = make_family_checkpoint("dots1", tmp_path / "d")
    cfg = json.loads((ck / "config.json").read_text())
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    (ck / "config.json").write_text(json.dumps({**cfg, "moe_norm_min": 2.0}))
    stray = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    ids = torch.tensor([list(range(4, 36))])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, stray(ids).logits)
    assert open_model(str(ck)).spec.moe.norm_min == 0.0


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_a_moe_norm_min_that_is_no_number_is_refused_naming_it(tmp_path, value):
    """transformers' config takes None (its clamp then fails every forward), NaN (NaN outputs) and infinity."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint("ernie4_5_moe", tmp_path / "e")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "moe_norm_min": value}))
    with pytest.raises(ModelSpecError, match=r"config\.moe_norm_min=.*: want a finite number"):
        open_model(str(ck))


QWEN2 = ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                shared_expert_intermediate_size=64), "")
DSV3 = ("DeepseekV3Config", dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8,
                                 n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                                 qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4, n_group=4, topk_group=2,
                                 first_k_dense_replace=1), "")


@pytest.mark.parametrize("model_type, case, key, value, error", [
    ("qwen2_moe", QWEN2, "num_experts_per_tok", -1, "selected index k out of range"),
    ("deepseek_v3", DSV3, "n_group", 0, "by zero"),
])
def test_a_routing_size_below_one_is_refused_naming_it(tmp_path, model_type, case, key, value, error):
    """transformers builds these and fails every forward; we ran them (a top-k of -1, one group for n_group 0)."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint(model_type, tmp_path / "m", case=case, **{key: value})
    assert json.loads((ck / "config.json").read_text())[key] == value
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises((RuntimeError, ZeroDivisionError), match=error), torch.no_grad():
        ref(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(ModelSpecError, match=rf"config\.{key}={value}: want 1 or more"):
        open_model(str(ck))


def test_the_served_default_context_fits_the_model_and_a_written_one_is_kept(tiny_models):
    """limits.max_model_len left at its default (2048) serves a model with a shorter context at that context; one
    the operator wrote is passed as written (the engine refuses it beyond the model's context, naming it)."""
    import dataclasses

    from elasticmoe.config import Limits
    from elasticmoe.engine.engine import Engine
    from elasticmoe.gateway.deployment import _max_model_len
    from elasticmoe.model import open_model

    files = open_model(str(tiny_models["mixtral"]))
    short = dataclasses.replace(files.spec, max_position_embeddings=1024)
    assert _max_model_len(Limits(), short) == 1024
    assert _max_model_len(Limits(), files.spec) == 2048
    assert _max_model_len(Limits(max_model_len=512), short) == 512
    assert _max_model_len(Limits(max_model_len=4096), short) == 4096
    with pytest.raises(ValueError, match=r"max_model_len: 4096 is more than the model's context length, 2048"):
        Engine(files, None, max_model_len=4096)


@pytest.mark.parametrize("written", [None, 2048])
def test_the_gateway_sees_whether_max_model_len_was_written(tiny_models, written):
    """The args build_app binds to the gateway (what Serve hands its constructor) keep limits.max_model_len unset
    when the Serve config left it out: the gateway then serves a shorter model context, not a refused 2048; one
    written, even at the default's value, is still passed as written."""
    import dataclasses

    from elasticmoe.app import build_app
    from elasticmoe.config import AppArgs
    from elasticmoe.gateway.deployment import _max_model_len
    from elasticmoe.model import open_model

    limits = {"max_queue": 3} if written is None else {"max_queue": 3, "max_model_len": written}
    plain = build_app({"model": "tiny:mixtral", "limits": limits})._bound_deployment.init_args[0]
    lim = AppArgs.model_validate(plain).limits  # as GatewayCore reads it
    assert lim.max_queue == 3
    short = dataclasses.replace(open_model(str(tiny_models["mixtral"])).spec, max_position_embeddings=1024)
    assert _max_model_len(lim, short) == (1024 if written is None else written)


@pytest.mark.parametrize("topk_group", [0, 2])
def test_a_topk_group_outside_one_group_is_refused_naming_it(tmp_path, topk_group):
    """With n_group 1 transformers' router still keeps the topk_group best groups: 0 masks every expert (it routes
    to arbitrary ones, logits unlike topk_group 1's), 2 fails every forward. We took topk_group for 1 and ran."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint("deepseek_v3", tmp_path / "m", case=DSV3, n_group=1, topk_group=topk_group)
    assert json.loads((ck / "config.json").read_text())["topk_group"] == topk_group
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    ids = torch.tensor([list(range(4, 36))])
    with torch.no_grad():
        if topk_group == 0:
            one = make_family_checkpoint("deepseek_v3", tmp_path / "one", case=DSV3, n_group=1, topk_group=1)
            plain = AutoModelForCausalLM.from_pretrained(str(one), dtype=torch.float32).eval()(ids).logits
            assert (ref(ids).logits - plain).abs().max() > 1e-3
        else:
            with pytest.raises(RuntimeError, match="selected index k out of range"):
                ref(ids)
    with pytest.raises(ModelSpecError, match=rf"config\.topk_group={topk_group}: want 1 to n_group \(1\)"):
        open_model(str(ck))


def test_the_mlp_shape_check_says_why_it_is_skipped(tmp_path, caplog):
    """The MLP shapes are checked against the model transformers builds from config.json on the meta device; where
    transformers cannot build it (here a pad_token_id past the vocabulary) the check was skipped without a word."""
    from elasticmoe.model import open_model

    ck = make_family_checkpoint("ernie4_5_moe", tmp_path / "m")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "pad_token_id": cfg["vocab_size"] + 8}))
    with pytest.raises(AssertionError, match="Padding_idx"):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    with caplog.at_level("WARNING", logger="elasticmoe.model.names"):
        open_model(str(ck))
    assert [r.getMessage() for r in caplog.records if r.name == "elasticmoe.model.names"] == [
        f"{ck / 'config.json'}: dense and shared-expert MLP shapes not checked: transformers cannot build the model "
        "it describes (AssertionError: Padding_idx must be within num_embeddings)"]


@pytest.mark.parametrize("family, path, message", [
    ("mixtral", ("rope_parameters", "rope_theta"), r"config\.rope_parameters\.rope_theta is null"),
    ("deepseek_v3", ("rope_parameters", "rope_theta"), r"config\.rope_parameters\.rope_theta is null"),
    ("deepseek_v3", ("v_head_dim",), r"config\.v_head_dim is null"),
])
def test_a_null_field_the_math_needs_is_refused_naming_it(tmp_path, tiny_models, family, path, message):
    """A rotary base or an MLA head size written as null: transformers fails with a bare TypeError, and so did the
    open (rope_theta) or the model's first build past it (v_head_dim); the open now fails naming the field."""
    import shutil

    from elasticmoe import LLM
    from elasticmoe.model import ModelSpecError

    ck = shutil.copytree(tiny_models[family], tmp_path / "m")
    cfg = json.loads((ck / "config.json").read_text())
    *outer, key = path
    (cfg[outer[0]] if outer else cfg)[key] = None
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match=message):
        LLM(str(ck), dtype="float32")


def test_a_field_of_the_wrong_type_fails_as_a_checkpoint_error_naming_the_file(tmp_path, tiny_models):
    """transformers' config classes reject a null (or mistyped) field their type forbids with huggingface_hub's
    StrictDataclassFieldValidationError, which escaped the open as is (no file named; a shard's load then answered
    INTERNAL): it is now a CheckpointError naming config.json and the field."""
    import shutil

    from elasticmoe.model import CheckpointError, open_model

    ck = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": None}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*'num_key_value_heads'"):
        open_model(str(ck))
