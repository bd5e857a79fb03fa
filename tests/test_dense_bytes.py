"""dense_bytes (model/dense_bytes.py): the bytes a DenseModel holds, from config.json and the safetensors headers, agree
with the tensors a real DenseModel loaded on CPU holds (tiny checkpoints of several families, float32 and bfloat16)."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.model import open_model
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.dense_bytes import dense_bytes, rotary_bytes
from elasticmoe.model.tiny import make_tiny_model
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

MAX_LEN = 96
SLACK = 16  # bytes dense_bytes leaves out: embed_scale and the placeholder ids (scalars, a few ids)
# indexer; linear, 1 + w norms; extras; sinks; short conv; Mamba2; lightning (its buffers read, not kept); attention
# experts (float32 router), MoE output bias; KDA (its convs held as one float32 conv); Mamba (v1): -exp(A_log)
FAMILY = ["deepseek_v32", "qwen3_next", "gemma4_text", "gpt_oss", "lfm2_moe", "granitemoehybrid", "minimax", "jetmoe",
          "kimi_linear", "jamba"]


def _held(obj, seen: dict[int, int], visited: set[int]) -> None:
    """Every tensor reachable from obj (attributes, lists, tuples, dicts): storage pointer -> bytes it holds."""
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, (list, tuple, set)):
        for x in obj:
            _held(x, seen, visited)
    elif isinstance(obj, dict):
        for x in obj.values():
            _held(x, seen, visited)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for key, x in vars(obj).items():
            if key not in ("spec", "ckpt", "route_observer"):  # the config and the open files hold no weights
                _held(x, seen, visited)


def _check(path, dtype: torch.dtype) -> int:
    """dense_bytes of the checkpoint at path, after checking it against a DenseModel loaded from it on CPU."""
    files = open_model(path)
    cpu = torch.device("cpu")
    want = dense_bytes(files.spec, files.ckpt, files.names, dtype, cpu, MAX_LEN)
    model = DenseModel(files.spec, files.ckpt, files.names, dtype, cpu, MAX_LEN)
    seen: dict[int, int] = {}
    _held(model, seen, set())
    got = sum(seen.values())
    assert 0 <= got - want <= SLACK, (got, want)
    assert rotary_bytes(files.spec, MAX_LEN) == sum(t.numel() * 4 for t in model.rotary.cos + model.rotary.sin)
    return want


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_bytes")
    return {f: make_tiny_model(f, root / f, layers=3, hidden=32) for f in ("mixtral", "qwen2_moe", "deepseek_v3")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_dense_bytes_are_what_the_loaded_dense_half_holds(tiny_dirs, family, dtype):
    _check(tiny_dirs[family], dtype)


def test_mla_counts_the_float32_copy_of_kv_b_only_where_absorbed_keeps_one(tiny_dirs):
    """bfloat16 MLA: on CPU Absorbed keeps a float32 kv_b beside the bfloat16 one, on CUDA none (mla.Absorbed)."""
    files = open_model(tiny_dirs["deepseek_v3"])
    kv_b = [n.attn["kv_b"] for n in files.names.layers]
    extra = sum(files.ckpt.shape(n)[0] * files.ckpt.shape(n)[1] * 4 for n in kv_b)
    args = (files.spec, files.ckpt, files.names, torch.bfloat16)
    cpu, cuda = dense_bytes(*args, torch.device("cpu"), MAX_LEN), dense_bytes(*args, torch.device("cuda"), MAX_LEN)
    assert extra > 0 and cpu - cuda == extra


@pytest.mark.parametrize("model_type", FAMILY)
def test_dense_bytes_of_more_families(model_type, tmp_path):
    path = make_family_checkpoint(model_type, tmp_path / model_type, case=MORE_CASES.get(model_type))
    _check(path, torch.bfloat16)


def test_the_engine_refuses_a_cache_that_fits_only_without_the_weights(tiny_dirs, monkeypatch):
    """On CUDA the engine compares the KV cache and the dense weights (dense_bytes) with the free memory before it
    allocates either: a cache that would fit an empty device but not beside the weights is refused by name, saying
    the weights' share; weights alone over the free memory are refused as such. The device's free memory is the one
    thing set here (torch.cuda.mem_get_info; no GPU on this machine, so any allocation on it would raise otherwise)."""
    from elasticmoe.engine.engine import Engine
    from elasticmoe.engine.kv_space import GIB, check_fits, num_blocks
    from elasticmoe.model.kv_cache import KVCache

    files, bf16, cuda = open_model(tiny_dirs["mixtral"]), torch.bfloat16, torch.device("cuda")
    weights = dense_bytes(files.spec, files.ckpt, files.names, bf16, cuda, 64)
    cache = KVCache.nbytes(files.spec, bf16, 4, num_blocks(4, 64, None, 16), 16)
    for free, message in ((weights + cache - 1, r"the KV cache \(limits.kv_cache_tokens unset: limits.max_num_seqs 4 "
                           r"x max_model_len 64 tokens, 16 blocks .*\) needs 0.00 GiB and the dense weights 0.00 GiB, "
                           r"0.00 GiB in all, and the device has 0.00 GiB free; lower limits.kv_cache_tokens"),
                          (weights - 1, r"the dense weights need 0.00 GiB .* before any KV cache")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 << 30))
        with pytest.raises(ValueError, match=message):
            Engine(files, None, dtype="bfloat16", device="cuda", max_num_seqs=4, max_model_len=64)
    check_fits(cache, weights + cache, "fits", weights)
    with pytest.raises(ValueError, match=r"needs 2.00 GiB and the dense weights 30.00 GiB, 32.00 GiB in all, and the "
                                         r"device has 31.00 GiB free"):
        check_fits(int(2 * GIB), int(31 * GIB), "sizes", int(30 * GIB))


def test_a_linear_layer_without_its_conv_is_refused_by_name_not_by_dense_bytes(tmp_path):
    """dense_bytes runs before the weights load (Engine): a checkpoint missing a linear layer's conv1d still gets the
    loader's CheckpointError naming it, not a KeyError from the count."""
    from safetensors.torch import load_file, save_file

    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    path = make_family_checkpoint("qwen3_next", tmp_path / "q", case=MORE_CASES["qwen3_next"])
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.linear_attn.conv1d.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 0 lacks linear_attn\.conv1d\.weight"):
        LLM(str(path))
