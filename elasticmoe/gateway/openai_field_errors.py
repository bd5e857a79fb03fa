"""A request body's validation error as OpenAI tells it: (message, param: the field's path, code)."""

from __future__ import annotations

import types
import typing
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from elasticmoe.engine.validation import clip

_KINDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("a boolean", "booleans")}


def _kind(tp: Any, plural: bool = False) -> str:
    """What a JSON value of type `tp` is, in words: "a list of strings"."""
    if typing.get_origin(tp) is list:
        return f"{'lists' if plural else 'a list'} of {_kind(typing.get_args(tp)[0], True)}"
    return _KINDS.get(tp, ("an object", "objects"))[plural]


def _union_at(model: Any, loc: tuple) -> tuple[int, tuple] | None:
    """Where `loc` (a pydantic error's) passes a union field of `model`: (its length up to the union, the union's
    types less None); pydantic puts the branch it tried (e.g. "str") next in the loc, which the client never wrote."""
    tp = model
    for i, part in enumerate(loc):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) > 1:
            return i, args
        if len(args) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = args[0]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return None


_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
          "json_invalid": "invalid_json", "literal_error": "invalid_value", "enum": "invalid_value"}


def _code(kind: str) -> str:
    """OpenAI's error code for a pydantic error type: a wrong JSON type is invalid_type, a bad value invalid_value."""
    return _CODES.get(kind) or ("invalid_type" if kind.endswith("_type") else "invalid_value")


def _where(loc: Any) -> str:
    """A field's path as OpenAI writes it: ("messages", 0, "role") -> "messages[0].role", at most 200 characters
    (a nested key may be as long as the body)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return clip(out)


def describe(exc: RequestValidationError | ValidationError, model: Any = None) -> tuple[str, str | None, str]:
    """(message, param, code) of the first pydantic error of a request body (a `model`): param is the field's path
    (messages[0].role), code OpenAI's (invalid_type, invalid_value, missing_required_parameter, unknown_parameter)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False) \
        if isinstance(exc, ValidationError) else exc.errors()
    err = errors[0] if errors else {}
    loc = tuple(p for p in err.get("loc", ()) if p != "body")
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None, _code(kind)
    where = _where(loc) or None
    if kind == "extra_forbidden":  # the full path of a nested one: stream_options.foo
        return f"Unrecognized request argument supplied: {where}", where, _code(kind)
    union = _union_at(model, tuple(err.get("loc", ()))) if model is not None else None
    if union is not None:  # stop: 5 -> "stop: must be a string or a list of strings", not "stop.str: ..."
        kinds = [_kind(t) for t in union[1]]
        where = _where(loc[:union[0]]) or None
        return f"{where}: must be {', '.join(kinds[:-1])} or {kinds[-1]}", where, "invalid_type"
    if kind == "model_type":  # not pydantic's "a valid dictionary or instance of ChatMessage": a class of ours
        return f"{where}: must be an object", where, "invalid_type"
    return f"{where or 'body'}: {err.get('msg', 'invalid')}", where, _code(kind)
