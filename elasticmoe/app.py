"""The Serve application builder: `import_path: elasticmoe.app:build_app` with `args:` validated by AppArgs."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from elasticmoe.config import AppArgs


def _options(res) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory is not None:
        opts["memory"] = res.memory
    return opts


def build_app(args: dict[str, Any]):
    """Controller + expert shards + gateway (the ingress). Raises ValueError naming a bad arg."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"elasticmoe app args: {e}") from e
    from elasticmoe.autoscaler.controller import Controller
    from elasticmoe.experts.deployment import ExpertShard
    from elasticmoe.gateway.deployment import Gateway

    plain = a.model_dump(mode="json")
    controller = Controller.bind(plain)
    shards = ExpertShard.options(num_replicas=a.num_shards, ray_actor_options=_options(a.shard_resources)).bind(
        plain, controller)
    return Gateway.options(num_replicas=a.num_gateways, ray_actor_options=_options(a.gateway_resources)).bind(
        plain, controller, shards)
