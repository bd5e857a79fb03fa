"""Checkpoints whose safetensors headers lie, read with clear errors naming the file and the tensor: byte spans that
overlap, leave holes or a tail (safetensors itself, so transformers, refuses such a file; we read one tensor's bytes as
another's), integers where a weight is (numbers converted silently), a packed expert tensor of the wrong rank (a
KeyError), a DBRX matrix of another rank and a LongCat gate_up_proj short of experts (IndexErrors). Real checkpoints
written by transformers (model.tiny, tests.test_families); headers rewritten, tensor bytes kept."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from elasticmoe import LLM
from elasticmoe.model import CheckpointError, open_model
from elasticmoe.model.tiny import make_tiny_model

FILE = "model.safetensors"
W1 = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"  # [I, H] float32, one per expert
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # packed: [E, 2I, H]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lies")
    return {layout: make_tiny_model("mixtral", root / layout, layers=2, experts=4, layout=layout)
            for layout in ("per-expert", "packed")}


def _copy(models, tmp_path, layout: str = "per-expert"):
    return shutil.copytree(models[layout], tmp_path / "m")


def _rewrite(file, change, tail: bytes = b"") -> None:
    """The file's JSON header replaced by change(header); the tensor bytes stay (then `tail` after them)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(change(json.loads(raw[8:8 + n]))).encode()
    header += b" " * (-len(header) % 8)
    file.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:] + tail)


def _overlap(h):  # expert 1's w1 points at expert 0's bytes (its own are then no tensor's)
    h[W1.format(1)]["data_offsets"] = list(h[W1.format(0)]["data_offsets"])
    return h


def _hole(h):  # the norm's entry gone: its bytes between the others belong to no tensor
    del h["model.layers.0.input_layernorm.weight"]
    return h


def _last(h) -> str:
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])


def _past_end(h):  # the last tensor's span runs 4 bytes past the file's end
    begin, end = h[_last(h)]["data_offsets"]
    h[_last(h)]["data_offsets"] = [begin, end + 4]
    h[_last(h)]["shape"] = [(end + 4 - begin) // 4]
    return h


@pytest.mark.parametrize("change, tail, words", [
    (_overlap, b"", re.escape(f"{W1.format(1)!r} data_offsets") + r" \[\d+, \d+\] overlaps " + re.escape(
        repr(W1.format(0)))),
    (_hole, b"", r"'[\w.]+' data_offsets \[\d+, \d+\] leaves 256 bytes after '[\w.]+' no tensor holds"),
    (lambda h: h, b"\0" * 16, r"16 bytes after the last tensor \('[\w.]+'\) that no tensor holds"),
    (_past_end, b"", r"truncated safetensors file \(\d+ bytes, tensors need \d+: '[\w.]+' ends past the file's end"),
    (lambda h: {**h, W1.format(2): {**h[W1.format(2)], "shape": [True, *h[W1.format(2)]["shape"][1:]]}}, b"",
     re.escape(f"{W1.format(2)!r} needs a dtype, a shape")),
], ids=["overlap", "hole", "tail", "past-end", "bool-size"])
def test_a_header_safetensors_refuses_fails_the_open_naming_file_and_tensor(models, tmp_path, change, tail, words):
    path = _copy(models, tmp_path)
    _rewrite(path / FILE, change, tail)
    with pytest.raises(SafetensorError):  # the reference: transformers could not load this file either
        with safe_open(path / FILE, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=re.escape(str(path / FILE)) + ": .*" + words):
        open_model(path)


@pytest.mark.parametrize("layout, name, dtype", [
    ("per-expert", W1.format(3), "I32"),  # the header says so: same bytes, same shape
    ("per-expert", W1.format(3), torch.int8),  # written so: the tensors converted
    ("per-expert", "model.layers.1.block_sparse_moe.experts.2.w2.weight", torch.uint8),
    ("per-expert", "model.layers.0.block_sparse_moe.experts.0.w3.weight", torch.bool),
    ("packed", GATE_UP, torch.int32),
    ("packed", "model.layers.1.mlp.experts.down_proj", torch.int64),
], ids=["I32-header", "I8", "U8", "BOOL", "packed-I32", "packed-I64"])
def test_an_expert_weight_stored_as_integers_fails_the_open_naming_it(models, tmp_path, layout, name, dtype):
    """An expert weight of integers (read as such and converted, silently garbage): only its load failed, in each
    shard that read it, the open passing; now the open fails (headers only), naming the file, tensor and dtype."""
    path = _copy(models, tmp_path, layout)
    if isinstance(dtype, str):
        _rewrite(path / FILE, lambda h: {**h, name: {**h[name], "dtype": dtype}})
    else:
        tensors = load_file(path / FILE)
        tensors[name] = tensors[name].to(dtype)
        save_file(tensors, path / FILE, metadata={"format": "pt"})
    stored = dtype if isinstance(dtype, str) else {torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                                                   torch.int32: "I32", torch.int64: "I64"}[dtype]
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: {name!r} is stored as {stored}, but it is "
                                                        "a weight (floating point)")):
        open_model(path)


