"""Helpers for the end-to-end tests: Serve configs with several apps, deploy-and-wait, handles, references."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

GRPC = "127.0.0.1:9000"
REPO = Path(__file__).resolve().parent.parent


def app_entry(name: str, model: str, num_shards: int, **kw) -> dict:
    """One application of a Serve config, with small CPU resources and limits."""
    limits = {"max_num_seqs": 8, "max_model_len": 256, "max_queue": 32, "max_num_batched_tokens": 256,
              "expert_timeout_s": 5.0}
    limits.update(kw.pop("limits", {}))
    args = {"model": str(model), "num_shards": num_shards, "dtype": "float32", "device": "cpu",
            "gateway_resources": {"num_cpus": 0.5}, "shard_resources": {"num_cpus": 0.25}, "limits": limits}
    args.update(kw)
    return {"name": name, "route_prefix": f"/{name}", "import_path": "elasticmoe.app:build_app", "args": args}


def serve_config(apps: list[dict]) -> dict:
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "grpc_options": {"port": 9000, "grpc_servicer_functions": [
                "elasticmoe.rpc.generation_pb2_grpc.add_GenerationServicer_to_server"]},
            "applications": apps}


def deploy(lc, apps: list[dict], path: Path, timeout: float = 600) -> None:
    """`serve deploy` a config with these apps and wait until every one is RUNNING."""
    path.write_text(yaml.safe_dump(serve_config(apps)))
    lc.serve_deploy(path)
    for app in apps:
        lc.wait_running(app["name"], timeout=timeout)


def handle(deployment: str, app: str):
    """A DeploymentHandle from this (driver) process, connecting to the local cluster once."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    return serve.get_deployment_handle(deployment, app_name=app)


def make_skewed_model(out: Path, hot: tuple[int, ...] = (0, 1), strength: float = 3.0) -> Path:
    """A tiny Mixtral whose routers favour `hot` experts: each hot row gains the mean router-input direction."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elasticmoe.model.tiny import make_tiny_model

    base = make_tiny_model("mixtral", out.parent / (out.name + "-base"), layers=2, experts=8)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    routers = [layer.mlp.gate for layer in model.model.layers]
    seen: dict[int, list] = {}
    hooks = [r.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for i, r in enumerate(routers)]
    with torch.no_grad():
        for text in ("The quick brown fox jumps over the lazy dog", "Once upon a time there was a king",
                     "Mixture of experts routes tokens", "hello world, this is skewed traffic"):
            model(torch.tensor([tok.encode(text)]))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, r in enumerate(routers):
            x = torch.cat(seen[i])
            d = (x / x.norm(dim=1, keepdim=True)).mean(0)
            scale = r.weight.norm(dim=1).mean() / x.norm(dim=1).mean()
            for rank, e in enumerate(hot):
                r.weight[e] += (strength - rank) * d / d.norm() ** 2 * scale
    model.save_pretrained(str(out))
    for f in base.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out
