"""Serve's HTTP proxy hook: a request body over the cap is refused in the proxy (413), before it is held there.

Serve's HTTP proxy reads a request's body from the client as fast as it comes, into a queue in memory, from the moment
it routes the request until the answer is complete, whether the replica reads it or not. The gateway checks the API key
and `limits.max_body_bytes` only once the request has a place on a replica, so a client without a key streamed hundreds
of MiB a second into the proxy while its request waited for one (or for the gateway's 401). Every place that starts
Ray names `middlewares` in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (Serve calls it in each HTTP proxy): BodyCap
answers 413 at once for a Content-Length over ELASTICMOE_PROXY_MAX_BODY_BYTES (4 MiB, the default max_body_bytes),
and for a body without one (chunked) reads no further than the cap: 413, and the proxy drops the request as one whose
client left. It applies to every application of the cluster's proxies.
"""

from __future__ import annotations

import json
import os
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "elasticmoe.rpc.serve_http_proxy:middlewares"
MAX_BODY_ENV = "ELASTICMOE_PROXY_MAX_BODY_BYTES"  # raise it with limits.max_body_bytes
MAX_BODY_BYTES = 4 << 20


def max_body_bytes(environ: dict[str, str] | None = None) -> int:
    """ELASTICMOE_PROXY_MAX_BODY_BYTES, else 4 MiB; ValueError naming it unless a positive byte count."""
    raw = (os.environ if environ is None else environ).get(MAX_BODY_ENV, "").strip()
    if not raw:
        return MAX_BODY_BYTES
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{MAX_BODY_ENV}={raw[:40]!r}: expected a positive number of bytes")
    return int(raw)


def middlewares() -> list:
    """The RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH callback: Starlette middlewares around Serve's HTTP proxy."""
    from starlette.middleware import Middleware

    return [Middleware(BodyCap, max_bytes=max_body_bytes())]


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isascii() and value.isdigit() else None  # not a count: the gateway's 400
    return None


class BodyCap:
    """ASGI middleware: an HTTP request body of more than `max_bytes` is answered 413 (an OpenAI error body, as the
    gateway's) and not read further: at once for its Content-Length, else once that much has come (the app then
    reads the end of the request, and its own answer, if any, is dropped)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            return await self._refuse(send)
        taken, started, refused = 0, False, False

        async def capped() -> dict:
            nonlocal taken, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                taken += len(message.get("body", b""))
                if taken > self.max_bytes:
                    refused = True
                    if not started:  # else the app answered first (a 401, say): its answer stands
                        await self._refuse(send)
                    return {"type": "http.disconnect"}  # the proxy stops reading and ends the request
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            if refused and not started:  # the 413 went out in its place
                return
            started = True
            await send(message)

        await self.app(scope, capped, sending)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"error": {"message": f"the request body is over the limit of {self.max_bytes} bytes",
                                     "type": "invalid_request_error", "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
