"""transport.py's floor: one raw TCP (and Unix) socket echo process (length-prefixed frames), torch- and grpc-free."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

from elasticmoe.rpc.options import tune_malloc  # torch-free
from elasticmoe.rpc.unix_socket import tune  # torch-free

HEADER = struct.Struct("<Q")  # the socket echo's frame: 8-byte little-endian length, then the bytes


def recv_into(conn: socket.socket, view: memoryview) -> None:
    while view:
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("socket echo: peer closed")
        view = view[n:]


def _echo_conn(conn: socket.socket) -> None:
    head, buf = bytearray(HEADER.size), bytearray()
    with conn:
        try:
            while True:
                recv_into(conn, memoryview(head))
                (n,) = HEADER.unpack(head)
                if len(buf) < n:
                    buf = bytearray(n)
                recv_into(conn, memoryview(buf)[:n])
                conn.sendall(head)
                conn.sendall(memoryview(buf)[:n])
        except ConnectionError:
            return


def _accept(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        if lsock.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:  # as the frame listener's
            tune(conn)
        threading.Thread(target=_echo_conn, args=(conn,), daemon=True).start()


def serve(unix: str = "") -> None:
    """Prints its port (and `unix`, a Unix socket path it listens on too), echoes every connection until stdin
    closes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], unix, flush=True)
    if unix:
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        usock.bind(unix)
        usock.listen(16)
        threading.Thread(target=_accept, args=(usock,), daemon=True).start()
    threading.Thread(target=_accept, args=(lsock,), daemon=True).start()
    sys.stdin.read()  # the parent closes stdin to stop us
    if unix:
        os.unlink(unix)
    os._exit(0)


if __name__ == "__main__":
    tune_malloc()  # as every process of the benchmark
    serve(sys.argv[2] if sys.argv[1:2] == ["--unix"] else "")
