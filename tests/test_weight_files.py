"""Which safetensors files of a checkpoint are read (model.weight_files): those transformers loads, with extra
files of a real hub folder beside them (consolidated.safetensors, an adapter, a draft model) left unread; and, as
transformers, every tensor of those files, wherever the index places it or if it names it at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM
from elasticmoe.model import CheckpointError, open_model
from elasticmoe.model.tiny import make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
SHAPE = dict(layers=2, experts=4)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Mixtrals written by save_pretrained: one file, sharded with an index, and an unrelated one (another
    seed: the same tensor names, other values), whose model.safetensors plays each stray file."""
    root = tmp_path_factory.mktemp("wf")
    return {
        "single": make_tiny_model("mixtral", root / "single", **SHAPE),
        "sharded": make_tiny_model("mixtral", root / "sharded", **SHAPE, max_shard_size="100KB"),
        "other": make_tiny_model("mixtral", root / "other", **SHAPE, seed=1),
    }


def _logits_match_transformers(ck: Path) -> torch.Tensor:
    """Our logits on `ck`, asserted to be transformers' (float32) on the same directory."""
    llm = LLM(str(ck), dtype="float32")
    ids = llm.encode(PROMPT)
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    ours = llm.logits(ids)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    return ours


def _stray(dirs, ck: Path, name: str) -> None:
    shutil.copyfile(dirs["other"] / "model.safetensors", ck / name)


@pytest.mark.parametrize("base", ["single", "sharded"])
@pytest.mark.parametrize("stray", ["consolidated.safetensors", "adapter_model.safetensors", "mtp.safetensors",
                                   "model-00001-of-00002.safetensors"])
def test_stray_safetensors_file_is_not_read(dirs, tmp_path, base, stray):
    """A safetensors file beside model.safetensors, or not named by the index, holding other values of the same
    tensors: transformers ignores it, and so does the load (it used to merge it, or fail on the differing copies)."""
    ck = Path(shutil.copytree(dirs[base], tmp_path / "m"))
    _stray(dirs, ck, stray)
    before = _logits_match_transformers(dirs[base])
    assert torch.equal(_logits_match_transformers(ck), before)
    assert stray not in set(open_model(str(ck)).ckpt.weight_map.values())


def test_model_safetensors_wins_over_an_index_beside_it(dirs, tmp_path):
    """Both model.safetensors and an index with its shards: transformers loads model.safetensors alone."""
    ck = Path(shutil.copytree(dirs["sharded"], tmp_path / "m"))
    _stray(dirs, ck, "model.safetensors")
    ckpt = open_model(str(ck)).ckpt
    assert set(ckpt.weight_map.values()) == {"model.safetensors"} and ckpt.index_file is None
    assert torch.equal(_logits_match_transformers(ck), _logits_match_transformers(dirs["other"]))


def test_shards_without_an_index_fail_naming_them(dirs, tmp_path):
    """No model.safetensors and no index: transformers finds no weights; the load fails naming the files."""
    ck = Path(shutil.copytree(dirs["sharded"], tmp_path / "m"))
    (ck / "model.safetensors.index.json").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(ck))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors and no model\.safetensors\.index\.json, so "
                                              r"which of \['model-00001-of-\d+\.safetensors', "):
        open_model(str(ck))
    for p in ck.glob("*.safetensors"):
        p.unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors and no model\.safetensors\.index\.json"):
        open_model(str(ck))


def test_index_naming_missing_files_fails_naming_them(dirs, tmp_path):
    ck = Path(shutil.copytree(dirs["sharded"], tmp_path / "m"))
    shards = sorted(p.name for p in ck.glob("model-*.safetensors"))
    (ck / shards[0]).unlink()
    (ck / shards[-1]).unlink()
    (ck / shards[-1]).symlink_to(ck / "nowhere")  # a hub cache's link to a blob never downloaded
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: names \['{shards[0]}', "
                                              rf"'{shards[-1]}'\], missing from "):
        open_model(str(ck))


