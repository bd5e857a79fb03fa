"""User-written configuration: the args of the Serve application, validated by pydantic."""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # YAML's .nan / .inf pass range checks


_RAY_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}  # Ray's own resource names
# The longest wait or interval a setting may give: a day. Far past it (about 9.2e9 s, threading.TIMEOUT_MAX) a
# thread's wait on it raises OverflowError, and the thread keeping the gateway's deadlines would die.
MAX_WAIT_S = 86400.0
# control, format (bidi overrides, zero-width), line and paragraph separators: as engine.validation refuses in ids
_UNPRINTED = {"Cc", "Cf", "Zl", "Zp"}


class Resources(_Strict):
    """Ray resources for one replica."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes of RAM reserved for the replica")
    accelerator_type: str | None = Field(None, min_length=1, description="Ray accelerator type the replica needs, "
                                         "e.g. H100, A100-80G, L40S (ray.util.accelerators)")
    resources: dict[str, float] = Field({}, description="custom Ray resources the replica needs, e.g. "
                                        "{elasticmoe_gateway: 1}: it runs only on nodes started with them")

    @field_validator("resources")
    @classmethod
    def _custom(cls, res: dict[str, float]) -> dict[str, float]:
        for name, amount in res.items():
            if not name or name in _RAY_BUILTIN or name.startswith("accelerator_type:"):
                raise ValueError(f"resources: {name!r} is not a custom resource (num_cpus, num_gpus, memory and "
                                 f"accelerator_type have fields of their own)")
            if amount < 0:
                raise ValueError(f"resources: {name!r} is {amount}; want >= 0")
        return res


class Limits(_Strict):
    """Engine limits: KV-cache size, batch size and admission control."""

    max_num_seqs: int = Field(16, ge=1, le=4096, description="sequences in the running batch")
    max_model_len: int = Field(2048, ge=16, description="prompt + completion tokens per sequence; one beyond the "
                               "model's context is refused; left unset: 2048, or the model's context if shorter")
    max_queue: int = Field(64, ge=0, description="waiting requests before RESOURCE_EXHAUSTED / HTTP 429")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens in one engine step")
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="positions the gateway's KV cache holds, shared by the running sequences in blocks of "
        "kv_block_size: a sequence is admitted once free blocks cover its prompt, gets one more as it grows (the "
        "newest preempted and later recomputed when they run short), and a request that can never fit is refused "
        "(HTTP 400 / INVALID_ARGUMENT); may be less than max_model_len; default max_num_seqs x max_model_len (every "
        "sequence a whole context, the size before paging)")
    kv_block_size: int = Field(16, ge=1, le=4096, description="positions a KV-cache block holds")
    prefix_caching: bool = Field(True, description="a prompt shares the KV-cache blocks of an earlier prompt it "
                                 "starts with (whole blocks), computing only the rest; cached blocks no running "
                                 "sequence holds are reused, least recently used first, when a reservation needs "
                                 "them; always off for models with linear-attention layers (not exact there)")
    micro_batches: int | None = Field(None, ge=1, le=8, description="micro-batches a step is cut into (at sequence "
                                      "boundaries, 4 tokens or more each), so that one's dense work runs while the "
                                      "others' experts are in flight (ping-pong); 1: no pipelining; default 2 on "
                                      "CUDA, 1 on CPU, where each extra micro-batch streams the dense weights again "
                                      "and costs more than it hides (benchmarks/overlap.py)")
    expert_timeout_s: float = Field(5.0, gt=0, le=MAX_WAIT_S, description="deadline of one expert-shard call")
    transport: Literal["unary", "stream", "socket"] = Field(
        "socket", description="gateway -> shard calls: raw frames on one TCP (mTLS) connection per shard to its frame "
        "listener (the default: ahead of the stream on average in benchmarks/serving.py), the "
        "same frames on one long-lived gRPC stream per shard, or one unary gRPC call each")
    failover_s: float = Field(30.0, gt=0, le=MAX_WAIT_S, description="how long a step waits for a live copy of its "
                              "experts (failover, re-homing) before its requests end with UNAVAILABLE")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="calls Serve sends one gateway replica at once (Serve's max_ongoing_requests; handle "
        "calls such as stats count too); default max_num_seqs + max_queue, its places: calls beyond them wait in "
        "Serve's proxy for a place or are refused there (max_queued_requests), at once and without reaching the "
        "gateway. Larger: the gateway's own admission refuses the excess, each refusal an actor call through the "
        "proxy, which under a sustained overload saturates it (benchmarks/overload.py)")
    max_queued_requests: int = Field(256, ge=1, description="calls each of Serve's proxies (and each handle) holds "
                                     "while the gateway's places are full, before refusing more at once "
                                     "(RESOURCE_EXHAUSTED / HTTP 429, retry-after 1); Serve counts the calls being "
                                     "placed, so the bound is loose while places free up")
    max_stop_strings: int = Field(16, ge=0, le=1024, description="stop strings per request")
    max_stop_len: int = Field(256, ge=1, le=65536, description="characters per stop string")
    max_request_id_len: int = Field(256, ge=1, le=65536, description="characters of a request_id")
    max_prompt_bytes: int = Field(1 << 20, ge=1, description="UTF-8 bytes of a text prompt")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompt tokens; default: max_model_len - 1")
    max_logprobs: int = Field(20, ge=0, le=1024, description="top logprobs per token")
    max_stop_token_ids: int = Field(16, ge=0, le=65536, description="stop_token_ids per request")
    max_logit_bias: int = Field(1024, ge=0, le=1 << 20, description="logit_bias entries per request (each is "
                                "added to its row's logits at every step)")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="HTTP request body (413 above it)")


class Autoscaling(_Strict):
    """Shard autoscaling and expert rebalancing policy."""

    min_shards: int = Field(1, ge=1)
    max_shards: int = Field(8, ge=1)
    target_utilization: float = Field(0.7, gt=0, le=1)
    rebalance_interval_s: float = Field(10.0, gt=0, le=MAX_WAIT_S)
    slots_per_shard: int | None = Field(None, ge=1,
                                        description="expert copies per (shard, layer); default: even split + 25%")
    max_moves: int = Field(8, ge=0, description="expert copies moved per rebalance")
    start_deadline_s: float | None = Field(
        600.0, gt=0, le=MAX_WAIT_S, description="a position of the placement with no live shard this long (no replica "
        "came up there: none registered, or it never got ready) is given up: its experts are re-homed onto the live "
        "shards, so scaling goes on; None waits for it for good")
    scale_cooldown_s: float = Field(
        30.0, ge=0, le=MAX_WAIT_S, description="after a change of the shard count (the controller's or an operator's), "
        "no other before this long; also the warm-up: no scale in before every starting shard is up and this long "
        "has passed. Longer for shards that take long to load or a bursty load; shorter to follow the load closely")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_shards > self.max_shards:
            raise ValueError(f"autoscaling.min_shards ({self.min_shards}) > max_shards ({self.max_shards})")
        return self


GATEWAY_DRAIN_S = 600  # a stopping gateway's drain: the request timeout of the GPU Serve configs and the chart
DIRECT_MAX_CONNECTIONS = 256  # client connections of one gateway replica's direct_grpc port at once
DIRECT_IDLE_S = 300.0  # a direct_grpc client connection with no call this long is closed
SHARD_SHUTDOWN_S = 60  # a stopping shard's graceful shutdown: its drain (re-home, the gateways' acks), then its stop


class DirectGrpc(_Strict):
    """A gRPC port on each gateway replica serving the Generation API without Serve's proxy (`direct_grpc`)."""

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (0.0.0.0 to reach it from "
                      "other machines; the API keys apply, the port has no TLS: keep it on a private network)")
    port: int = Field(..., ge=1, le=65535, description="the port; one application's gateway replicas on a node "
                      "share it (SO_REUSEPORT), another application's are refused")
    drain_s: float = Field(GATEWAY_DRAIN_S, ge=0, le=GATEWAY_DRAIN_S, description="when Serve stops a replica, how "
                           "long its direct calls in flight may still run (within the gateway's own drain)")
    max_connections: int = Field(DIRECT_MAX_CONNECTIONS, ge=1, le=65536, description="client connections one "
                                 "replica holds at once; more are closed as they connect (each holds a descriptor)")
    idle_s: float = Field(DIRECT_IDLE_S, ge=1, le=86400, description="a client connection with no call this long is "
                          "closed (GOAWAY: a gRPC client opens a new one for its next call)")


