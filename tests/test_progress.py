"""Weight-loading progress: a tqdm bar of bytes and rate on a terminal, one log line (and no bar) otherwise."""

from __future__ import annotations

import logging

import pytest
import torch

from elasticmoe import progress
from elasticmoe.model import open_model
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.experts import ExpertStore


@pytest.fixture(scope="module")
def files(tiny_models):
    return open_model(str(tiny_models["mixtral"]))


def _load_experts(files) -> int:
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    return store.load((l, e) for l in files.spec.moe.moe_layers for e in range(files.spec.moe.num_experts))


def test_bars_on_request_show_bytes_rate_and_total(files, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    nbytes = _load_experts(files)
    DenseModel(files.spec, files.ckpt, files.names, torch.float32, torch.device("cpu"), 64)
    err = capsys.readouterr().err.replace("\r", "\n")
    expert_lines = [line for line in err.splitlines() if line.startswith("loading experts")]
    assert expert_lines and "100%" in expert_lines[-1] and "B/s" in expert_lines[-1]
    assert f"{nbytes / 1024 ** 2:.2f}M" in expert_lines[-1] or f"{nbytes / 1024:.0f}k" in expert_lines[-1]
    dense = [line for line in err.splitlines() if line.startswith("loading the dense half")]
    assert dense and "B/s" in dense[-1]


def test_no_bar_without_a_terminal_and_one_line_per_slow_load(files, monkeypatch, capsys, caplog):
    monkeypatch.delenv(progress.ENV, raising=False)  # pytest's stderr is no terminal
    monkeypatch.setattr(progress, "MIN_LOG_S", 0.0)
    with caplog.at_level(logging.INFO, logger="elasticmoe.load"):
        _load_experts(files)
    assert capsys.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "elasticmoe.load"]
    n = len(files.spec.moe.moe_layers) * files.spec.moe.num_experts
    assert len(lines) == 1 and lines[0].startswith(f"loading experts: {n} in ") and "MB/s" in lines[0]


def test_fast_loads_are_not_logged(files, monkeypatch, caplog):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "MIN_LOG_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="elasticmoe.load"):
        _load_experts(files)
    assert not [r for r in caplog.records if r.name == "elasticmoe.load"]


def test_flag_overrides_the_terminal_check(monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.bars_enabled(Tty())
    monkeypatch.delenv(progress.ENV)
    assert progress.bars_enabled(Tty()) and not progress.bars_enabled(object())
