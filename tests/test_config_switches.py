"""Config switches within the tiny families (elasticmoe.model.tiny's TINY_FAMILIES) that change the structure:
accepted ones give transformers' logits, the others are refused naming the field."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_families import _assert_matches, make_family_checkpoint

CASES = {  # model_type -> (config class, tiny fields, "") as make_family_checkpoint takes them
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8), ""),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                         shared_expert_intermediate_size=64, qkv_bias=True), ""),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8), ""),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8), ""),
}
IDS = torch.tensor([list(range(4, 36))])


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_partial_rotary_factor_is_ignored_where_transformers_rotates_every_dim(tmp_path, model_type):
    """These families' default rotary turns every head dim whatever partial_rotary_factor says (transformers'
    logits equal the checkpoint's without it); we rotated only the first half of each head, far off transformers."""
    from elasticmoe import LLM

    ck = make_family_checkpoint(model_type, tmp_path / "p", case=CASES[model_type], partial_rotary_factor=0.5)
    plain = make_family_checkpoint(model_type, tmp_path / "d", case=CASES[model_type])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()(IDS).logits
        default = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()(IDS).logits
    assert "partial_rotary_factor" in (ck / "config.json").read_text()
    assert torch.equal(ref, default)
    _assert_matches(LLM(str(ck), dtype="float32"), ck, model_type)


def test_partial_rotary_factor_under_another_rope_type_is_refused_naming_it(tmp_path):
    """With a non-default rope_type transformers' initialiser shortens cos/sin to the factor, which Mixtral's
    full-width rotary cannot apply: every forward fails there. It was accepted (and rotated half of each head)."""
    from elasticmoe.model import ModelSpecError, open_model

    rope = dict(rope_type="linear", factor=2.0, rope_theta=10000.0)
    ck = make_family_checkpoint("mixtral", tmp_path / "m", case=CASES["mixtral"], partial_rotary_factor=0.5,
                                rope_parameters=rope)
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        ref(IDS)
    with pytest.raises(ModelSpecError, match=r"config\.partial_rotary_factor=0\.5: .*'mixtral'.*'linear'"):
        open_model(str(ck))


@pytest.mark.parametrize("model_type", ["solar_open", "glm4_moe_lite"])
def test_partial_rotary_factor_is_refused_where_even_the_default_rope_shortens_cos_sin(tmp_path, model_type):
    """These families' default rope shortens cos/sin to partial_rotary_factor, which their full-width rotary cannot
    apply: transformers fails every forward. It was accepted (and every dim rotated), as for Mixtral's default rope."""
    from elasticmoe.model import ModelSpecError, open_model
    from tests.test_families import FAMILY_CASES
    from tests.test_families_more import MORE_CASES

    case = {**FAMILY_CASES, **MORE_CASES}[model_type]
    ck = make_family_checkpoint(model_type, tmp_path / "m", case=case, partial_rotary_factor=0.5)
    assert "partial_rotary_factor" in (ck / "config.json").read_text()
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        ref(IDS)
    with pytest.raises(ModelSpecError, match=rf"config\.partial_rotary_factor=0\.5: .*'{model_type}'.*'default'"):
        open_model(str(ck))


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_a_decoder_sparse_step_of_zero_is_refused_naming_it(tmp_path, model_type):
    """transformers takes each layer index modulo decoder_sparse_step: with 0 it cannot build the model. We took
    it for 1 (every layer MoE) and ran."""
    import json

    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint(model_type, tmp_path / "m", case=CASES[model_type])
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "decoder_sparse_step": 0}))
    with pytest.raises(ZeroDivisionError):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    with pytest.raises(ModelSpecError, match=r"config\.decoder_sparse_step=0: want 1 or more"):
        open_model(str(ck))


@pytest.mark.parametrize("key, value, tensor", [
    ("shared_expert_intermediate_size", 32, "model.layers.0.mlp.shared_expert.gate_proj.weight"),
    ("intermediate_size", 96, "model.layers.1.mlp.gate_proj.weight"),
])
def test_an_mlp_size_unlike_the_configs_is_refused_naming_the_tensor(tmp_path, key, value, tensor):
    """A shared expert (or a dense layer's MLP) stored at another size than config.json gives: transformers refuses
    the checkpoint (size mismatch); we took the size from the tensors and ran."""
    import json

    from elasticmoe.model import CheckpointError, open_model

    ck = make_family_checkpoint("qwen2_moe", tmp_path / "m", case=CASES["qwen2_moe"], mlp_only_layers=[1])
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{re.escape(tensor)}' is \[\d+, 64\], but "
                                              rf"config\.json makes it \[{value}, 64\]"):
        open_model(str(ck))


