"""The controller's MoE layout (model.layout): the spec's own figures, read from the spec cache without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from elasticmoe.model import open_model
from elasticmoe.model.layout import MoELayout, moe_layout
from elasticmoe.model.spec_cache import _path, cached_layout

PROBE = """
import json, sys
from elasticmoe.autoscaler.controller import Controller
out = []
for p in sys.argv[1:]:
    c = Controller.func_or_class({"model": p, "num_shards": 2, "dtype": "float32", "device": "cpu"})
    out.append([c.metrics.num_layers, c.moe_layers, c.num_experts])
print(json.dumps({"layouts": out, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def _probe(paths, env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, paths)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected(path) -> list:
    spec = open_model(path).spec  # as the gateway (or the app build) derives and keeps it
    return [spec.num_layers, spec.moe.moe_layers, spec.moe.num_experts]


def test_a_controller_plans_on_the_spec_a_gateway_derived_and_imports_no_torch(tiny_models, tmp_path, monkeypatch):
    """Every tiny family (dense layers first: deepseek_v3, qwen2_moe's shared experts...): a real Controller built
    in a fresh process finds the layers, MoE layers and experts of the spec, and imports neither torch nor
    transformers (before: ~1.6 s of CPU and ~200 MB per controller replica)."""
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    paths = sorted(tiny_models.values())
    want = [_expected(p) for p in paths]
    assert any(w[1] != list(range(w[0])) for w in want)  # some family has dense layers among its MoE ones
    assert _probe(paths, dict(os.environ)) == {"layouts": want, "torch": False, "transformers": False}


def test_without_a_kept_spec_the_layout_is_derived_and_kept(tiny_models, tmp_path, monkeypatch):
    """No cache entry (a controller on a node where nothing derived the spec), then a torn one and one of other
    figures: each time the layout comes from open_model (importing torch), equal to the spec's, and is kept whole."""
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    path = tiny_models["deepseek_v3"]
    config = path / "config.json"
    spec = open_model(path).spec
    want = MoELayout(spec.num_layers, tuple(spec.moe.moe_layers), spec.moe.num_experts)
    kept = _path(config, ".layout.json")
    for damage in (None, b"{torn", json.dumps({"num_layers": 3, "moe_layers": [5], "num_experts": 8}).encode(),
                   json.dumps({"num_layers": 3, "moe_layers": [1, 1], "num_experts": 8}).encode()):
        if damage is None:
            kept.unlink()
            _path(config).unlink()
        else:
            kept.write_bytes(damage)
        assert cached_layout(config) is None, damage
        assert moe_layout(path) == want
        assert moe_layout(f"{path}{os.sep}") == want
    assert cached_layout(config) == {"num_layers": want.num_layers, "moe_layers": list(want.moe_layers),
                                     "num_experts": want.num_experts}


def test_a_bad_model_fails_as_open_model_does(tmp_path, monkeypatch):
    """No cache to read: the controller's error is open_model's, naming the file."""
    import pytest

    from elasticmoe.model import CheckpointError

    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        moe_layout(tmp_path / "m")
