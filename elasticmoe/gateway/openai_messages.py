"""Chat messages as the chat template takes them: validated, then rendered and tokenized (chat_ids)."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.validation import Validator, clip, short
from elasticmoe.gateway.openai_tool_calls import Calls, tool_fields
from elasticmoe.gateway.tokenizing import OFF_LOOP_CHARS, chars_of


# OpenAI's pattern for a function's name (in tools and in a replayed assistant message's tool_calls) and for a message's
# name (pydantic's rust regex: no newline before $); another name is a 400 invalid_value naming it, as OpenAI answers
ToolName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: ToolName  # the name of a tool (OpenAI answers 400 for messages[i].tool_calls[j].function.name too)
    arguments: str | dict[str, Any]  # OpenAI's: a JSON string; an object (transformers' form) is taken too


class ToolCall(BaseModel):
    """An assistant message's call of a function, as OpenAI's API reference writes it (every field required)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    """A request's tool, as OpenAI's API reference writes one (vLLM checks the same shape): given to the chat
    template as sent; a malformed one is a 400 naming its field (it reached the template, which failed on it as
    "messages", or rendered it as it was)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    """One message. An unknown field is a 400 naming it, as OpenAI answers one ("Additional properties are not
    allowed"; dropped, a misspelt field such as `contents` left an empty turn with no sign of it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: a 400 (_tool_fields)
    content: str | list[dict[str, Any]] | None = None
    # OpenAI's pattern: "alice smith" is a 400 naming messages[i].name, as there. On a tool message too (not in
    # OpenAI's reference, but taken there: its cookbook sends the function's name; some templates write it)
    name: ToolName | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages only, and required there
    # An assistant message's fields of a response that a client sends back when it replays it (the official
    # client's model_dump(), or OpenAI's own answer, writes them, mostly null): a refusal is that turn's text when it
    # has no content; annotations (a response's citations) are dropped; audio and function_call only null
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None


def check_tools(tools: list[Tool] | None) -> None:
    """An empty `tools` array is a 400 empty_array naming tools, as OpenAI answers it (it was read as no tools)."""
    if tools is not None and not tools:
        raise InvalidRequest("tools", "an empty array: give at least one tool, or leave tools out", "empty_array")


def chat_chars(messages: list[ChatMessage], tools: list[Tool] | None) -> int:
    """A chat request's characters, which decide whether it is templated and tokenized off the loop: its contents'
    and refusals', its tool-call arguments' (JSON the template's rendering parses and writes out; an argument object,
    not OpenAI's form, counts OFF_LOOP_CHARS), and OFF_LOOP_CHARS for tools (their rendering is not counted)."""
    calls = sum(len(c.function.arguments) if isinstance(c.function.arguments, str) else OFF_LOOP_CHARS
                for m in messages for c in m.tool_calls or ())
    refusals = sum(len(m.refusal or "") for m in messages)  # a turn's text when it has no content
    return chars_of(messages) + calls + refusals + (OFF_LOOP_CHARS if tools else 0)


def _text(i: int, m: ChatMessage) -> str:
    """A message's content as the template takes it: its string, or its parts' text joined by newlines (as vLLM
    joins them: parts never glue words). Required, as OpenAI requires it (an empty turn was sent in its place),
    but on an assistant message that holds tool_calls or a refusal (that refusal is then its text)."""
    where, content = f"messages[{i}].content", m.content
    if content is None:
        if m.role == "assistant" and (m.tool_calls or m.refusal is not None):
            return m.refusal or ""
        if "content" not in m.model_fields_set:
            raise InvalidRequest(where, f"a message of role {m.role!r} needs content", "missing_required_parameter")
        raise InvalidRequest(where, f"a message of role {m.role!r} needs content, got null", "invalid_type")
    if isinstance(content, str):
        return content
    if not content:
        raise InvalidRequest(where, "an empty list: give at least one content part", "empty_array")
    return "\n".join(_part_text(f"{where}[{j}]", m.role, part) for j, part in enumerate(content))


def _part_text(where: str, role: str, part: dict[str, Any]) -> str:
    """A content part's text: a text part's, or an assistant message's refusal part's (OpenAI's assistant content
    takes both; vLLM takes the refusal as text). Another type is a 400 naming its type (messages[i].content[j].type,
    as OpenAI names an image sent to a text-only model); a part without its string text one naming that field, and
    a part's unknown field one naming it (unknown_parameter, as OpenAI's closed part schemas refuse it)."""
    kind = part.get("type")
    if kind == "refusal" and role != "assistant":
        raise InvalidRequest(f"{where}.type", f"a 'refusal' part is only for a message of role 'assistant', not "
                                              f"{role!r}")
    if kind not in ("text", "refusal"):
        if "type" not in part:
            raise InvalidRequest(f"{where}.type", "a content part needs a type ('text')", "missing_required_parameter")
        raise InvalidRequest(f"{where}.type", f"{short(kind)} parts are not supported: this server takes text only "
                                              "(parts of type 'text', and 'refusal' in an assistant's)",
                             "unsupported_value")
    text = part.get(kind)
    if not isinstance(text, str):
        if kind not in part:
            raise InvalidRequest(f"{where}.{kind}", f"a {kind!r} part needs its {kind}", "missing_required_parameter")
        got = "null" if text is None else type(text).__name__
        raise InvalidRequest(f"{where}.{kind}", f"must be a string, got {got}", "invalid_type")
    extra = next((k for k in part if k not in ("type", kind)), None)  # as a message's unknown field: dropped, a
    if extra is not None:  # client's cache_control or a misspelt key had no effect and no sign of it
        raise InvalidRequest(clip(f"{where}.{extra}"), f"not a field of a {kind!r} content part (it takes type and "
                                                       f"{kind} only)", "unknown_parameter")
    return text


def _conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], int]:
    """Messages as the chat template takes them ({role, content[, name][, tool_calls][, tool_call_id]}: a template
    may write each, as transformers passes message dicts through), and their bytes of content, names and tool
    fields."""
    if not messages:
        raise InvalidRequest("messages", "at least one message is required", "empty_array")
    conv, size, calls = [], 0, Calls()
    for i, m in enumerate(messages):
        tools, tool_bytes = tool_fields(i, m)
        calls.see(i, m)
        content = _text(i, m)
        turn = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            turn["name"] = m.name
        turn.update(tools)
        size += len(content.encode("utf-8")) + len((m.name or "").encode("utf-8")) + tool_bytes
        conv.append(turn)
    calls.end()
    return conv, size