def test_without_the_shape_check_open_model_imports_no_modeling_code(tmp_path):
    """The expert shards and the controller open the model with check_shapes=False: the family's transformers
    modeling module is not imported (~5 s of CPU in each replica's start, for weights only the gateway loads), and a dense MLP at
    another size than config.json's opens there (the gateway, which loads it, refuses it: the test above)."""
    import json
    import subprocess
    import sys

    from elasticmoe.model import CheckpointError, open_model

    ck = make_family_checkpoint("qwen2_moe", tmp_path / "m", case=CASES["qwen2_moe"], mlp_only_layers=[1])
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    probe = ("import sys; from elasticmoe.model import open_model; open_model(sys.argv[1], check_shapes=False); "
             "print('transformers.models.qwen2_moe.modeling_qwen2_moe' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(ck)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", (out.stdout, out.stderr[-2000:])
    with pytest.raises(CheckpointError, match=re.escape("config.json makes it [96, 64]")):  # the check: refused
        open_model(str(ck))



def test_a_restarted_gateway_reads_the_built_shapes_from_the_cache_and_still_refuses(tmp_path, monkeypatch):
    """The shapes transformers builds from config.json are cached ($ELASTICMOE_CACHE/mlp_shapes, by config, names
    and transformers' version): another process opening a checkpoint of the same config with the check imports no
    modeling module (~3 s of CPU in each gateway's start) and still refuses a dense MLP stored at another size."""
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    from elasticmoe.model import CheckpointError, open_model

    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    good = make_family_checkpoint("qwen2_moe", tmp_path / "m", case=CASES["qwen2_moe"], mlp_only_layers=[1])
    open_model(str(good))  # builds the model on the meta device and caches its shapes
    assert len(list((tmp_path / "cache" / "mlp_shapes").glob("*.json"))) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in good.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    with safe_open(str(good / "model.safetensors"), "pt") as f:  # layer 1's dense MLP cut to 96 of its 128
        t = {k: f.get_tensor(k) for k in f.keys()}
    mlp = "model.layers.1.mlp."
    t.update({mlp + "gate_proj.weight": t[mlp + "gate_proj.weight"][:96].clone(),
              mlp + "up_proj.weight": t[mlp + "up_proj.weight"][:96].clone(),
              mlp + "down_proj.weight": t[mlp + "down_proj.weight"][:, :96].clone()})
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    probe = ("import sys; from elasticmoe.model import CheckpointError, open_model\n"
             "try:\n    open_model(sys.argv[1]); print('opened')\n"
             "except CheckpointError as e:\n    print('refused:', e)\n"
             "print('transformers.models.qwen2_moe.modeling_qwen2_moe' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, (out.stdout, out.stderr[-2000:])
    assert "'model.layers.1.mlp.gate_proj.weight' is [96, 64], but config.json makes it [128, 64]" in lines[0]
    assert lines[1] == "False"  # the cached shapes: no modeling code imported
    for f in (tmp_path / "cache" / "mlp_shapes").glob("*.json"):
        f.write_text("{not json")  # a torn cache entry is built again, not trusted
    with pytest.raises(CheckpointError, match=re.escape("config.json makes it [128, 64]")):
        open_model(str(bad))


def test_a_cached_tiny_model_opens_without_the_modeling_code():
    """open_model("tiny:<family>") as the expert shards and the controller open it (check_shapes=False): a cached
    checkpoint imported elasticmoe.model.tiny, and with it every family's transformers modeling code (~5 s of CPU
    in each replica's start), to make a checkpoint it did not need; now only making one imports it."""
    import subprocess
    import sys

    from elasticmoe.model.embedded import ensure_tiny_model

    ensure_tiny_model("mixtral")  # in the cache (made here if absent)
    probe = ("import sys; from elasticmoe.model import open_model; open_model('tiny:mixtral', check_shapes=False); "
             "print([m for m in ('elasticmoe.model.tiny', 'transformers.modeling_utils') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])

def _per_head_qk_norms(ck) -> None:
    """OLMoE's q_norm / k_norm (over all heads) cut to one head's [head_dim], as a per-head family stores them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: t[:16].clone() if k.endswith(("q_norm.weight", "k_norm.weight")) else t for k, t in tensors.items()},
              str(ck / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("model_type, shape, want", [("qwen3_moe", 16, 8), ("olmoe", 16, 64)])
def test_a_qk_norm_unlike_the_configs_is_refused_naming_the_tensor(tmp_path, model_type, shape, want):
    """Qwen3-MoE's config giving another head_dim (q/k/v/o still fit) than its per-head q_norm: the load went on and
    the first forward failed on a size mismatch naming nothing. OLMoE's norms (over all heads) stored per head ran
    as per-head norms. transformers refuses both checkpoints."""
    import json

    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = make_family_checkpoint(model_type, tmp_path / "m", case=CASES[model_type])
    if model_type == "olmoe":
        _per_head_qk_norms(ck)
    else:
        cfg = json.loads((ck / "config.json").read_text())
        (ck / "config.json").write_text(json.dumps({**cfg, "head_dim": 8, "num_attention_heads": 8,
                                                    "num_key_value_heads": 4}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: 'model\.layers\.0\.self_attn\.q_norm\.weight' is "
                                              rf"\[{shape}\], want \[{want}\]"):
        LLM(str(ck), dtype="float32")


def test_expert_groups_are_ignored_where_transformers_router_has_none(tmp_path):
    """LongCat's transformers router routes over every expert (its zero experts too) whatever n_group / topk_group in
    config.json say; we limited its routing to the topk_group best of n_group groups, far off transformers' logits.
    (Families whose router has no groups and whose spec does not read these keys refuse them by name.)"""
    from elasticmoe import LLM
    from tests.test_families_more import MORE_CASES

    ck = make_family_checkpoint("longcat_flash", tmp_path / "g", case=MORE_CASES["longcat_flash"], n_group=5,
                                topk_group=1)
    assert '"n_group": 5' in (ck / "config.json").read_text()
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "longcat_flash")
