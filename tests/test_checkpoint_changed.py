"""A safetensors file changed on disk after the checkpoint was opened (rewritten in place, or replaced before its first
read): a read whose tensor is no longer where the header read at open put it, or whose file holds another
checkpoint's bytes under the same header, fails naming the file and the tensor (a shard's LoadExperts:
FAILED_PRECONDITION), instead of reading other bytes as the weights; the shard serves the experts it holds and loads
again once the file is as it was. Real checkpoints (model.tiny), real gRPC server."""

from __future__ import annotations

import json
import os
import re
import struct

import grpc
import pytest
import torch
from safetensors.torch import load_file

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.model import CheckpointError, open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, decode_tensor
from elasticmoe.rpc.frames import ExpertRequest

E = 4
FILE = "model.safetensors"
W1 = "model.layers.{}.block_sparse_moe.experts.{}.w1.weight"  # [I, H]


def _with_header(raw: bytes, change) -> bytes:
    """The safetensors file `raw` with its JSON header replaced by change(header) (the tensor bytes kept)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(change(json.loads(raw[8:8 + n]))).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + n:]


def _padded(h):  # the same tensors, 64 bytes further on (a longer header: another writer's metadata)
    return {**h, "__metadata__": {**h.get("__metadata__", {}), "note": "x" * 64}}


def _swapped(h):  # layer 1's experts 0 and 1 trade their w1 bytes: the same size, other weights
    a, b = W1.format(1, 0), W1.format(1, 1)
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return h


@pytest.fixture
def shard(tmp_path):
    """A shard over its own tiny checkpoint, holding layer 0's experts 0 and 1 (the file is open)."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)
    files = open_model(str(path))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    server, _, port = start_server(store, "changed")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    stub = pb_grpc.ExpertShardStub(ch)
    _load(stub, [(0, 0), (0, 1)])
    yield stub, store, files, path, f"127.0.0.1:{port}"
    ch.close()
    server.stop(None).wait(10)


def _load(stub, pairs):
    return stub.LoadExperts(pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs]),
                            timeout=30)


def _run_layer0(address, files) -> torch.Tensor:
    """RunExperts of 3 tokens routed to layer 0's experts 0 and 1, through a real unary call: the output [3, H]."""
    torch.manual_seed(0)
    req = ExpertRequest(0, torch.randn(3, files.spec.hidden_size), torch.tensor([[0, 1]] * 3, dtype=torch.int32),
                        torch.full((3, 2), 0.5))
    t = UnaryTransport()
    try:
        return decode_tensor(t.send(address, lambda: req, 10).result(timeout=20).output, copy=True)
    finally:
        t.close()


@pytest.mark.parametrize("change", [_padded, _swapped], ids=["longer-header", "same-size"])
def test_a_file_rewritten_in_place_fails_the_load_naming_it_and_the_shard_serves_on(shard, change):
    """The file the shard has open is rewritten in place (the same inode) with another header: its tensors moved
    64 bytes on (the load read each at its old offset: other bytes, silently) or two experts' bytes swapped (the
    same size: the load read expert 0's weights as expert 1's)."""
    stub, store, files, path, address = shard
    before = _run_layer0(address, files)
    raw = (path / FILE).read_bytes()
    want = load_file(path / FILE)[W1.format(1, 1)]
    with open(path / FILE, "r+b") as f:  # in place: the descriptor the shard holds reads the new bytes
        f.write(_with_header(raw, change))
        f.truncate()
    with pytest.raises(grpc.RpcError) as e:
        _load(stub, [(1, 1)])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
    assert re.search(re.escape(str(path / FILE)) + r": changed on disk since the checkpoint was opened.*"
                     + re.escape(repr(W1.format(1, 1))), e.value.details()), e.value.details()
    assert store.held() == [(0, 0), (0, 1)]
    assert torch.equal(_run_layer0(address, files), before)  # the experts held are served as before
    assert stub.Health(pb.HealthRequest(), timeout=10).ok
    (path / FILE).write_bytes(raw)  # as it was (in place, so a newer mtime): the same header, so it loads again
    assert _load(stub, [(1, 1)]).loaded == 1
    inter = files.spec.moe.intermediate_size
    assert torch.equal(store.snapshot(1).w13[0, :inter], want)  # w1: the gate rows


