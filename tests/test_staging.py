"""rpc.staging.to_host: CPU tensors pass through; CUDA tensors arrive pinned, equal, after waiting on their stream."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.rpc.staging import to_host

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")


def test_cpu_tensors_pass_through_as_the_same_objects():
    hidden, ids = torch.randn(5, 8, dtype=torch.bfloat16), torch.randint(0, 4, (5, 2))
    out = to_host(hidden, ids)
    assert out[0] is hidden and out[1] is ids


@cuda
def test_cuda_tensors_land_pinned_and_equal():
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # work queued on another stream is not waited for, and not needed
        big = torch.randn(4096, 4096, device="cuda") @ torch.randn(4096, 4096, device="cuda")
    hidden = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16) * 3  # queued on the current stream
    weights = torch.rand(64, 8, device="cuda")
    host_hidden, host_weights = to_host(hidden, weights)
    assert host_hidden.device.type == "cpu" and host_hidden.is_pinned() and host_weights.is_pinned()
    assert torch.equal(host_hidden, hidden.cpu()) and torch.equal(host_weights, weights.cpu())
    side.synchronize()
    assert big.shape == (4096, 4096)
