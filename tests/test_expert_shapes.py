"""Expert weights unlike the config's sizes fail the open (only the headers read), naming the file, the tensor and the
shape the config wants, in either expert layout and whatever dtype the experts are held in; an expert shard over such
a checkpoint does not start. A checkpoint short of an expert, or holding others, fails the open too."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe.model.tiny import make_tiny_model


def _narrowed(tmp_path, layout: str):
    """A tiny qwen3_moe checkpoint (experts of I = 64) whose config.json says moe_intermediate_size 48."""
    ck = make_tiny_model("qwen3_moe", tmp_path / layout, layers=2, layout=layout)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 48}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers refuses it too
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    return ck


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_per_expert_weight_of_another_size_names_its_file(tmp_path, dtype):
    """Held in another dtype than stored (float32 on disk), the error named only the checkpoint directory; it came
    from the load of the experts, and now from the open."""
    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = _narrowed(tmp_path, "per-expert")
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{re.escape(name)}' is \[64, 64\], but "
                                              r"config\.json makes it \[48, 64\] \(hidden size 64, expert "
                                              r"intermediate size 48"):
        LLM(str(ck), dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_packed_expert_row_of_another_size_names_the_shape_the_config_wants(tmp_path, dtype):
    """A packed row of neither [2I, H] nor [H, 2I] was read transposed, so the error wanted [H, 2I] ([64, 96])."""
    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = _narrowed(tmp_path, "packed")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{re.escape(name)}' is \[8, 128, 64\]: rows of "
                                              r"\[128, 64\], but config\.json makes it \[96, 64\] \(or \[64, 96\]\)"):
        LLM(str(ck), dtype=dtype)


@pytest.mark.parametrize("layout", ["per-expert", "packed"])
@pytest.mark.parametrize("key", ["moe_intermediate_size", "hidden_size"])
def test_an_expert_shard_over_experts_of_other_sizes_does_not_start(tmp_path, key, layout):
    """config.json's hidden or expert intermediate size unlike the weights (transformers refuses the checkpoint): an
    expert shard started (its server up, registering) and only each of its loads failed, while the gateway refused to
    start. The shard's start now fails as the gateway's does, at the open (headers only), naming the file, the tensor
    and the sizes config.json gives."""
    from elasticmoe.experts.deployment import ExpertShard
    from elasticmoe.model import CheckpointError

    ck = make_tiny_model("qwen3_moe", tmp_path / layout, layers=2, layout=layout)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, key: 48}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers refuses it too
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    name = ("model.layers.0.mlp.experts.0.gate_proj.weight" if layout == "per-expert" else
            "model.layers.0.mlp.experts.gate_up_proj")
    hidden, inter = (64, 48) if key == "moe_intermediate_size" else (48, 64)
    threads = torch.get_num_threads()  # the replica sets its process's (shard_resources.num_cpus)
    try:
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(ck / 'model.safetensors'))}: '{re.escape(name)}' "
                                                  rf"is .*, but config\.json makes it .*\(hidden size {hidden}, "
                                                  rf"expert intermediate size {inter}"):
            ExpertShard.func_or_class({"model": str(ck), "num_shards": 1, "dtype": "float32", "device": "cpu"}, None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("experts", [6, 10])
def test_packed_experts_of_another_count_fail_the_open_naming_the_file(tmp_path, experts):
    """Packed rows past config.json's experts went unused, and experts past the rows failed only in the shard that
    loaded them; transformers refuses both."""
    from elasticmoe.model import CheckpointError, open_model

    ck = make_tiny_model("qwen3_moe", tmp_path / "m", layers=2, layout="packed")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_local_experts": experts}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: 'model\.layers\.0\.mlp\.experts\.\w+_proj' "
                                              rf"\[8, .*\] holds 8 experts, but config\.json gives layer 0 {experts}"):
        open_model(str(ck))


def _drop(ck, names: set[str]) -> None:
    """Remove tensors from a checkpoint: from their safetensors files, and from the index where there is one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in ck.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k not in names}
        save_file(kept, str(file), metadata={"format": "pt"})
    index = ck / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in names}
        index.write_text(json.dumps(data))


@pytest.mark.parametrize("dropped, shard, where", [
    (("gate_proj", "up_proj", "down_proj"), None, r"model\.safetensors"),
    (("up_proj",), None, r"model\.safetensors"),
    (("gate_proj", "up_proj", "down_proj"), "100KB", r"model\.safetensors\.index\.json"),
])
def test_a_missing_per_expert_tensor_fails_the_open_naming_it(tmp_path, dropped, shard, where):
    """A whole expert missing opened, and failed only in the shard that loaded it ("no weights for expert 3"); one
    missing weight named neither the tensor nor the file."""
    from elasticmoe.model import CheckpointError, open_model

    ck = make_tiny_model("qwen3_moe", tmp_path / "m", layers=2, max_shard_size=shard)
    assert (ck / "model.safetensors.index.json").is_file() == (shard is not None)
    _drop(ck, {f"model.layers.1.mlp.experts.3.{p}.weight" for p in dropped})
    name = f"model.layers.1.mlp.experts.3.{dropped[-1] if len(dropped) == 1 else 'gate_proj'}.weight"
    with pytest.raises(CheckpointError, match=rf"{where}: no tensor '{re.escape(name)}' \(.* of expert 3 of layer 1"):
        open_model(str(ck))


def test_fewer_per_expert_experts_than_the_config_gives_fail_the_open(tmp_path):
    from elasticmoe.model import CheckpointError, open_model

    ck = make_tiny_model("mixtral", tmp_path / "m", layers=2)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 10}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: no tensor 'model\.layers\.0\.block_sparse_moe\."
                                              r"experts\.8\.w1\.weight' \(.*config\.json gives it 10 experts\)"):
        open_model(str(ck))


def test_more_per_expert_experts_than_the_config_gives_fail_the_open_naming_one(tmp_path):
    """config.json gives 6 experts, the file holds 8 per layer: the error named only the checkpoint directory ('layer
    0 holds expert 6, but the config has 6 experts'); it now names the file, the first tensor past the config's
    experts and config.json. transformers refuses it too (the router's shape)."""
    from elasticmoe.model import CheckpointError, open_model

    ck = make_tiny_model("mixtral", tmp_path / "m", layers=2)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 6}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    name = "model.layers.0.block_sparse_moe.experts.6.w1.weight"
    want = f"{ck / 'model.safetensors'}: {name!r} is expert 6 of layer 0, but config.json gives it 6 experts"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        open_model(str(ck))
