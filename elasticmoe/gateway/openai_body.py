"""OpenAI API request bodies: JSON to an object whose every string is valid Unicode, nested at most so deep."""

from __future__ import annotations

import json
from typing import Any

from elasticmoe.engine.validation import InvalidRequest, check_text, clip, short
from elasticmoe.gateway.openai_protocol import ApiError


def parse_body(raw: bytes, max_depth: int) -> dict:
    """A request body -> its JSON object; every string valid Unicode, nesting at most max_depth.

    Raises ApiError 400 for unparsable JSON (huge integers and runaway nesting included) and InvalidRequest
    naming the top-level field that holds a bad string or nests too deeply. Memory beside the parsed body is one
    small tuple per container: a value's path is written out only for its error, and shortened there.
    """
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {short(str(e), 120)}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_type")
    for k in obj:
        check_text("body key", k, max_chars=256)
    for k, v in obj.items():
        stack: list[tuple[Any, tuple | None, Any, int]] = [(v, None, k, 1)]  # (value, its parent's entry, key, depth)
        while stack:
            entry = stack.pop()
            val, depth = entry[0], entry[3]
            if isinstance(val, str):
                _check_string(k, entry, val)
            for key, x in val.items() if isinstance(val, dict) else enumerate(val) if isinstance(val, list) else ():
                if isinstance(key, str):
                    _check_string(k, entry, key, " key")
                if depth >= max_depth:
                    raise InvalidRequest(k, f"{_path((x, entry, key, 0))}: nested deeper than {max_depth} levels")
                if isinstance(x, (str, dict, list)):  # scalars need no look
                    stack.append((x, entry, key, depth + 1))
    return obj


def _check_string(top: str, entry: tuple, s: str, what: str = "") -> None:
    """check_text of a string (a value, or with what=" key" a key) in the body, naming where it stands."""
    try:
        check_text(top, s)
    except InvalidRequest as e:
        where = _path(entry) + what
        raise InvalidRequest(top, e.message if where == top else f"{where} {e.message}") from None


def _path(entry: tuple) -> str:
    """`a.b[2]` of a parse_body stack entry, at most 200 characters (a key may be as long as the body)."""
    parts: list[str] = []
    while entry is not None:
        _, entry, key, _ = entry
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}" if entry is not None else key)
    return clip("".join(reversed(parts)))