def generation_prompt(add: bool | None, continue_final: bool) -> bool:
    """Whether the template opens a new assistant turn, from vLLM's add_generation_prompt (default true) and
    continue_final_message: continuing the final message leaves it open, so add_generation_prompt left out is taken
    as false with it, and true is a 400 naming continue_final_message (vLLM's "Cannot set both")."""
    if not continue_final:
        return True if add is None else add
    if add:
        raise InvalidRequest("continue_final_message", "cannot be true with add_generation_prompt true (the one "
                                                       "continues the final message, the other opens a new one): set "
                                                       "add_generation_prompt false")
    return False


# apply_chat_template's own arguments and the variables its renderer sets (beside those of its signature)
_TEMPLATE_OWN = frozenset(("messages", "conversation", "conversations", "tools", "documents", "chat_template",
                           "add_generation_prompt", "continue_final_message", "tokenize", "return_dict"))


def template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's chat_template_kwargs: variables the template reads beside the conversation (e.g. Qwen3's
    enable_thinking), given to apply_chat_template as its **kwargs; a name of its own arguments (tokenize,
    add_generation_prompt, ...) is a 400 naming chat_template_kwargs.<name>: the server sets those."""
    if not kwargs:
        return {}
    try:
        params = inspect.signature(tokenizer.apply_chat_template).parameters
    except (TypeError, ValueError):
        params = {}
    own = _TEMPLATE_OWN | {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    bad = next((k for k in kwargs if k in own), None)
    if bad is not None:
        raise InvalidRequest(clip(f"chat_template_kwargs.{bad}"), f"{short(bad)} is set by the server (an argument "
                             "of apply_chat_template, or the conversation: the request's messages, tools, "
                             "add_generation_prompt and continue_final_message give theirs); chat_template_kwargs "
                             "adds template variables only")
    return dict(kwargs)


def chat_ids(tokenizer: Any, messages: list[ChatMessage], check: Validator, add_generation_prompt: bool = True,
             tools: list[Tool] | None = None, continue_final: bool = False,
             kwargs: dict[str, Any] | None = None) -> list[int]:
    """Apply the checkpoint's chat template (with the assistant generation prompt unless told not; `tools`, if any,
    given to it as vLLM gives them; continue_final: the prompt ends inside the final message, as transformers'
    continue_final_message cuts it; `kwargs`: chat_template_kwargs, more template variables) -> token ids."""
    extra = template_kwargs(tokenizer, kwargs)
    conv, size = _conversation(messages)
    limit = check.limits.max_prompt_bytes
    if size > limit:
        raise InvalidRequest("messages", f"{size} bytes of content; the limit is {limit}")
    try:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             tools=[t.model_dump(exclude_unset=True) for t in tools or ()] or None,
                                             continue_final_message=continue_final, **extra)
    except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (e.g. role order)
        raise InvalidRequest("messages", f"the chat template rejected the conversation: {short(str(e), 200)}") from e
    rendered = len(text.encode("utf-8", "replace"))  # each message adds its template's text: held as a prompt is
    if rendered > limit:
        raise InvalidRequest("messages", f"the chat template made {rendered} bytes of {len(conv)} messages; "
                                         f"the limit is {limit} (limits.max_prompt_bytes)")
    try:  # as apply_chat_template(tokenize=True) does: the template wrote the special tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as e:  # noqa: BLE001 - e.g. characters the tokenizer cannot take
        raise InvalidRequest("messages", f"the tokenizer rejected it: {short(str(e), 200)}") from None
    return check.prompt_ids([int(t) for t in ids], "messages")
