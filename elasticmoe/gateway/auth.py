"""API keys of the front door: `Authorization: Bearer <key>` on HTTP (401) and in gRPC metadata (UNAUTHENTICATED)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

ENV_KEYS = "ELASTICMOE_API_KEYS"  # keys separated by commas or whitespace (a Secret as env)
ENV_KEYS_FILE = "ELASTICMOE_API_KEYS_FILE"  # a file of keys, one a line (a mounted Secret)
OPEN_PATHS = frozenset({"/health"})  # answered without a key
RELOAD_S = 1.0  # the key file is checked for changes at most this often


class Unauthenticated(Exception):
    """No valid API key: HTTP 401, gRPC UNAUTHENTICATED."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _carried(key: str, where: str) -> str:
    """`key`, unless no Authorization header can carry it (not printable ASCII: HTTP reads header bytes as latin-1,
    gRPC metadata is ASCII), so it would never match: ValueError naming `where` (never the key)."""
    if key.isascii() and key.isprintable():
        return key
    raise ValueError(f"{where}: an API key must be printable ASCII (no header can carry other characters)")


def _split(text: str, where: str | Path, strict: bool = True) -> list[str]:
    """Keys separated by commas, spaces or newlines; a line starting with # is a comment. A key no header can carry
    (_carried) raises ValueError naming `where` (a file: and its line), or, not `strict`, is logged and left out."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for k in [] if line.lstrip().startswith("#") else line.replace(",", " ").split():
            try:
                out.append(_carried(k, f"{where}:{n}" if isinstance(where, Path) else str(where)))
            except ValueError as e:
                if strict:
                    raise
                log.error("API keys: %s; that key is left out", e)
    return out


class ApiKeys:
    """The accepted keys: static ones (args, env) and those of a file, re-read when it changes (rotation without a
    restart). Only SHA-256 digests are kept; a presented key is compared with each in constant time. A file that
    cannot be read admits no one (fails closed)."""

    def __init__(self, keys: Iterable[str] = (), file: str | Path | None = None):
        self._static = {_digest(_carried(k, "api_keys")) for k in keys}
        self.file = Path(file) if file else None
        self._from_file: set[bytes] = set()
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.file is not None:
            self._reload(strict=True)

    @classmethod
    def from_args(cls, args: Any, environ: dict[str, str] | None = None) -> "ApiKeys":
        """AppArgs.api_keys + ELASTICMOE_API_KEYS; AppArgs.api_keys_file, else ELASTICMOE_API_KEYS_FILE. Either
        variable set but holding no key (an unset shell variable expanded into it) while nothing else gives one is a
        ValueError: set means keys are wanted, so it never opens the API to everyone."""
        env = os.environ if environ is None else environ
        keys = list(getattr(args, "api_keys", None) or []) + _split(env.get(ENV_KEYS, ""), ENV_KEYS)
        out = cls(keys, getattr(args, "api_keys_file", None) or env.get(ENV_KEYS_FILE) or None)
        for name in (ENV_KEYS, ENV_KEYS_FILE):
            if name in env and not out.enabled:
                raise ValueError(f"{name} is set but holds no key; give it one, or unset it to serve without keys")
        return out

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self.file is not None

    def _reload(self, strict: bool = False) -> None:
        """Re-read the file if it changed; `strict` (at startup): a key no header can carry raises ValueError."""
        try:
            st = self.file.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp:
                self._from_file = {_digest(k) for k in _split(self.file.read_text(), self.file, strict)}
                self._stamp = stamp
                if not self._from_file:
                    log.warning("API keys: %s holds no key; every request is refused", self.file)
        except (OSError, UnicodeError) as e:
            if self._stamp is not None or not self._checked:
                log.error("API keys: cannot read %s (%s); every request with a key of it is refused", self.file, e)
            self._from_file, self._stamp = set(), None

    def _digests(self) -> set[bytes]:
        if self.file is not None and time.monotonic() - self._checked >= RELOAD_S:
            with self._lock:
                if time.monotonic() - self._checked >= RELOAD_S:
                    self._reload()
                    self._checked = time.monotonic()
        return self._static | self._from_file

    def valid(self, key: str) -> bool:
        d = _digest(key)
        ok = False
        for known in self._digests():  # no early exit: the time taken does not tell which key came close
            ok |= hmac.compare_digest(d, known)
        return ok

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless keys are off or `authorization` is "Bearer <a valid key>"."""
        if not self.enabled:
            return
        if not authorization:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
        if not self.valid(key.strip()):
            raise Unauthenticated("invalid API key")

    def check_grpc(self, context: Any) -> None:
        """The `authorization` metadata of a gRPC call (a grpc or Serve context); raises Unauthenticated."""
        if self.enabled:
            self.check_metadata(context.invocation_metadata())

    def check_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """The `authorization` entry of a call's metadata ((key, value) pairs); raises Unauthenticated."""
        if not self.enabled:
            return
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if len(values) > 1:
            raise Unauthenticated("more than one authorization metadata entry")
        value = values[0] if values else None
        self.check(value.decode("latin-1") if isinstance(value, bytes) else value)


def _path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # under Serve's route prefix
        path = path[len(root):] or "/"
    return path


class RequireApiKey:
    """ASGI middleware: every HTTP request but OPEN_PATHS needs a valid key; others get 401 and an OpenAI error
    body, before any of the body is read. `get_keys()` is resolved per request (None: no keys)."""

    def __init__(self, app: Any, get_keys: Callable[[], ApiKeys | None], on_reject: Callable[[], None] | None = None):
        self.app, self.get_keys, self.on_reject = app, get_keys, on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _path(scope) not in OPEN_PATHS:
            keys = self.get_keys()
            if keys is not None and keys.enabled:
                headers = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
                try:
                    if len(headers) > 1:
                        raise Unauthenticated("more than one Authorization header")
                    keys.check(headers[0].decode("latin-1") if headers else None)
                except Unauthenticated as e:
                    if self.on_reject is not None:
                        self.on_reject()
                    await _unauthorized(str(e))(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _unauthorized(message: str):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
