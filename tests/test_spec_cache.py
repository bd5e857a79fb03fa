"""The spec cache (model.spec_cache): shards and the controller (open_model without the shape check) read the spec
the gateway or the app build derived from the same config.json, without importing transformers, and get the same."""

from __future__ import annotations

import json
import subprocess
import sys

from elasticmoe.model import open_model
from elasticmoe.model.spec_cache import cached_spec

PROBE = """
import json, sys
from elasticmoe.model import open_model
specs = [repr(open_model(p, check_shapes=False).spec) for p in sys.argv[1:]]
print(json.dumps({"specs": specs, "transformers": "transformers" in sys.modules}))
"""


def _probe(paths, env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, paths)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_shard_reads_the_spec_a_gateway_derived_and_imports_no_transformers(tiny_models, tmp_path, monkeypatch):
    """Every tiny family: opened once with the check (as the gateway does) its spec is kept; another process
    opening it without the check gets an equal spec and never imports transformers (~3 s of CPU per replica)."""
    import os

    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    paths = sorted(tiny_models.values())
    fresh = [repr(open_model(p).spec) for p in paths]
    got = _probe(paths, dict(os.environ))
    assert got == {"specs": fresh, "transformers": False}


def test_a_changed_or_torn_config_is_derived_again(tiny_models, tmp_path, monkeypatch):
    """The key is config.json's bytes (with transformers' version and the model code): an edited config.json gives
    its own spec, not the one kept for the old bytes; a torn entry is derived again, and rewritten."""
    import os
    import shutil

    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "m"
    shutil.copytree(tiny_models["mixtral"], ck)
    before = open_model(ck).spec
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 3}))
    assert cached_spec(ck / "config.json") is None
    after = open_model(ck, check_shapes=False)
    assert after.config is not None and after.spec.moe.top_k == 3 != before.moe.top_k
    assert cached_spec(ck / "config.json") == after.spec
    for p in (tmp_path / "cache" / "specs").iterdir():
        p.write_bytes(b"torn")
    assert cached_spec(ck / "config.json") is None
    again = _probe([ck], dict(os.environ))
    assert again["specs"] == [repr(after.spec)] and again["transformers"]  # derived (importing transformers)
    assert cached_spec(ck / "config.json") == after.spec  # and kept again
