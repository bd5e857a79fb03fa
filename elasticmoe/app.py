"""The Serve application builder: `import_path: elasticmoe.app:build_app` with `args:` validated by AppArgs."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from elasticmoe.config import GATEWAY_DRAIN_S, SHARD_SHUTDOWN_S, AppArgs, check_slots, default_served_name


def _options(res) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory is not None:
        opts["memory"] = res.memory
    if res.accelerator_type is not None:
        opts["accelerator_type"] = res.accelerator_type
    if res.resources:
        opts["resources"] = dict(res.resources)
    return opts


def gateway_max_ongoing(limits) -> int:
    """Serve's max_ongoing_requests for a gateway replica: limits.max_ongoing_requests, by default its places
    (running + waiting), so that Serve's proxy holds or refuses the excess without an actor call to the gateway."""
    return limits.max_ongoing_requests or limits.max_num_seqs + limits.max_queue


def shard_autoscaling(min_shards: int, max_shards: int, initial: int | None = None) -> dict[str, Any]:
    """ExpertShard's Serve autoscaling_config: Serve follows the controller's count at once (the shards report it;
    autoscaler.policy.shard_autoscaling_policy), within the bounds. `initial`: the count Serve starts at, and resets
    to whenever the deployment's config changes; None: the first deploy starts at min_shards and the count is kept
    through changes (the Helm chart's, written among the Serve config's deployments to change the bounds in place)."""
    cfg: dict[str, Any] = {"min_replicas": min_shards, "max_replicas": max_shards, "metrics_interval_s": 1.0,
                           "look_back_period_s": 2.0, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                           "policy": {"policy_function": "elasticmoe.autoscaler.policy:shard_autoscaling_policy"}}
    if initial is not None:
        cfg["initial_replicas"] = initial
    return cfg


def _default_named(args: dict[str, Any], a: AppArgs) -> AppArgs:
    """`a` with served_model_name the default for its model, validated as a name given is (model_copy skips that,
    and each replica, validating the args again, failed on a directory name with a newline or an escape)."""
    name = default_served_name(a.model)
    try:
        return AppArgs.model_validate({**args, "served_model_name": name})
    except ValidationError as e:
        raise ValueError(f"elasticmoe app args: served_model_name: unset, so named after model ({name!r}), which "
                         f"is not a valid name ({e.errors()[0]['msg']}); set served_model_name") from None


def resolve_args(args: dict[str, Any]) -> AppArgs:
    """Validated args with `model` pinned once: a hub id / cache repo dir + `revision` becomes one snapshot
    directory and its commit, which every replica then loads (no per-process "newest snapshot" guess); a
    checkpoint's autoscaling.slots_per_shard is checked against its experts (_check_slots_fit)."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"elasticmoe app args: {e}") from e
    if a.served_model_name is None:  # named before `model` becomes a local snapshot path
        a = _default_named(args, a)
    if a.model.startswith("tiny:"):
        from elasticmoe.model.embedded import check_tiny_family

        try:
            check_tiny_family(a.model[len("tiny:"):])
        except ValueError as e:
            raise ValueError(f"elasticmoe app args: {e}") from e
        return a
    from elasticmoe.model.hub import HubError, resolve

    try:
        snap = resolve(a.model, a.revision)
    except HubError as e:
        raise ValueError(f"elasticmoe app args: model: {e}") from e
    a = a.model_copy(update={"model": str(snap.path), "revision": snap.commit})
    _check_slots_fit(a)
    return a


def _check_slots_fit(a: AppArgs) -> None:
    """autoscaling.slots_per_shard, when set, against the expert count in the checkpoint's config.json (no weight
    file read: the head may hold only the JSON files), at Serve's build rather than at the controller's start. A
    tiny:<family> model is made later, by the replicas: the controller checks it (and the demo before Ray)."""
    if a.autoscaling is None or a.autoscaling.slots_per_shard is None:
        return
    from elasticmoe.model import read_spec

    try:
        check_slots(a, read_spec(a.model).moe.num_experts)
    except ValueError as e:  # ModelSpecError too: the file's model, named as the controller would
        raise ValueError(f"elasticmoe app args: {e}") from e


def build_app(args: dict[str, Any]):
    """Controller + expert shards + gateway (the ingress). Raises ValueError naming a bad arg."""
    a = resolve_args(args)
    from elasticmoe.autoscaler.controller import Controller
    from elasticmoe.experts.deployment import ExpertShard
    from elasticmoe.gateway.deployment import Gateway

    # Only what the config wrote (and resolve_args pinned): each replica validates it again, and a field left unset
    # must stay unset there (limits.max_model_len: unset, no more than the model's context; a full dump wrote 2048)
    plain = a.model_dump(mode="json", exclude_unset=True)
    # The controller reads the checkpoint's config and tensor index: with an accelerator type on the shards it
    # runs on a node of theirs, which holds the weights (a `ray up` head holds only the JSON files).
    ctl_opts: dict[str, Any] = {"num_cpus": 0}
    if a.shard_resources.accelerator_type is not None:
        ctl_opts["accelerator_type"] = a.shard_resources.accelerator_type
    controller = Controller.options(ray_actor_options=ctl_opts).bind(plain)
    shard_opts: dict[str, Any] = {"ray_actor_options": _options(a.shard_resources),
                                  "graceful_shutdown_timeout_s": SHARD_SHUTDOWN_S}
    if a.autoscaling is None:
        shard_opts["num_replicas"] = a.num_shards
    else:
        shard_opts["autoscaling_config"] = shard_autoscaling(a.autoscaling.min_shards, a.autoscaling.max_shards,
                                                             a.num_shards)
    shards = ExpertShard.options(**shard_opts).bind(plain, controller)
    # A gateway that Serve stops (node drain, scale-down, in-place update) first lets its streams finish.
    return Gateway.options(num_replicas=a.num_gateways, ray_actor_options=_options(a.gateway_resources),
                           max_ongoing_requests=gateway_max_ongoing(a.limits),
                           max_queued_requests=a.limits.max_queued_requests,
                           backpressure_config={"status_code": 429, "retry_after_s": 1},
                           graceful_shutdown_timeout_s=GATEWAY_DRAIN_S).bind(plain, controller, shards)
