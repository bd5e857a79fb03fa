"""A checkpoint's routed experts, every one held in this process: the store the in-process gateway tests run on."""

from __future__ import annotations

from pathlib import Path

import torch

from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model


def full_store(files) -> ExpertStore:
    """Every (layer, expert) of `files` (open_model's), float32 on the CPU."""
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load((l, e) for l in files.spec.moe.moe_layers for e in range(files.spec.moe.num_experts))  # noqa: E741
    return store


def tiny_mixtral(folder: Path) -> tuple[str, object, ExpertStore]:
    """A tiny Mixtral (2 layers, 4 experts) written in folder: (its path, open_model's files, full_store)."""
    path = str(make_tiny_model("mixtral", folder / "mixtral", layers=2, experts=4))
    files = open_model(path)
    return path, files, full_store(files)


class FussyTokenizer:
    """The model's tokenizer, except that decoding token `bad` raises (a tokenizer failure on one request's text)."""

    def __init__(self, tokenizer, bad: int):
        self.tokenizer, self.bad = tokenizer, bad

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids, **kw):
        if self.bad in ids:
            raise ValueError(f"injected: cannot decode token {self.bad}")
        return self.tokenizer.decode(ids, **kw)
