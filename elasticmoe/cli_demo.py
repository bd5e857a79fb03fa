"""The `elasticmoe demo` command: check the config and model, restart the local Ray cluster, deploy, send prompts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_MIN_CPUS = 4  # logical CPUs the demo starts its local Ray node with, at least
DEMO_CONFIG_NAME = "tiny.yaml"  # the demo's default: deployments/tiny.yaml, as local_cluster.tiny_serve_config()


def demo_cpus(text: str) -> int:
    """An argparse type: the demo's logical CPUs for the local Ray node, DEMO_MIN_CPUS or more (was raised silently)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < DEMO_MIN_CPUS:
        raise argparse.ArgumentTypeError(f"must be at least {DEMO_MIN_CPUS} (logical CPUs: more than the machine's "
                                         f"cores is fine), got {value}")
    return value


def _read_serve_config(config: Path) -> dict:
    """The Serve config at `config`, refused naming the file (ValueError) unless its first application has a name
    and args and its gRPC port is a number: the demo reads it before it restarts the local Ray cluster."""
    import yaml

    try:
        text = config.read_text()
    except OSError as e:
        raise ValueError(f"--config {config}: cannot be read ({e.strerror or e})") from None
    try:
        doc = yaml.safe_load(text)
        app = doc["applications"][0]
        if not isinstance(app["name"], str) or not isinstance(app.get("args", {}), dict):
            raise TypeError("the first application needs a name and args")
        int((doc.get("grpc_options") or {}).get("port", 9000))
    except (yaml.YAMLError, LookupError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"--config {config}: not a Serve config with an application "
                         f"({type(e).__name__}: {e})") from None
    return doc


def _demo_config(config: Path | None, model: str) -> tuple[Path, dict]:
    """(where it is written, next to the cached models; its content) of the Serve config the demo deploys: the file
    `config` (--config), else deployments/tiny.yaml as the package builds it (local_cluster.tiny_serve_config: a
    wheel has no deployments/), with its first application's model set to `model`. The demo checks and targets
    this content, not the file read again."""
    import yaml

    from elasticmoe.local_cluster import tiny_serve_config
    from elasticmoe.model.embedded import cache_dir

    doc = tiny_serve_config() if config is None else _read_serve_config(config)
    doc["applications"][0].setdefault("args", {})["model"] = model
    out = cache_dir() / f"demo-{DEMO_CONFIG_NAME if config is None else config.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out, doc


def _demo_target(doc: dict) -> tuple[str, int]:
    """(first application's name, gRPC port) of a Serve config: where the demo's requests go."""
    return doc["applications"][0]["name"], int((doc.get("grpc_options") or {}).get("port", 9000))


def _check_demo_app(app_args: dict) -> None:
    """Refuse, before the running cluster is stopped, what the deploy would fail on: the app args (AppArgs, the
    model's config.json) and the checkpoint, opened as the controller opens it (its weights' index, its family,
    autoscaling.slots_per_shard against its experts), and its tokenizer, loaded as the gateway loads it."""
    from elasticmoe.app import resolve_args
    from elasticmoe.config import check_slots
    from elasticmoe.engine.checkpoint_defaults import load_tokenizer
    from elasticmoe.model import open_model

    args = resolve_args(app_args)
    files = open_model(args.model)
    files.ckpt.close()
    check_slots(args, files.spec.moe.num_experts)  # as the controller does: a tiny:<family> model is known only now
    load_tokenizer(files.ckpt.path)


def cmd_demo(ns: argparse.Namespace) -> int:
    from elasticmoe import local_cluster as lc
    from elasticmoe import status_view
    from elasticmoe.client import GenerationClient
    from elasticmoe.model.demo import DEMO_PROMPTS
    from elasticmoe.model.embedded import ensure_tiny_model

    given = None if ns.config is None else Path(ns.config)
    config, doc = _demo_config(given, ns.model)  # refused before the running cluster is stopped
    app, grpc_port = _demo_target(doc)
    t0 = time.perf_counter()
    path = ensure_tiny_model(ns.model[len("tiny:"):]) if ns.model.startswith("tiny:") else ns.model
    print(f"[1/4] model {ns.model}: {path} ({time.perf_counter() - t0:.1f}s)")
    _check_demo_app(doc["applications"][0].get("args", {}))  # the model and the args, before Ray is stopped
    print("[2/4] starting a local Ray cluster on 127.0.0.1 ...")
    lc.stop_ray()
    lc.start_ray(num_cpus=ns.cpus)
    shown = f"deployments/{DEMO_CONFIG_NAME}" if given is None else ns.config
    print(f"[3/4] serve deploy {shown} (model: {ns.model}) ...")
    lc.serve_deploy(config)
    lc.wait_running(app)
    client = GenerationClient(f"127.0.0.1:{grpc_port}", app=app)
    print("[4/4] requests through the gRPC API (greedy):")
    for prompt in DEMO_PROMPTS:
        t0 = time.perf_counter()
        r = client.generate(prompt, max_tokens=24, temperature=0.0)
        print(f"  {prompt!r} -> {r.text!r}  ({r.usage.completion_tokens} tokens, {time.perf_counter() - t0:.2f}s)")
    client.close()
    st = status_view.controller_status("auto", app)
    for s in st["shards"]:
        print(f"  shard {s['position']} ({s['address']}): {s.get('held', 0)} experts, served {s.get('tokens', 0)} "
              f"token-expert pairs in {s.get('calls', 0)} calls")
    named = "" if app == "elasticmoe" else f" --app {app}"
    target = ("" if grpc_port == 9000 else f" --address 127.0.0.1:{grpc_port}") + named
    print("\nThe cluster keeps running. Send more with:\n"
          f"  .venv/bin/elasticmoe generate \"The quick brown fox\" --max-tokens 32 --temperature 0 --stream{target}\n"
          f"  .venv/bin/elasticmoe status --watch{named}\n"
          "Stop it with:\n  make stop   (ray stop)")
    return 0
