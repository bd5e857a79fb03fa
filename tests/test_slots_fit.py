"""autoscaling.slots_per_shard too small for the model's experts: refused at Serve's app build, naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

E = 6  # experts of the checkpoint: not the tiny models' default 8, so the number comes from its config.json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return make_tiny_model("olmoe", tmp_path_factory.mktemp("slots") / "m", layers=2, experts=E)


def _args(model, slots: int, **kw) -> dict:
    return {"model": str(model), "num_shards": 2, "autoscaling": {"max_shards": 4, "slots_per_shard": slots}, **kw}


@pytest.mark.parametrize("slots, copies, message", [
    (2, 1, r"num_shards \(2\) \* slots_per_shard = 4 < the model's 6 experts \* expert_copies \(1\) = 6 expert "
           r"copies per layer; set slots_per_shard to at least 3, or leave it unset"),
    (5, 2, r"num_shards \(2\) \* slots_per_shard = 10 < the model's 6 experts \* expert_copies \(2\) = 12 .* at "
           r"least 6"),
])
def test_the_app_build_refuses_too_few_slots_naming_the_field(ckpt, slots, copies, message):
    """It passed Serve's build and failed only in the controller's constructor (its initial placement), as
    'num_shards * slots_per_shard = 4 < num_experts * copies = 6': the deploy retried the controller until Serve
    gave up, and the message named no field as the config writes it. build_app now refuses it."""
    from elasticmoe.app import build_app

    with pytest.raises(ValueError, match=rf"^elasticmoe app args: autoscaling\.slots_per_shard \({slots}\) is too "
                                         rf"small: {message}"):
        build_app(_args(ckpt, slots, expert_copies=copies))
    assert build_app(_args(ckpt, slots + 1, expert_copies=copies)) is not None  # one more fits: E * copies slots


def test_the_build_reads_only_config_json(ckpt, tmp_path):
    """A `ray up` head may hold only a checkpoint's JSON files: the build reads the expert count from config.json,
    with no weight file there, and refuses or accepts as with the weights."""
    from elasticmoe.app import build_app

    head = tmp_path / "head"
    head.mkdir()
    shutil.copy(ckpt / "config.json", head / "config.json")
    with pytest.raises(ValueError, match=r"autoscaling\.slots_per_shard \(2\) is too small"):
        build_app(_args(head, 2))
    assert build_app(_args(head, 3)) is not None
    assert build_app({"model": str(head), "num_shards": 2, "autoscaling": {"max_shards": 4}}) is not None  # default


def test_the_controller_refuses_too_few_slots_naming_the_field(ckpt):
    """What the build cannot see (a tiny:<family> model is made by the replicas) the controller refuses at start with
    the same message: it said 'num_shards * slots_per_shard = 4 < num_experts * copies = 6'."""
    from elasticmoe.autoscaler.controller import Controller

    with pytest.raises(ValueError, match=r"autoscaling\.slots_per_shard \(2\) is too small: num_shards \(2\)"):
        Controller.func_or_class(_args(ckpt, 2))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """An ELASTICMOE_CACHE for the demo's tests: tiny:mixtral is made there once, on first use."""
    return tmp_path_factory.mktemp("cache")


def _mixtral_demo(slots: int) -> dict:
    """deployments/tiny.yaml serving tiny:mixtral (8 experts) with max_shards 4 and slots_per_shard `slots`."""
    from elasticmoe.local_cluster import tiny_serve_config

    doc = tiny_serve_config("tiny:mixtral")
    doc["applications"][0]["args"]["autoscaling"] = {"max_shards": 4, "slots_per_shard": slots}
    return doc


def test_the_demo_refuses_too_few_slots_for_a_tiny_model_before_ray(demo_cache, monkeypatch):
    """`elasticmoe demo --config C` with a tiny:<family> model (8 experts, made on first use): the check before the
    running cluster is stopped opens the model and refuses C's slots_per_shard, naming it."""
    from elasticmoe.cli_demo import _check_demo_app

    monkeypatch.setenv("ELASTICMOE_CACHE", str(demo_cache))
    args = _mixtral_demo(3)["applications"][0]["args"]
    with pytest.raises(ValueError, match=r"autoscaling\.slots_per_shard \(3\) is too small: .* = 6 < the model's 8 "
                                         r"experts \* expert_copies \(1\) = 8 .* at least 4"):
        _check_demo_app(args)
    _check_demo_app(_mixtral_demo(4)["applications"][0]["args"])


def test_the_demo_reads_its_config_once(demo_cache, tmp_path, monkeypatch, capsys):
    """`elasticmoe demo --config C`: C was read, then the copy it writes (C with --model) read back twice, for the
    requests' target and for the check. Now C is read once; the check (here refusing C's slots, before Ray) and the
    target take what was written."""
    from elasticmoe import local_cluster
    from elasticmoe.cli import main

    monkeypatch.setenv("ELASTICMOE_CACHE", str(demo_cache))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_mixtral_demo(3)))
    reads, read_text = [], Path.read_text

    def counted(self, *args, **kwargs):
        if self.suffix == ".yaml":
            reads.append(self.name)
        return read_text(self, *args, **kwargs)

    def refuse_ray() -> None:  # a guard: a demo that got past its check must not stop a running cluster here
        raise RuntimeError("the demo got past its check and went on to stop Ray")

    monkeypatch.setattr(Path, "read_text", counted)
    monkeypatch.setattr(local_cluster, "stop_ray", refuse_ray)
    assert main(["demo", "--config", str(config), "--model", "tiny:mixtral"]) == 1
    err = capsys.readouterr().err
    assert "elasticmoe demo: error: ValueError: autoscaling.slots_per_shard (3) is too small" in err, err
    assert reads == ["c.yaml"]