def _renamed_over_before_the_first_read(tmp_path, replacement, match: str) -> None:
    """The file renamed over by `replacement(tmp_path, raw)`'s bytes between the open and the first read: the read
    fails with CheckpointError matching `match` and holds nothing; the original renamed back, the load reads it (the
    failed read kept no descriptor of the other file)."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)
    files = open_model(str(path))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    raw = (path / FILE).read_bytes()
    (path / "new").write_bytes(replacement(tmp_path, raw))
    os.replace(path / "new", path / FILE)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: changed on disk since the checkpoint was "
                                                        "opened") + match):
        store.load([(0, 1)])
    assert store.held() == []
    (path / "new").write_bytes(raw)
    os.replace(path / "new", path / FILE)
    store.load([(0, 1)])
    inter = files.spec.moe.intermediate_size
    assert torch.equal(store.snapshot(0).w13[0, :inter], load_file(path / FILE)[W1.format(0, 1)])


def test_a_file_replaced_before_its_first_read_fails_the_read_naming_it(tmp_path):
    """The file renamed over (a re-download) between the open, which read its header, and the first read, which opens
    it: read at the old header's offsets, its weights were other bytes. The copy read at open put back in its place
    reads (the failed read kept no descriptor of the other file)."""
    _renamed_over_before_the_first_read(tmp_path, lambda _, raw: _with_header(raw, _padded), "")


def _other_checkpoint(tmp_path, raw: bytes) -> bytes:
    """The file of another tiny Mixtral of the same shapes (another seed): its header is `raw`'s byte for byte, every
    weight another."""
    other = (make_tiny_model("mixtral", tmp_path / "other", layers=2, experts=E, seed=1) / FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert other[:8 + n] == raw[:8 + n] and other != raw and len(other) == len(raw)
    return other


def test_another_checkpoint_of_the_same_shapes_rewritten_in_place_fails_the_load_naming_it(shard, tmp_path):
    """Another checkpoint of the same shapes (a fine-tune, another revision) copied over the file the shard has open:
    the same header, so the load read the other checkpoint's expert and served it beside the first one's, silently."""
    stub, store, files, path, address = shard
    before = _run_layer0(address, files)
    raw = (path / FILE).read_bytes()
    want = load_file(path / FILE)[W1.format(1, 1)]
    (path / FILE).write_bytes(_other_checkpoint(tmp_path, raw))  # in place, as cp does
    with pytest.raises(grpc.RpcError) as e:
        _load(stub, [(1, 1)])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
    assert re.search(re.escape(str(path / FILE)) + r": changed on disk since the checkpoint was opened.*"
                     + re.escape(repr(W1.format(1, 1))) + r".*its tensors hold other bytes", e.value.details()), \
        e.value.details()
    assert store.held() == [(0, 0), (0, 1)] and torch.equal(_run_layer0(address, files), before)
    (path / FILE).write_bytes(raw)  # the first checkpoint's bytes put back: it loads again
    assert _load(stub, [(1, 1)]).loaded == 1
    assert torch.equal(store.snapshot(1).w13[0, :files.spec.moe.intermediate_size], want)


def test_another_checkpoint_of_the_same_shapes_renamed_over_before_its_first_read_fails_the_read(tmp_path):
    """A re-download of another revision, renamed over the file between the open and its first read: read, its
    weights were served as the checkpoint's."""
    _renamed_over_before_the_first_read(tmp_path, _other_checkpoint, r".*its tensors hold other bytes")


def test_another_checkpoint_copied_over_the_file_during_a_read_fails_it(tmp_path, monkeypatch):
    """cp of another checkpoint of the same shapes over the file while a tensor is read (a packed layer takes
    seconds): the file was checked before the read only, so its first bytes came from one checkpoint, the rest from
    the other, and were served as one expert's weights. The rewrite lands half way through the read of expert 1's w2
    (down), the load's last (the real preadv reads each half)."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)
    files = open_model(str(path))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    raw = (path / FILE).read_bytes()
    down = W1.format(0, 1).replace(".w1.", ".w2.")  # [H, I]
    other, want = _other_checkpoint(tmp_path, raw), load_file(path / FILE)[down]
    preadv, start = os.preadv, files.ckpt._meta[down]["start"]

    def rewritten_half_way(fd, buffers, offset):
        (buf,) = buffers
        if offset != start or len(buf) < 2:
            return preadv(fd, buffers, offset)
        half = len(buf) // 2
        n = preadv(fd, [buf[:half]], offset)
        (path / FILE).write_bytes(other)  # in place, as cp does
        return n + preadv(fd, [buf[half:]], offset + half)

    monkeypatch.setattr(os, "preadv", rewritten_half_way)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / FILE}: changed on disk since the checkpoint was "
                                                        "opened") + r".*its tensors hold other bytes"):
        store.load([(0, 1)])
    monkeypatch.undo()
    assert store.held() == []
    (path / FILE).write_bytes(raw)
    store.load([(0, 1)])
    assert torch.equal(store.snapshot(0).w2[0], want)
