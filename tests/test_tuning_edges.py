"""Tuned tile tables: malformed files refused naming the file, and the lookup for shapes a table has no entry for."""

from __future__ import annotations

import json
import re

import pytest
import torch

from elasticmoe.kernels import tuning
from tests.moe_cases import SMALL_TILES


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not a JSON tile table"),
    ("[1, 2]", "expected an object"),
    (json.dumps({"many": SMALL_TILES}), "key 'many' is not a token count"),
    (json.dumps({"8": [16, 32]}), "is not an object of"),
    (json.dumps({"8": dict(SMALL_TILES, BLOCK_M="16")}), "['BLOCK_M'] must be integers"),
    (json.dumps({"8": dict(SMALL_TILES, num_warps=4.5)}), "['num_warps'] must be integers"),
])
def test_malformed_tuned_table_named(text, fragment, tmp_path, monkeypatch, request):
    """A hand-edited table that is not JSON, or whose keys / entries are of the wrong kind, raised a bare
    JSONDecodeError / TypeError / int() error without the file's name (or ran 4.5 warps as 4). Now a ValueError
    naming the file."""
    request.addfinalizer(tuning.clear_cache)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    name = tuning.config_file_name(8, 24, 40, torch.float32, "cpu")
    (tmp_path / name).write_text(text)
    tuning.clear_cache()
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(fragment)):
        tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))


@pytest.mark.parametrize("inter,hidden", [(136, 200), (1408, 2880), (24, 40), (2880, 136)])
def test_lookup_without_an_entry_for_the_shape(inter, hidden, tmp_path, monkeypatch, request):
    """A table for another shape is not used; with none for this one, default tiles fitted to any I / H (powers of
    two >= 16, no wider than the problem); a table's nearest key beyond its largest or below its smallest; and
    E = 0 (no expert held) no longer divides by zero."""
    request.addfinalizer(tuning.clear_cache)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    other = tuning.config_file_name(16, inter, hidden, torch.float32, "cpu")  # E = 16, asked for E = 8
    (tmp_path / other).write_text(json.dumps({"4": dict(SMALL_TILES, num_warps=2)}))
    tuning.clear_cache()
    cpu = torch.device("cpu")
    for tokens, experts, top_k in ((1, 8, 8), (4096, 8, 1), (3, 0, 2)):
        cfg = tuning.get_config(experts, inter, hidden, torch.float32, tokens, cpu, top_k)
        assert cfg["num_warps"] != 2 and set(cfg) == set(tuning.CONFIG_KEYS)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, cfg
        assert cfg["BLOCK_N"] <= max(16, 1 << (min(inter, hidden) - 1).bit_length()), cfg
    table = {"16": dict(SMALL_TILES, BLOCK_M=32), "64": dict(SMALL_TILES, BLOCK_M=64)}
    (tmp_path / tuning.config_file_name(8, inter, hidden, torch.float16, "cpu")).write_text(json.dumps(table))
    tuning.clear_cache()
    picks = [tuning.get_config(8, inter, hidden, torch.float16, t, cpu)["BLOCK_M"] for t in (1, 40, 41, 100000)]
    assert picks == [32, 32, 64, 64]  # nearest key; a tie (40) goes to the smaller
