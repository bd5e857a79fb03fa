"""The numbers and settings docs/DEPLOY.md states about the cluster configs, the Serve configs, the image and the
production Helm values are those files' (tests/test_deploy_doc.py: its commands; tests/test_deploy_configs.py: the
files' validity)."""

from __future__ import annotations

import functools

import yaml

from tests.doc_util import CHART, REPO


@functools.cache
def _doc() -> str:
    return " ".join((REPO / "docs" / "DEPLOY.md").read_text().split())


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def _args(name: str) -> dict:
    return _yaml(f"deployments/{name}.yaml")["applications"][0]["args"]


def test_serve_configs_ask_for_the_gpus_the_doc_names():
    doc = _doc()
    assert "`qwen3-30b-a3b.yaml` (H100), `mixtral-8x7b.yaml` (L40S), `deepseek-v2-lite.yaml` (any GPU of 48 GB" in doc
    assert "`autoscaling.min_shards..max_shards` (2..8)" in doc
    qwen, mixtral, deepseek = _args("qwen3-30b-a3b"), _args("mixtral-8x7b"), _args("deepseek-v2-lite")
    assert (qwen["autoscaling"]["min_shards"], qwen["autoscaling"]["max_shards"]) == (2, 8)
    for args, accelerator in ((qwen, "H100"), (mixtral, "L40S"), (deepseek, None)):
        for part in ("gateway_resources", "shard_resources"):
            assert args[part].get("accelerator_type") == accelerator, (args["model"], part)
    assert qwen["model"] == "Qwen/Qwen3-30B-A3B" and deepseek["model"].startswith("deepseek-ai/DeepSeek-V2-Lite")


def test_the_scale_in_warm_up_and_cool_down_are_the_configs():
    """The cool-down DEPLOY.md names is autoscaling.scale_cooldown_s and its default, ScaleDecider's cool-down,
    which is also its warm-up after the start (tests/test_controller_loads.py::
    test_no_scale_in_before_the_cluster_is_up_and_warmed_up, test_the_cool_down_is_the_configs)."""
    from elasticmoe.autoscaler.policy import ScaleDecider
    from elasticmoe.config import Autoscaling

    assert ("It removes none before every shard it started with is up and `autoscaling.scale_cooldown_s` (default "
            "30 s) more have passed (a just-deployed cluster is idle: no request has come yet), nor makes a change "
            "of its own that soon after any change of the count") in _doc()
    assert Autoscaling().scale_cooldown_s == 30.0 == ScaleDecider(1, 2, 0.5).cooldown_s


def test_the_start_deadline_is_the_configs():
    """DEPLOY.md's start deadline is autoscaling.start_deadline_s and its default
    (tests/test_controller_start_deadline.py)."""
    from elasticmoe.config import Autoscaling

    assert ("A shard position that has had no live replica for `autoscaling.start_deadline_s` (default 600 s; "
            "`null`: wait for good)") in _doc()
    assert Autoscaling().start_deadline_s == 600.0 and Autoscaling(start_deadline_s=None).start_deadline_s is None


def _node(cluster: dict, name: str) -> tuple[str, int | None, int | None, dict]:
    t = cluster["available_node_types"][name]
    config = t["node_config"]
    return (config.get("InstanceType") or config.get("machineType"), t.get("min_workers"), t.get("max_workers"),
            t["resources"])


def test_cloud_node_types_are_the_ones_described():
    doc = _doc()
    aws, gcp = _yaml("cluster/aws.yaml"), _yaml("cluster/gcp.yaml")
    assert "a CPU head (`m7i.2xlarge`)" in doc and _node(aws, aws["head_node_type"])[0] == "m7i.2xlarge"
    assert "`p5.48xlarge` (8 x H100 80 GB; 1 at start, up to 2) for Qwen3" in doc
    assert "`g6e.12xlarge` (4 x L40S 48 GB; 0 at start) for Mixtral" in doc
    assert "`a3-highgpu-8g` workers (8 x H100 80 GB; 1 at start, up to 2)" in doc
    for cluster, name, machine, low, high, gpus, accelerator in (
            (aws, "gpu_h100", "p5.48xlarge", 1, 2, 8, "H100"), (aws, "gpu_l40s", "g6e.12xlarge", 0, None, 4, "L40S"),
            (gcp, "gpu_h100", "a3-highgpu-8g", 1, 2, 8, "H100")):
        got, lo, hi, resources = _node(cluster, name)
        assert (got, lo) == (machine, low) and (high is None or hi == high), name
        assert resources["GPU"] == gpus and resources[f"accelerator_type:{accelerator}"] == 1, name
    assert "the host's `/mnt/models` mounted at `/models`" in doc
    assert "-v /mnt/models:/models" in aws["docker"]["run_options"]


