"""transport.py's floor: one raw TCP socket echo process (length-prefixed frames), torch- and grpc-free."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

from elasticmoe.rpc.options import tune_malloc  # torch-free

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


def serve() -> None:
    """Prints its port, echoes every connection until stdin closes."""
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    threading.Thread(target=lambda: sys.stdin.read() and None or os._exit(0), daemon=True).start()
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_echo_conn, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    tune_malloc()  # as every process of the benchmark
    serve()