class AppArgs(_Strict):
    """Args of `elasticmoe.app:build_app` (the `args:` of a Serve config)."""

    # pydantic's errors repeat the input (a field's, or all the args' for a check of the whole): with api_keys among
    # them a bad arg put a key into what `serve status` and the dashboard show; the field and the rule are named
    model_config = ConfigDict(hide_input_in_errors=True)
    model: str = Field(..., min_length=1, description="checkpoint directory, HF cache repo/snapshot directory, hub id "
                       "(org/name), or tiny:<family> (an embedded tiny model)")
    revision: str | None = Field(None, min_length=1, description="hub branch, tag or commit of `model`; resolved once "
                                 "to a snapshot of the local HF cache and passed to every replica")
    num_shards: int = Field(2, ge=1, le=1024)
    num_gateways: int = Field(1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    gateway_resources: Resources = Resources()
    shard_resources: Resources = Resources()
    limits: Limits = Limits()
    autoscaling: Autoscaling | None = None
    expert_metrics: Literal["per_expert", "per_layer", "off"] = "per_expert"
    expert_copies: int = Field(1, ge=1, description="copies of every expert in the initial placement; 2 survives "
                               "a shard loss with no weight moved and no wait")
    served_model_name: str | None = Field(None, min_length=1, max_length=256, description="the model's name in "
                                          "the APIs (/v1/models, responses); default: the hub id or the directory "
                                          "name, never a local path")
    insecure_internal: bool = Field(False, description="plaintext, unauthenticated gRPC between the gateways, the "
                                    "controller and the expert shards (default: mTLS with the release's CA)")
    api_keys: list[str] = Field(default_factory=list, description="keys accepted on the HTTP and gRPC APIs "
                                "(Authorization: Bearer <key>); prefer api_keys_file or ELASTICMOE_API_KEYS, which "
                                "keep them out of the Serve config")
    api_keys_file: str | None = Field(None, min_length=1, description="a file of keys, one a line (a mounted "
                                      "Secret; re-read when it changes)")
    direct_grpc: DirectGrpc | None = Field(None, description="also serve the gRPC API on each gateway replica's "
                                           "own port, bypassing Serve's proxy (lower latency, fewer cores)")

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if len(k) < 16 or not (k.isascii() and k.isprintable()) or any(c.isspace() or c == "," for c in k):
                raise ValueError("api_keys: each key needs 16 or more printable ASCII characters, no spaces or commas")
        return keys

    @field_validator("served_model_name")
    @classmethod
    def _printable_name(cls, name: str | None) -> str | None:
        # echoed in every response and /v1/models (and in logs): a newline or escape there forges lines and labels;
        # OpenAI-style names (org/model:tag, ft:base:org::id, spaces, any script) stay valid
        bad = [c for c in name or "" if unicodedata.category(c) in _UNPRINTED]
        if bad:
            raise ValueError(f"served_model_name: control characters (newlines, tabs, escapes, bidi overrides) are "
                             f"not allowed; found {bad[0]!r}")
        return name

    @model_validator(mode="after")
    def _tiny_has_no_revision(self) -> "AppArgs":
        if self.model.startswith("tiny:") and self.revision is not None:
            raise ValueError(f"revision: {self.model} is an embedded model built on first use and has no "
                             f"revisions; drop `revision` (got {self.revision!r})")
        return self

    @model_validator(mode="after")
    def _cuda_replicas_have_a_gpu(self) -> "AppArgs":
        # Ray reserves no GPU for num_gpus 0 and leaves CUDA_VISIBLE_DEVICES alone: the replica would take GPU 0
        # of its node beside the replica Ray gave it to, or fail at start on a node without one
        for name in ("gateway_resources", "shard_resources"):
            if self.device == "cuda" and getattr(self, name).num_gpus == 0:
                raise ValueError(f"{name}.num_gpus is 0 but device is cuda: set it (usually 1; a fraction shares "
                                 f"a GPU)")
        return self

    @model_validator(mode="after")
    def _shards_in_bounds(self) -> "AppArgs":
        if self.expert_copies > self.num_shards:
            raise ValueError(f"expert_copies ({self.expert_copies}) > num_shards ({self.num_shards})")
        a = self.autoscaling
        if a is not None and not a.min_shards <= self.num_shards <= a.max_shards:
            raise ValueError(f"num_shards ({self.num_shards}) must lie in [autoscaling.min_shards, "
                             f"autoscaling.max_shards] = [{a.min_shards}, {a.max_shards}]")
        return self


class ScaleConfig(_Strict):
    """The Controller deployment's `user_config` (a Serve config's `deployments: [{name: Controller, user_config:
    ...}]`, as the Helm chart writes it): the shard bounds, which Serve hands the running controller in place
    (reconfigure(), no replica restarted; a change of `args` rebuilds the application and replaces every replica),
    within args.autoscaling's; and the count a controller with no record to resume starts at. ExpertShard's
    autoscaling_config should carry the same bounds (Serve's own: app.shard_autoscaling)."""

    min_shards: int = Field(..., ge=1, le=1024)
    max_shards: int = Field(..., ge=1, le=1024)
    start_shards: int | None = Field(None, ge=1, le=1024, description="the shard count of a controller that starts "
                                     "with no record to resume (a new cluster; the chart's: the replaced cluster's "
                                     "scale), its first placement spread over them; a running or resumed one "
                                     "ignores it")

    @model_validator(mode="after")
    def _ordered(self) -> "ScaleConfig":
        if self.min_shards > self.max_shards:
            raise ValueError(f"user_config.min_shards ({self.min_shards}) > max_shards ({self.max_shards})")
        if not self.min_shards <= (self.start_shards or self.min_shards) <= self.max_shards:
            raise ValueError(f"user_config.start_shards ({self.start_shards}) must lie in [min_shards, max_shards] "
                             f"= [{self.min_shards}, {self.max_shards}]")
        return self

    def within(self, args: AppArgs) -> "ScaleConfig":
        """Itself, if `args` autoscale and their bounds hold its own; else ValueError naming the fields."""
        a = args.autoscaling
        if a is None:
            raise ValueError("user_config: shard bounds need args.autoscaling (without it the shard count is fixed)")
        if not (a.min_shards <= self.min_shards and self.max_shards <= a.max_shards):
            raise ValueError(f"user_config.min_shards..max_shards ({self.min_shards}..{self.max_shards}) must lie "
                             f"within args autoscaling.min_shards..max_shards ({a.min_shards}..{a.max_shards})")
        return self


def check_slots(args: AppArgs, num_experts: int) -> None:
    """Refuse, naming the fields and their numbers (ValueError), an autoscaling.slots_per_shard too small for the
    initial placement: num_shards shards of slots_per_shard slots each (per MoE layer) must hold every one of the
    model's `num_experts` experts expert_copies times. Unset, the controller's default always fits."""
    slots = args.autoscaling.slots_per_shard if args.autoscaling is not None else None
    n, copies = args.num_shards, args.expert_copies
    if slots is None or n * slots >= num_experts * copies:
        return
    raise ValueError(f"autoscaling.slots_per_shard ({slots}) is too small: num_shards ({n}) * slots_per_shard = "
                     f"{n * slots} < the model's {num_experts} experts * expert_copies ({copies}) = "
                     f"{num_experts * copies} expert copies per layer; set slots_per_shard to at least "
                     f"{-(-num_experts * copies // n)}, or leave it unset (an even split + 25%)")


def weights_id(args: AppArgs) -> str:
    """Which expert and dense weights a replica computes with: `model` (a snapshot directory once resolve_args
    pinned it) and `revision` (its commit). The controller's tables and registration plans carry it; a gateway takes
    no table, and a shard joins no controller, of other weights: during a rolling update across a change of model or
    revision, old and new replicas would otherwise mix the two checkpoints' layers in one forward pass. (dtype and
    device are left out: a shard casts what it is sent, and the sums stay those of the same weights.)"""
    return args.model if args.revision is None else f"{args.model}@{args.revision}"


def default_served_name(model: str) -> str:
    """The name the APIs show for `model`: a hub id or tiny:<family> as given; for a Hugging Face cache directory
    (.../models--org--name[/snapshots/<commit>]) org/name; for any other directory its last component only, so
    that no local path leaks to clients."""
    if model.startswith("tiny:"):
        return model
    parts = PurePosixPath(model).parts
    for part in reversed(parts):
        if part.startswith("models--") and len(part) > 8:
            return part[len("models--"):].replace("--", "/")
    if not model.startswith(("/", ".", "~")) and len(parts) <= 2:
        return model  # a hub id (org/name)
    return parts[-1] if parts else model


def served_name(args: Any) -> str:
    """AppArgs.served_model_name, else the default for its model."""
    return getattr(args, "served_model_name", None) or default_served_name(args.model)