def test_every_node_starts_ray_as_the_doc_says():
    """"All three start Ray with RAY_AUTH_MODE=token ..., the dashboard binds 127.0.0.1 ..., and export Ray's
    metrics on port 8080 of every node"."""
    doc = _doc()
    assert "export Ray's metrics on port 8080 of every node" in doc
    for name in ("aws", "gcp", "local"):
        cluster = _yaml(f"cluster/{name}.yaml")
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = " ".join(" ".join(cluster[key]).split())
            for setting in ("RAY_AUTH_MODE=token", "ELASTICMOE_TLS_", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
                            "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=4194304", "ELASTICMOE_EXPERT_HOST=node_ip",
                            "--metrics-export-port=8080"):
                assert setting in start, (name, key, setting)
            if key.startswith("head"):
                assert "--dashboard-host=127.0.0.1" in start, name


def test_the_image_is_built_as_described():
    doc, dockerfile = _doc(), (REPO / "Dockerfile").read_text()
    assert "(`rayproject/ray:2.60.0-py311-cu128`" in doc
    assert "ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128" in dockerfile
    assert "installs `torch==2.13.0` from PyTorch's CUDA 12.8 index" in doc
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" in dockerfile
    assert "Build arguments: `RAY_IMAGE`, `TORCH_VERSION`, `TORCH_INDEX_URL`" in doc
    assert "`HF_HOME=/models`" in doc and "HF_HOME=/models" in dockerfile
    assert "python -m elasticmoe.rpc.generate --check" in dockerfile  # "fails the build if ... stale"
    assert "m._SRC.is_file()" in dockerfile and "`kernels/cpu_gemm.c`) is missing" in doc


def test_production_values_the_doc_quotes():
    doc = _doc()
    prod = yaml.safe_load((CHART / "values-gpu-production.yaml").read_text())
    assert "`rayService.initializingTimeout` (60 minutes in production)" in doc
    assert prod["rayService"]["initializingTimeout"] == "60m"
    assert "e.g. `hf-token` for Mixtral in the production values" in doc
    assert prod["model"]["download"]["hfTokenSecret"]["name"] == "hf-token"


def test_the_args_that_start_the_placement_over_are_the_ones_named():
    """"The new controller resumes ... when the args that decide what the placement means are unchanged: `model`,
    `revision`, `dtype`, `device`, `num_shards`, `expert_copies`, `autoscaling.slots_per_shard`, whether `autoscaling`
    is set, and `insecure_internal`": those are what the record's placement key hashes, and a change of a timing arg
    leaves the key as it was (tests/test_controller_redeploy.py: what a restarted controller does with each)."""
    import re

    from elasticmoe.autoscaler.recovery import PLACEMENT_ARGS, placement_key
    from elasticmoe.config import AppArgs

    said = re.search(r"when the args that decide what the placement means are unchanged: (.*?)\. It runs", _doc())
    named = re.findall(r"`([\w.]+)`", said.group(1))
    assert "whether `autoscaling` is set" in said.group(1)
    assert set(named) == set(PLACEMENT_ARGS) | {"autoscaling.slots_per_shard", "autoscaling"}
    base = {"model": "tiny:mixtral", "num_shards": 2, "autoscaling": {"max_shards": 4}}

    def key(**change) -> str:
        args = {**base, **change}
        return placement_key(AppArgs(**{k: v for k, v in args.items() if v is not None}))

    assert key(autoscaling={"max_shards": 4, "scale_cooldown_s": 5, "start_deadline_s": 60,
                            "rebalance_interval_s": 1}, limits={"max_num_seqs": 2}) == key()
    changed = [key(autoscaling=None), key(autoscaling={"max_shards": 4, "slots_per_shard": 3}), key(dtype="bfloat16"),
               key(num_shards=3), key(expert_copies=2), key(insecure_internal=True), key(model="tiny:qwen2_moe")]
    assert len({key(), *changed}) == len(changed) + 1


