"""A tensor stored in two safetensors files of one checkpoint: two differing copies fail the load naming both."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticmoe.model import CheckpointError, open_model
from elasticmoe.model.tiny import make_tiny_model

NAME = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("dup") / "m", layers=2, experts=4,
                           max_shard_size="100KB")


def _add_copy(file, name, value: torch.Tensor) -> None:
    tensors = load_file(file)
    tensors[name] = value
    save_file(tensors, file, metadata={"format": "pt"})


def _placement(ck):
    weight_map = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    return weight_map[NAME], files


def test_differing_copies_in_two_indexed_shards_name_the_tensor_and_both_files(sharded, tmp_path):
    """The index places the embedding in one shard and a later shard holds another copy: transformers silently
    takes the later file's (against the index), this load used to as well; it now fails naming both files."""
    ck = shutil.copytree(sharded, tmp_path / "m")
    home, files = _placement(ck)
    later = files[-1]
    assert later != home
    original = load_file(ck / home)[NAME]
    _add_copy(ck / later, NAME, original + 1.0)
    with pytest.raises(CheckpointError, match=rf"'{NAME}'.*{home}.*{later}"):
        open_model(str(ck))


def test_identical_copies_in_two_shards_load(sharded, tmp_path):
    """A byte-identical second copy is harmless: the checkpoint loads and reads the same tensor."""
    ck = shutil.copytree(sharded, tmp_path / "m")
    home, files = _placement(ck)
    original = load_file(ck / home)[NAME]
    _add_copy(ck / files[-1], NAME, original.clone())
    assert torch.equal(open_model(str(ck)).ckpt.read(NAME), original)


def test_stray_file_beside_model_safetensors_is_not_read(tmp_path):
    """No index: model.safetensors alone is the checkpoint, as for transformers; a stray file holding another copy
    of one of its tensors is never read (its copy neither wins nor fails the load)."""
    ck = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=4)
    assert not (ck / "model.safetensors.index.json").exists()
    original = load_file(ck / "model.safetensors")[NAME]
    save_file({NAME: original * 2.0}, str(ck / "zz-old.safetensors"))
    ckpt = open_model(str(ck)).ckpt
    assert torch.equal(ckpt.read(NAME), original) and set(ckpt.weight_map.values()) == {"model.safetensors"}