def test_config_transformers_weights_picks_the_file(dirs, tmp_path):
    """config.json's transformers_weights names the weights transformers loads (a file or an index): so here."""
    ck = Path(shutil.copytree(dirs["single"], tmp_path / "m"))
    _stray(dirs, ck, "other.safetensors")
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "transformers_weights": "other.safetensors"}))
    assert torch.equal(_logits_match_transformers(ck), _logits_match_transformers(dirs["other"]))
    shutil.copytree(dirs["sharded"], ck / "sub", ignore=shutil.ignore_patterns("*.json"))
    index = json.loads((dirs["sharded"] / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"sub/{v}" for k, v in index["weight_map"].items()}
    (ck / "sub.index.json").write_text(json.dumps(index))
    (ck / "config.json").write_text(json.dumps({**config, "transformers_weights": "sub.index.json"}))
    with pytest.raises(CheckpointError, match=r"transformers_weights='sub\.index\.json' is not the name of a "):
        open_model(str(ck))
    (ck / "sub.safetensors.index.json").write_text(json.dumps(index))
    (ck / "config.json").write_text(json.dumps({**config, "transformers_weights": "sub.safetensors.index.json"}))
    assert torch.equal(_logits_match_transformers(ck), _logits_match_transformers(dirs["sharded"]))
    (ck / "config.json").write_text(json.dumps({**config, "transformers_weights": "../single/model.safetensors"}))
    with pytest.raises(CheckpointError, match=r"config\.json: transformers_weights='\.\./single/model\.safetensors'"):
        open_model(str(ck))


def test_distributed_checkpoint_shards_are_refused(dirs, tmp_path):
    """Rank-local torch DCP shards: transformers loads them instead of model.safetensors; this load refuses."""
    ck = Path(shutil.copytree(dirs["single"], tmp_path / "m"))
    _stray(dirs, ck, "shard-00000-model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"\['shard-00000-model-00001-of-00001\.safetensors'\] are torch "
                                              "distributed-checkpoint shards"):
        open_model(str(ck))


def _edit_index(dirs, tmp_path, edit) -> tuple[Path, list[str]]:
    """The sharded checkpoint with its index's weight_map edited by edit(weight_map, names) for two tensors (a norm
    and an expert's w1) whose files hold other tensors the index lists (so the files stay listed)."""
    ck = Path(shutil.copytree(dirs["sharded"], tmp_path / "m"))
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = list(weight_map.values())
    names = [next(k for k in weight_map if k.endswith(suffix) and files.count(weight_map[k]) > 1)
             for suffix in ("post_attention_layernorm.weight", ".w1.weight")]
    index["weight_map"] = edit(dict(weight_map), names)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    return ck, names


def test_a_tensor_the_index_leaves_out_loads_as_transformers_loads_it(dirs, tmp_path):
    """An index whose weight_map leaves out tensors that files it lists hold: transformers 5.x loads every tensor
    of those files (nothing missing, the same logits), and so does this load (it did before: this pins it)."""
    ck, names = _edit_index(dirs, tmp_path, lambda wm, names: {k: v for k, v in wm.items() if k not in names})
    assert not set(names) & set(json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"])
    _, info = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.equal(_logits_match_transformers(ck), _logits_match_transformers(dirs["sharded"]))
    assert set(names) <= set(open_model(str(ck)).ckpt.weight_map)


def test_a_tensor_the_index_places_in_another_listed_file_loads_as_transformers_loads_it(dirs, tmp_path):
    """The index places tensors in a listed file that does not hold them while another listed file does:
    transformers loads them from that one (the same logits); this load failed ('has no tensor'). A tensor no listed
    file holds still fails naming it (tests/test_model.py)."""
    def misplace(wm, names):
        return {**wm, **{n: next(f for f in sorted(set(wm.values())) if f != wm[n]) for n in names}}

    ck, _ = _edit_index(dirs, tmp_path, misplace)
    assert torch.equal(_logits_match_transformers(ck), _logits_match_transformers(dirs["sharded"]))
