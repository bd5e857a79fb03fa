"""A chat's tool calls and tool results checked as OpenAI checks them, and given as the chat template takes them."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.validation import clip, short

if TYPE_CHECKING:
    from elasticmoe.gateway.openai_messages import ChatMessage, ToolCall


def _arguments(where: str, args: str | dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A call's arguments as chat templates take them (an object, as transformers documents and vLLM passes them:
    OpenAI's JSON string parsed, "" as {}), and their bytes as sent."""
    if isinstance(args, dict):
        return args, len(json.dumps(args, ensure_ascii=False).encode("utf-8"))  # the body's depth limit held it
    try:
        out = json.loads(args) if args.strip() else {}
    except (ValueError, RecursionError):  # not JSON, a huge integer, runaway nesting
        out = None
    if not isinstance(out, dict):
        raise InvalidRequest(where, f"must be a JSON object (the function's arguments), got {short(args)}")
    return out, len(args.encode("utf-8"))


def _tool_calls(i: int, calls: list[ToolCall]) -> tuple[list[dict[str, Any]], int]:
    """An assistant message's tool calls as the template takes them, and their bytes."""
    if not calls:
        raise InvalidRequest(f"messages[{i}].tool_calls", "an empty list: give at least one call, or leave "
                                                          "tool_calls out", "empty_array")
    out, size, seen = [], 0, {}
    for j, c in enumerate(calls):
        if c.id in seen:  # OpenAI's 400: a tool message answers an id, so two calls under one leave one unanswerable
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].id", f"duplicate value {short(c.id)} (also "
                                 f"tool_calls[{seen[c.id]}].id): each call of a message needs its own id")
        seen[c.id] = j
        args, n = _arguments(f"messages[{i}].tool_calls[{j}].function.arguments", c.function.arguments)
        out.append({"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": args}})
        size += n + len(c.id.encode("utf-8")) + len(c.function.name.encode("utf-8"))
    return out, size


_ROLE_FIELDS = (("tool_calls", "assistant"), ("tool_call_id", "tool"), ("refusal", "assistant"),
                ("annotations", "assistant"), ("audio", "assistant"), ("function_call", "assistant"))


def tool_fields(i: int, m: ChatMessage) -> tuple[dict[str, Any], int]:
    """A message's tool_calls (an assistant's) and tool_call_id (a tool message's, required there) as the template
    takes them, and their bytes; either on another role is a 400 naming it."""
    out: dict[str, Any] = {}
    size = 0
    if m.role == "function":  # OpenAI's deprecated role, as the legacy function_call field below
        raise InvalidRequest(f"messages[{i}].role", "the deprecated role 'function' is not supported: give a call's "
                                                    "result in a message of role 'tool' (with its tool_call_id)",
                             "unsupported_value")
    for field, role in _ROLE_FIELDS:
        if getattr(m, field) is not None and m.role != role:
            raise InvalidRequest(f"messages[{i}].{field}", f"only for a message of role {role!r}, not {m.role!r}",
                                 "unknown_parameter")
    for field, instead in (("audio", "content"), ("function_call", "tool_calls")):
        if getattr(m, field) is not None:
            raise InvalidRequest(f"messages[{i}].{field}", f"not supported: give it in {instead} (null is taken)",
                                 "unsupported_value")
    if m.tool_calls is not None:
        out["tool_calls"], size = _tool_calls(i, m.tool_calls)
    if m.role == "tool":
        if m.tool_call_id is None:
            raise InvalidRequest(f"messages[{i}].tool_call_id", "a tool message names the tool call it answers",
                                 "missing_required_parameter")
        out["tool_call_id"] = m.tool_call_id
        size += len(m.tool_call_id.encode("utf-8"))
    return out, size


class Calls:
    """OpenAI's rules for tool results (a 400 each; a template rendered the conversation as sent): a tool message
    answers a call in the tool_calls of the assistant message before it (only tool messages between), and each call
    of an assistant message is answered by the tool messages right after it, before any other message and before the
    conversation ends (a call left unanswered was rendered as if its result were never wanted), and by one only (a
    second answer was rendered as two results of one call)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.open: dict[str, int] = {}  # the calls not answered yet: id -> its place in tool_calls
        self.answered: dict[str, int] = {}  # the calls answered: id -> the index of the tool message answering it
        self.at: int | None = None  # that assistant message's index

    def see(self, i: int, m: ChatMessage) -> None:
        if m.role == "tool":
            self._answer(i, m.tool_call_id)
            return
        self.end(f"messages[{i}] is of role {m.role!r}")
        calls = (m.tool_calls or ()) if m.role == "assistant" else ()
        self.open, self.answered = {c.id: j for j, c in enumerate(calls)}, {}  # ids unique: _tool_calls checks
        self.ids = set(self.open)
        self.at = i if self.ids else None

    def _answer(self, i: int, call_id: str | None) -> None:
        if call_id is None:  # tool_fields names it
            return
        where = f"messages[{i}].tool_call_id"
        if call_id in self.answered:  # as OpenAI's "Duplicate value for 'tool_call_id'", naming the second
            raise InvalidRequest(where, f"duplicate value {short(call_id)}: messages[{self.answered[call_id]}] "
                                        "already answers that call (one tool message per call)")
        if call_id in self.ids:
            self.answered[call_id] = i
            del self.open[call_id]
            return
        if self.at is None:
            raise InvalidRequest(where, "a tool message must answer a call in the tool_calls of the assistant "
                                        "message before it (only tool messages between); there is none")
        raise InvalidRequest(where, f"{short(call_id)} is not the id of a call in messages[{self.at}]"
                                    f".tool_calls ({', '.join(sorted(short(c) for c in self.ids))[:200]})")

    def end(self, after: str = "the conversation ends there") -> None:
        """A 400 naming the first call of the last assistant message that no tool message answered, if any."""
        if not self.open:
            return
        j = next(iter(self.open.values()))
        ids = clip(", ".join(short(c) for c in itertools.islice(self.open, 20)), 300)  # 20 ids of 80 characters at most
        raise InvalidRequest(f"messages[{self.at}].tool_calls[{j}].id",
                             "an assistant message with tool_calls must be followed by tool messages answering each "
                             f"tool_call_id; not answered: {ids} ({after})")