def test_an_expert_shard_over_integer_expert_weights_does_not_start(models, tmp_path):
    """The shard started (its server up, registering) and each load of expert 3 failed; now its start fails."""
    from elasticmoe.experts.deployment import ExpertShard

    path = _copy(models, tmp_path)
    _rewrite(path / FILE, lambda h: {**h, W1.format(3): {**h[W1.format(3)], "dtype": "I32"}})
    threads = torch.get_num_threads()  # the replica sets its process's (shard_resources.num_cpus)
    try:
        with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: {W1.format(3)!r} is stored as I32")):
            ExpertShard.func_or_class({"model": str(path), "num_shards": 1, "dtype": "float32", "device": "cpu"}, None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout, name, dtype", [
    ("per-expert", "model.norm.weight", torch.int32),  # a dense weight
    ("per-expert", "model.embed_tokens.weight", torch.int64),
    ("packed", GATE_UP, torch.int32),  # a packed expert tensor, read row by row
])
def test_weights_stored_as_integers_fail_the_load_naming_them(models, tmp_path, layout, name, dtype):
    path = _copy(models, tmp_path, layout)
    tensors = load_file(path / FILE)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path / FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: {name!r} is stored as I")):
        LLM(str(path), dtype="float32")


@pytest.mark.parametrize("shape", [(4, 128), (4,), (), (1, 4, 128, 64)])
def test_a_packed_expert_tensor_of_another_rank_fails_the_open_naming_it(models, tmp_path, shape):
    """gate_up_proj not [E, 2I, H]: the layer was read as per-expert and failed with KeyError 'gate'."""
    path = _copy(models, tmp_path, "packed")
    tensors = load_file(path / FILE)
    tensors[GATE_UP] = torch.ones(shape)
    save_file(tensors, path / FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: {GATE_UP!r} is {list(shape)}, but packed "
                                                        "experts are [experts, out, in]")):
        open_model(path)


@pytest.mark.parametrize("name", ["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight",
                                  "transformer.blocks.0.ffn.experts.mlp.w1"])
def test_a_dbrx_matrix_of_another_rank_fails_the_open_naming_it(tmp_path, name):
    """DBRX's fused Wqkv and experts' w1 / v1 / w2 are [rows, H] matrices the views cut by rows: a scalar one was an
    IndexError in the views (model.renames)."""
    from tests.test_families import make_family_checkpoint
    from tests.test_families_more import MORE_CASES

    path = make_family_checkpoint("dbrx", tmp_path / "dbrx", case=MORE_CASES["dbrx"])
    tensors = load_file(path / FILE)
    tensors[name] = torch.ones(())
    save_file(tensors, path / FILE, metadata={"format": "pt"})
    want = f"{path / FILE}: {name!r} is [], want a [rows, hidden] matrix"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        open_model(path)