def test_shard_bounds_as_deployment_options_are_taken_as_the_doc_says():
    """Step 6: "the Controller's `user_config: {min_shards: 2, max_shards: 6}` (within the args'
    `autoscaling.min_shards..max_shards`) and ExpertShard's `autoscaling_config` with the same `min_replicas` /
    `max_replicas`": over qwen3-30b-a3b.yaml's args (2..8) the controller takes them (config.ScaleConfig, in place:
    tests/test_controller_scale_config.py) and Serve's schema the options; 2..12 is refused, beyond the args'."""
    import re

    import pytest

    from elasticmoe.app import shard_autoscaling
    from elasticmoe.config import AppArgs, ScaleConfig
    from tests.test_deploy_configs import _serve_schema

    said = re.search(r"the Controller's `user_config: \{min_shards: (\d+), max_shards: (\d+)\}` \(within the args' "
                     r"`autoscaling.min_shards..max_shards`\) and ExpertShard's `autoscaling_config`", _doc())
    lo, hi = int(said.group(1)), int(said.group(2))
    config = _yaml("deployments/qwen3-30b-a3b.yaml")
    args = AppArgs.model_validate(config["applications"][0]["args"])
    ScaleConfig(min_shards=lo, max_shards=hi).within(args)
    with pytest.raises(ValueError, match="must lie within args"):
        ScaleConfig(min_shards=lo, max_shards=12).within(args)
    config["applications"][0]["deployments"] = [
        {"name": "Controller", "user_config": {"min_shards": lo, "max_shards": hi}},
        {"name": "ExpertShard", "autoscaling_config": shard_autoscaling(lo, hi)}]
    (app,) = _serve_schema(config).applications
    assert app.deployments[1].autoscaling_config["max_replicas"] == hi


def test_the_upgrade_promises_are_the_codes():
    """DEPLOY.md's "Upgrades between releases": the frame magic and flag bits, the proto field numbers, the record's
    format, key and namespace, and the messages it quotes are the code's (tests/test_wire_versions.py,
    tests/test_rolling_weights.py and tests/test_controller_record_compat.py: what each side does)."""
    import inspect

    from elasticmoe.autoscaler import record, recovery
    from elasticmoe.gateway import deployment
    from elasticmoe.rpc import experts_pb2 as pb
    from elasticmoe.rpc import frames

    from elasticmoe.config import GATEWAY_DRAIN_S

    doc = _doc()
    assert "drains its requests (its graceful shutdown, up to 600 s)" in doc and GATEWAY_DRAIN_S == 600
    assert "the magic names the layout, `EMF1`" in doc and frames.MAGIC == b"EMF1"
    assert "Flag bits 0-3 are hints" in doc and "bits 4-7 change what the tensors mean" in doc
    assert (frames.HINT_FLAGS, frames.REQUIRED_FLAGS, frames.DUPLICATE) == (0x0F, 0xF0, 1)
    assert "(`frame format b'EMF2'; this release reads b'EMF1' only`)" in doc
    assert "frame format {bytes(magic)!r}; this release reads {MAGIC!r} only" in inspect.getsource(frames)
    fields = {"`GetStatsResponse.busy_us` (9)": pb.GetStatsResponse.BUSY_US_FIELD_NUMBER == 9,
              "`duplicates` (10)": pb.GetStatsResponse.DUPLICATES_FIELD_NUMBER == 10,
              "`RunExpertsRequest.duplicate` (7)": pb.RunExpertsRequest.DUPLICATE_FIELD_NUMBER == 7}
    assert all(name in doc and right for name, right in fields.items()), fields
    assert "key `controller/<app>` in namespace `elasticmoe`" in doc and record._NAMESPACE == "elasticmoe"
    assert 'self.key = f"controller/{app_name}"' in inspect.getsource(record)
    assert "a JSON document of `format` 1" in doc and record.FORMAT == 1
    assert "(`starting over`)" in doc and inspect.getsource(recovery).count("starting over") >= 3
    assert "(its log: `routing table is of other weights`" in doc
    assert "routing table is of other weights" in inspect.getsource(deployment)
