"""Chat messages as the chat template takes them: validated, then rendered and tokenized (chat_ids)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.validation import Validator, short


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


def _conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], int]:
    """Messages as the chat template takes them ({role, content[, name]}: a template may write the name, as
    transformers passes message dicts through), and their bytes of content and names."""
    if not messages:
        raise InvalidRequest("messages", "at least one message is required", "empty_array")
    conv, size = [], 0
    for i, m in enumerate(messages):
        content = m.content or ""
        if isinstance(content, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise InvalidRequest(f"messages[{i}].content", "only text content parts (with a string text) "
                                                               "are supported", "unsupported_value")
            content = "\n".join(p["text"] for p in content)  # as vLLM joins them: parts never glue words
        turn = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            turn["name"] = m.name
        size += len(content.encode("utf-8")) + len((m.name or "").encode("utf-8"))
        conv.append(turn)
    return conv, size


def chat_ids(tokenizer: Any, messages: list[ChatMessage], check: Validator, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Apply the checkpoint's chat template (with the assistant generation prompt unless told not; `tools`, if any,
    given to it as vLLM gives them) -> token ids."""
    conv, size = _conversation(messages)
    limit = check.limits.max_prompt_bytes
    if size > limit:
        raise InvalidRequest("messages", f"{size} bytes of content; the limit is {limit}")
    try:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             tools=tools or None)
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
