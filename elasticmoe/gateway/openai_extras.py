"""The vLLM server's routes beside the OpenAI ones: GET /version and /metrics, POST /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.gateway.openai_choices import record_outcome
from elasticmoe.gateway.openai_messages import ChatMessage, Tool, chat_chars, chat_ids, check_tools, generation_prompt
from elasticmoe.gateway.openai_protocol import ApiError
from elasticmoe.gateway.tokenizing import chars_of, tokenized
from elasticmoe.metrics import KV_USAGE_HELP
from elasticmoe.metrics.series import PREEMPTIONS_HELP, PREFIX_HITS_HELP, PREFIX_QUERIES_HELP

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a prompt, or chat messages put through the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # of a prompt, vLLM's default; chat messages take the template's alone
    add_generation_prompt: bool | None = None  # with messages, as chat completions takes it and the next field
    continue_final_message: bool = False
    tools: list[Tool] | None = None  # with messages: given to the template as chat completions gives them
    chat_template_kwargs: dict[str, Any] | None = None  # with messages, as chat completions takes them
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


def _line(name: str, value: float, labels: dict[str, Any] | None = None) -> str:
    if not labels:
        return f"{name} {value}"
    inner = ",".join(f'{k}="{str(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value}"


def prometheus_text(metrics: Any) -> str:
    """This gateway replica's in-process totals (GatewayMetrics) in Prometheus' text format, as
    `elasticmoe_*` series; Ray's metrics port exports the same, summed over replicas, as `ray_elasticmoe_*`."""
    out: list[str] = []

    def family(name: str, kind: str, doc: str, rows: list[str]) -> None:
        out.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *rows])

    requests, errors, latency = metrics.counts()  # copies: the direct_grpc port's loop counts while this iterates
    family("elasticmoe_requests_total", "counter", "Client requests by API and outcome",
           [_line("elasticmoe_requests_total", n, {"api": a, "status": s}) for (a, s), n in requests.items()])
    family("elasticmoe_request_errors_total", "counter", "Failed client requests by error code",
           [_line("elasticmoe_request_errors_total", n, {"code": c}) for c, n in errors.items()])
    family("elasticmoe_latency_observations_total", "counter", "Latency observations (ttft, tpot, e2e)",
           [_line("elasticmoe_latency_observations_total", n, {"kind": k}) for k, n in latency.items()])
    gauges = {"running": ("elasticmoe_running_seqs", "Sequences in the running batch"),
              "queued": ("elasticmoe_queued_seqs", "Requests waiting for a KV-cache slot"),
              "kv_usage": ("elasticmoe_kv_cache_usage", KV_USAGE_HELP)}  # GatewayMetrics.engine
    for key, (name, doc) in gauges.items():
        if key in metrics.gauges:
            family(name, "gauge", doc, [_line(name, metrics.gauges[key])])
    prefix = metrics.prefix_cache
    for key, name, doc in (("queries", "elasticmoe_prefix_cache_queries_total", PREFIX_QUERIES_HELP),
                           ("hits", "elasticmoe_prefix_cache_hits_total", PREFIX_HITS_HELP)):
        family(name, "counter", doc, [_line(name, prefix[key])])
    family("elasticmoe_preemptions_total", "counter", PREEMPTIONS_HELP,
           [_line("elasticmoe_preemptions_total", metrics.preemptions)])
    if metrics.mode != "off":
        totals = metrics.expert_token_totals()  # [layers, experts]
        if metrics.mode == "per_layer":  # one series a layer, as exported to Ray
            rows = [_line("elasticmoe_expert_tokens_total", int(totals[l].sum()), {"layer": l, "expert": "all"})
                    for l in metrics.moe_layers if totals[l].any()]
        else:
            rows = [_line("elasticmoe_expert_tokens_total", int(totals[l, e]), {"layer": l, "expert": e})
                    for l in metrics.moe_layers for e in range(totals.shape[1]) if totals[l, e]]
        family("elasticmoe_expert_tokens_total", "counter", "Tokens routed to an expert", rows)
    return "\n".join(out) + "\n"


def register_extra_routes(app: FastAPI, get_core: Callable[[], Any], read: Callable) -> None:
    """Add /version, /metrics, /tokenize and /detokenize; `read(request, model, core)` parses a body as the
    OpenAI routes do (413 / 400 naming the field)."""
    from elasticmoe import __version__

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = getattr(get_core(), "metrics", None)
        if m is None:
            raise ApiError(404, "Invalid URL (GET /metrics): no metrics in this server")  # as an unknown URL
        return PlainTextResponse(prometheus_text(m), media_type=PROMETHEUS_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        core = get_core()
        req = await read(request, TokenizeRequest, core)
        check = _check(core)
        try:
            if (req.prompt is None) == (req.messages is None):
                raise InvalidRequest("prompt", "give exactly one of prompt and messages")
            for name in ("tools", "chat_template_kwargs"):
                if getattr(req, name) is not None and req.messages is None:
                    raise InvalidRequest(name, "only with messages (the chat template renders them)")
            check_tools(req.tools)
            if req.prompt is not None:  # a long one off the loop, as chat and completions tokenize theirs
                ids = await tokenized(chars_of(req.prompt), check.encode, core.tokenizer, req.prompt, "prompt",
                                      req.add_special_tokens)
            else:
                add = generation_prompt(req.add_generation_prompt, req.continue_final_message)
                ids = await tokenized(chat_chars(req.messages, req.tools), chat_ids, core.tokenizer, req.messages,
                                      check, add, req.tools, req.continue_final_message, req.chat_template_kwargs)
        except InvalidRequest as e:
            raise _invalid(core, e) from None
        body: dict[str, Any] = {"count": len(ids), "max_model_len": check.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = core.tokenizer.convert_ids_to_tokens(ids)
        _answered(core)
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        core = get_core()
        req = await read(request, DetokenizeRequest, core)
        try:
            ids = _check(core).prompt_ids(req.tokens, "tokens")
        except InvalidRequest as e:
            raise _invalid(core, e) from None
        prompt = core.tokenizer.decode(ids)
        _answered(core)
        return {"prompt": prompt}


def _answered(core: Any) -> None:
    """Count an answered /tokenize or /detokenize as ok (their 400s count as invalid: counting only those, the
    routes read as failing every time); no latency is observed, as nothing is generated."""
    record_outcome(core, None)


def _invalid(core: Any, e: InvalidRequest) -> ApiError:
    """A 400 naming e.field, counted in core's request metrics as the OpenAI routes count theirs."""
    from elasticmoe.gateway.openai_api import _invalid as invalid

    return invalid(core, e, {})


def _check(core: Any):
    from elasticmoe.gateway.openai_api import _validator

    return _validator(core)
