"""How frames are written: every kind of tensor encodes to the same bytes (the inline path for plain contiguous CPU
tensors and the general one), and a frame the socket takes in pieces (partial sendmsg) still arrives whole."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.frames import ExpertRequest, WireTensor


def _forms(t: torch.Tensor) -> dict[str, object]:
    """The same values as a plain tensor, a non-contiguous view, a tensor requiring grad, a Parameter, a WireTensor."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    return {"plain": t, "strided": wide[:, ::2], "grad": t.clone().requires_grad_(t.is_floating_point()),
            "parameter": torch.nn.Parameter(t.clone(), requires_grad=False),
            "wire": WireTensor(memoryview(t.view(torch.uint8).numpy()).cast("B"), str(t.dtype)[6:], tuple(t.shape))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
def test_every_tensor_form_encodes_to_the_same_frame(dtype):
    hidden = (torch.randn(3, 5) * 100).to(dtype)  # [T, H]
    ids, weights = torch.tensor([[1], [0], [2]], dtype=torch.int32), torch.rand(3, 1)  # [T, k]
    want = frames.encode_request(9, 4, hidden, ids, weights, placement_version=7, step=2)
    for name, form in _forms(hidden).items():
        assert frames.encode_request(9, 4, form, ids, weights, placement_version=7, step=2) == want, name
        assert frames.encode_reply(9, form, [3, 1], 11, 7) == frames.encode_reply(9, hidden, [3, 1], 11, 7), name
    got = frames.decode_request(want)
    assert (got.id, got.layer, got.placement_version, got.step) == (9, 4, 7, 2)
    assert torch.equal(torch.frombuffer(got.hidden.data, dtype=dtype).view(3, 5), hidden)


def test_three_dims_are_refused_on_either_path():
    for t in (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4).transpose(0, 1)):
        with pytest.raises(ValueError, match="at most 2 dims"):
            frames.encode_request(1, 0, t, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))


def test_a_frame_written_in_pieces_arrives_whole():
    """A 4 MiB frame over a real socket whose every sendmsg writes at most ~100 KB (as the kernel may, on a full
    buffer or a timeout after some progress): send_parts goes on with the rest, the tensors' views included; the
    reader gets exactly request_frame's bytes."""
    hidden = torch.randn(1024, 1024)  # [T, H] fp32: 4 MiB
    req = ExpertRequest(3, hidden, torch.zeros(1024, 2, dtype=torch.int32), torch.ones(1024, 2))
    a, b = socket.socketpair()
    got, calls = bytearray(), []

    def read() -> None:
        while chunk := b.recv(1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        frame_socket.send_parts(_Partial(a, calls, 100_003), frames.request_parts(5, req))
        a.shutdown(socket.SHUT_WR)
        reader.join(30)
    finally:
        a.close()
        b.close()
    assert len(calls) > 40  # 4 MiB in pieces of 100 KB: it went through the partial-write loop
    assert bytes(got) == frames.request_frame(5, req)


class _Partial:
    """A socket whose sendmsg writes at most `most` bytes of what it is given (socket.socket's own methods cannot be
    replaced); `calls` counts them."""

    def __init__(self, sock: socket.socket, calls: list, most: int):
        self._sock, self._calls, self._most = sock, calls, most

    def sendmsg(self, buffers) -> int:
        self._calls.append(len(buffers))
        out, left = [], self._most
        for buf in buffers:
            view = memoryview(buf).cast("B")[:left]
            out.append(view)
            left -= len(view)
            if not left:
                break
        return self._sock.sendmsg(out)
