"""Frames to a shard on the same host go over the frame listener's Unix socket (mTLS as over TCP): the same answers as
over TCP bit for bit, TCP where the socket cannot be reached or is switched off, a private 0700 directory and an
unguessable 0600 path, removed when the listener closes or swept once its process died."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import unix_socket
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frame_listener import FrameListener
from elasticmoe.rpc.frames import ExpertRequest
from tests.shard_util import E, _inputs, files, halves  # noqa: F401


def _request(files, layer: int, dtype: torch.dtype, seed: int) -> ExpertRequest:  # noqa: F811
    hidden, ids, weights = _inputs(files, seed)
    return ExpertRequest(layer, hidden.to(dtype), (ids % (E // 2)).to(torch.int32), weights, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unix_answers_equal_tcp_bit_for_bit(files, halves, dtype, monkeypatch):  # noqa: F811
    """One transport connected over the Unix socket, one over TCP (ELASTICMOE_FRAME_UNIX=0 at its connect), the
    same requests: the same float64 answers bit for bit, and each kept its family for later calls."""
    layer, address = halves.layers[0], halves.addresses[0]
    unix, tcp = SocketTransport(), SocketTransport()
    try:
        first = _request(files, layer, dtype, 0)
        assert unix.send(address, lambda: first, 10).result(timeout=20).output.data
        monkeypatch.setenv(unix_socket.ENV, "0")
        assert tcp.send(address, lambda: first, 10).result(timeout=20).output.data
        monkeypatch.delenv(unix_socket.ENV)
        assert unix.families[address] == "AF_UNIX" and tcp.families[address] == "AF_INET"
        for seed in range(1, 4):
            req = _request(files, layer, dtype, seed)
            a = decode_tensor(unix.send(address, lambda: req, 10).result(timeout=20).output)
            b = decode_tensor(tcp.send(address, lambda: req, 10).result(timeout=20).output)
            assert a.dtype == torch.float64 and torch.equal(a, b)
        assert unix._conns[address].sock.sock.family.name == "AF_UNIX"  # SerialTLS over the SSLSocket: mTLS
    finally:
        unix.close()
        tcp.close()


def test_a_path_this_process_cannot_reach_falls_back_to_tcp(files, halves):  # noqa: F811
    """Health names a path that does not exist here (a shard in another container or host): the gateway connects
    over TCP and the call is answered."""
    layer, address, servicer = halves.layers[0], halves.addresses[0], halves.servicers[0]
    real = servicer.frame_unix_path
    servicer.frame_unix_path = os.path.join(os.path.dirname(real), "frames-" + "0" * 24 + ".sock")
    assert not os.path.exists(servicer.frame_unix_path)
    t = SocketTransport()
    try:
        req = _request(files, layer, torch.float32, 0)
        assert t.send(address, lambda: req, 10).result(timeout=20).output.data
        assert t.families[address] == "AF_INET"
    finally:
        servicer.frame_unix_path = real
        t.close()


def test_switched_off_on_the_shard_health_names_no_path(files, monkeypatch):  # noqa: F811
    monkeypatch.setenv(unix_socket.ENV, "0")
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    server, servicer, port = start_server(store, "s", insecure=True)
    try:
        assert server.listener.unix_sock is None and servicer.frame_unix_path == "" and servicer.frame_port
    finally:
        server.stop(None).wait(10)


def test_the_socket_is_private_and_removed_at_close(files, halves):  # noqa: F811
    """0600 in a 0700 directory of this user's, named with 96 random bits; the file is gone once the listener
    closes (a gateway finding the path reaches this listener and no other)."""
    listener = FrameListener(halves.servicers[0].serve_frames, "127.0.0.1", [0], insecure=True)
    path = listener.unix_path
    folder = os.lstat(os.path.dirname(path))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    assert len(os.path.basename(path)) == len("frames-.sock") + 24 and path != halves.servicers[0].frame_unix_path
    listener.close().wait(10)
    assert not os.path.exists(path)


@pytest.fixture
def short_tmp():
    """A short temporary directory (pytest's tmp_path is too long for a socket path under it)."""
    path = tempfile.mkdtemp(prefix="emu-", dir="/tmp")
    yield path
    shutil.rmtree(path)


def test_a_private_directory_of_ones_own_is_used(short_tmp, monkeypatch):
    """The control for the refusals below: the same temporary directory, made private here, gets a socket."""
    monkeypatch.setattr(tempfile, "tempdir", short_tmp)
    sock, path = unix_socket.bind()
    try:
        assert sock is not None and os.path.dirname(path) == os.path.join(short_tmp, f"elasticmoe-{os.getuid()}")
    finally:
        sock.close()
        unix_socket.unlink(path)


@pytest.mark.parametrize("case", ["group-readable", "a file", "too long"])
def test_no_unix_socket_where_the_directory_is_not_private(short_tmp, monkeypatch, case):
    """A directory others can enter (or a file in its place: someone planted it) or a path over sockaddr_un's
    length: no Unix socket (frames over TCP), nothing bound."""
    monkeypatch.setattr(tempfile, "tempdir", short_tmp if case != "too long" else os.path.join(short_tmp, "d" * 90))
    folder = os.path.join(tempfile.gettempdir(), f"elasticmoe-{os.getuid()}")
    if case == "group-readable":
        os.mkdir(folder, 0o750)
        os.chmod(folder, 0o750)
    elif case == "a file":
        open(folder, "w").close()
    else:
        os.makedirs(tempfile.gettempdir())
    sock, path = unix_socket.bind()
    assert sock is None and path == ""
    assert case == "too long" or not os.path.isdir(folder) or os.listdir(folder) == []


def test_a_killed_listeners_socket_file_is_swept_a_live_ones_kept(short_tmp, monkeypatch):
    """A process that bound a socket and was killed (SIGKILL: nothing unlinked) leaves its file; the next bind sweeps
    it (its lock file held by nobody), and leaves a live listener's (this process's) alone."""
    monkeypatch.setattr(tempfile, "tempdir", short_tmp)
    live, live_path = unix_socket.bind()
    code = ("import os, signal, sys, tempfile\n"
            f"tempfile.tempdir = {short_tmp!r}\n"
            "from elasticmoe.rpc import unix_socket\n"
            "sock, path = unix_socket.bind()\n"
            "print(path, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    dead_path = proc.stdout.strip()
    assert proc.returncode == -signal.SIGKILL and os.path.exists(dead_path) and dead_path != live_path
    again, again_path = unix_socket.bind()
    try:
        assert not os.path.exists(dead_path) and not os.path.exists(dead_path + ".lock")
        assert os.path.exists(live_path) and os.path.exists(again_path)
        assert unix_socket.sweep(os.path.dirname(live_path)) == 0
    finally:
        for sock, path in ((live, live_path), (again, again_path)):
            sock.close()
            unix_socket.unlink(path)
    assert os.listdir(os.path.dirname(live_path)) == []


@pytest.mark.parametrize("case", ["a private directory", "a directory others can enter", "another file name"])
def test_connect_goes_only_to_a_listeners_socket_in_a_private_directory(short_tmp, case):
    """Health's path alone never points the gateway's writes at another local socket: a listening socket at a path
    bind() would not make (a name of another shape, or in a directory others can enter) is not connected to (the
    gateway uses TCP); the control, the same socket named and placed as bind() does, is."""
    folder = os.path.join(short_tmp, "d")
    os.mkdir(folder, 0o700 if case != "a directory others can enter" else 0o755)
    os.chmod(folder, 0o700 if case != "a directory others can enter" else 0o755)
    name = "frames-" + "ab" * 12 + ".sock" if case != "another file name" else "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(folder, name))
    server.listen(1)
    try:
        conn = unix_socket.connect(os.path.join(folder, name), 5)
        assert (conn is not None) == (case == "a private directory")
        if conn is not None:
            conn.close()
    finally:
        server.close()
