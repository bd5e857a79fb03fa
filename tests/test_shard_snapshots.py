"""An expert shard answers each call from one snapshot of the layer's experts, whatever loads and drops land while
it runs (experts.server._compute, ExpertStore.snapshot / missing / forward)."""

from __future__ import annotations

import torch

from elasticmoe.experts.server import ExpertServicer, _FrameContext
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.codec import encode_tensor
from tests.shard_util import E, files  # noqa: F401

T, H_SEED = 6, 3


def _store(files, pairs) -> ExpertStore:  # noqa: F811
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load(pairs)
    return store


def _request(files, layer: int, experts: tuple[int, int]):  # noqa: F811
    """T tokens each routed to both `experts`, and the single-process answer."""
    g = torch.Generator().manual_seed(H_SEED)
    hidden = torch.randn(T, files.spec.hidden_size, generator=g)
    ids = torch.tensor([list(experts)] * T, dtype=torch.int32)
    weights = torch.rand(T, 2, generator=g)
    ref = LocalDispatcher(_store(files, [(layer, e) for e in experts])).dispatch(layer, hidden, ids, weights).wait()
    req = pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids),
                               topk_weights=encode_tensor(weights))
    return req, ref


def test_a_layer_loaded_then_cut_during_a_call_is_missing_not_silently_skipped(files):  # noqa: F811
    """The call's snapshot holds nothing of the layer; a load of both routed experts lands before the holding check
    and a drop of one of them before the compute. The call must report both missing (its snapshot's answer) or
    answer with both experts' sum, never an output without expert 0's share and no `missing`."""
    l0, l1 = files.spec.moe.moe_layers[:2]
    store = _store(files, [(l0, 0)])  # layer l1 not held when the call takes its snapshot
    servicer = ExpertServicer(store, "snap")
    req, ref = _request(files, l1, (0, 1))
    check, landed = store.missing, []

    def load_check_then_drop(layer, routed, snap=None, **kw):
        landed.append(layer)
        store.load([(l1, 0), (l1, 1)])
        try:
            return check(layer, routed, snap, **kw)
        finally:
            store.drop([(l1, 0)])

    store.missing = load_check_then_drop
    out, missing, _ = servicer._compute(req, _FrameContext)
    assert landed == [l1], "the load and drop were not injected into the call's holding check"
    if missing:
        assert missing == [0, 1]
    else:
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-6)


def test_store_check_and_forward_with_a_snapshot_of_nothing(files):  # noqa: F811
    """missing() and forward() given snap=None (snapshot() found no layer) answer for that snapshot: every routed
    expert missing, zeros; not for the layer as loaded since."""
    l1 = files.spec.moe.moe_layers[1]
    store = _store(files, [])
    snap = store.snapshot(l1)
    store.load([(l1, 0), (l1, 1)])
    hidden, ids = torch.randn(T, files.spec.hidden_size), torch.tensor([[0, 1]] * T)
    assert snap is None and store.missing(l1, store.routed(ids), snap) == [0, 1]
    assert not store.forward(l1, hidden, ids, torch.ones(T, 2), snap).any()
    assert store.missing(l1, store.routed(ids)) == [] and store.forward(l1, hidden, ids, torch.ones(T, 2)).any()


def test_a_drop_rebuilds_each_layer_once(files):  # noqa: F811
    """Dropping 3 experts of one layer and 1 of another rebuilds (copies the rest of) each layer once, not once per
    expert; what stays answers as a store that loaded only it."""
    l0, l1 = files.spec.moe.moe_layers[:2]
    store = _store(files, [(l, e) for l in (l0, l1) for e in range(E)])
    rebuilt, stack = [], store._stack
    store._stack = lambda layer, *a: rebuilt.append(layer) or stack(layer, *a)
    store.drop([(l0, 0), (l1, 5), (l0, 2), (l0, 3), (l0, 2), (7, 0)])  # (l0, 2) twice; layer 7 not held
    assert sorted(rebuilt) == sorted([l0, l1])
    kept = [(l0, e) for e in range(E) if e not in (0, 2, 3)] + [(l1, e) for e in range(E) if e != 5]
    assert store.held() == sorted(kept)
    req, ref = _request(files, l0, (1, 4))
    torch.testing.assert_close(LocalDispatcher(store).dispatch(l0, *_inputs_of(req)).wait(), ref, rtol=1e-6, atol=1e-7)


def _inputs_of(req: pb.RunExpertsRequest):
    from elasticmoe.rpc.codec import decode_tensor

    return decode_tensor(req.hidden), decode_tensor(req.topk_ids), decode_tensor(req.topk_weights)