@pytest.fixture(scope="module")
def longcat(tmp_path_factory):
    from tests.test_families import make_family_checkpoint
    from tests.test_families_more import MORE_CASES

    return make_family_checkpoint("longcat_flash", tmp_path_factory.mktemp("lc") / "m",
                                  case=MORE_CASES["longcat_flash"], packed=True)


@pytest.mark.parametrize("shape", [(6, 96, 64), (96, 64), ()])
def test_a_longcat_packed_gate_up_too_short_fails_the_open_naming_it(longcat, tmp_path, shape):
    """LongCat's packed gate_up_proj is [8 experts + 2 identity ones, 2I, H] (transformers writes it so); the view
    keeps its first 8 rows without looking (model.renames): 6 rows opened, then an IndexError at the first read of
    expert 6; [96, 64] failed naming the directory and the view ('layer 2's [8, 64]'); a scalar was an IndexError."""
    path = shutil.copytree(longcat, tmp_path / "m")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors = load_file(path / FILE)
    assert list(tensors[name].shape) == [10, 96, 64]
    tensors[name] = tensors[name][:6].clone() if len(shape) == 3 else torch.ones(shape)
    save_file(tensors, path / FILE, metadata={"format": "pt"})
    want = f"{path / FILE}: {name!r} is {list(shape)}, want [experts, 2 x intermediate, hidden] with at least 8"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        open_model(path)


def test_a_header_length_past_safetensors_limit_fails_without_reading_it(models, tmp_path):
    """A length field of 200 MB (within the file: here a sparse one, as a shard of a big model is that large): the
    header was read whole into memory (a garbage length in a 10 GB shard: 10 GB, at every gateway's and shard's
    start), then failed as invalid JSON; safetensors refuses a header over 100 MB before reading it, and so now do we,
    naming the file and the length."""
    path = _copy(models, tmp_path)
    n = 200_000_000
    with open(path / FILE, "r+b") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 64)
    with pytest.raises(SafetensorError, match="header too large"):  # the reference
        safe_open(path / FILE, "pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: corrupt safetensors header: its length field "
                                                        f"says {n} bytes, more than safetensors' limit of 100000000")):
        open_model(path)


def test_a_header_nested_too_deeply_fails_naming_the_file(models, tmp_path):
    """A header of arrays nested 100000 deep (a corrupt file): Python's JSON parser raised RecursionError, naming no
    file (not a CheckpointError: a gateway's start-up failed with a bare traceback)."""
    path = _copy(models, tmp_path)
    raw = (path / FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    deep = b"[" * 100_000 + b"]" * 100_000
    (path / FILE).write_bytes(struct.pack("<Q", len(deep)) + deep + raw[8 + n:])
    with pytest.raises(SafetensorError):  # the reference
        safe_open(path / FILE, "pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: corrupt safetensors header (JSON nested too "
                                                        "deeply)")):
        open_model(path)


def test_a_file_cut_inside_a_tensor_names_the_first_tensor_cut(models, tmp_path):
    """The file ends inside expert 2's w1 (its header whole, as a copy that stopped): the error named the file's last
    tensor (in offset order), which is whole gone, not the one the cut is in; it now names the first tensor cut and
    how many after it are gone."""
    path = _copy(models, tmp_path)
    raw = (path / FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    begin, end = header[W1.format(2)]["data_offsets"]
    after = sum(1 for k, m in header.items() if k != "__metadata__" and m["data_offsets"][0] >= end)
    assert after > 0
    (path / FILE).write_bytes(raw[:8 + n + (begin + end) // 2])
    with pytest.raises(SafetensorError):  # the reference
        safe_open(path / FILE, "pt")
    want = f"{path / FILE}: truncated safetensors file ({8 + n + (begin + end) // 2} bytes, tensors need {len(raw)}: " \
           f"{W1.format(2)!r} ends past the file's end, and the {after} tensors after it)"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        open_model(path)
