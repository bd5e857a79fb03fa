"""Which safetensors files of a checkpoint directory hold the model: the ones transformers 5.x loads, no others."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elasticmoe.model.hub import absent
from elasticmoe.model.safetensors_header import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_KEY = "transformers_weights"  # config.json: the weights file (or index) transformers loads instead
_DCP_SHARD = re.compile(r"shard-[0-9]{5}-model-[0-9]{5}-of-[0-9]{5}\.safetensors")  # torch distributed checkpoint


@dataclass(frozen=True)
class WeightFiles:
    """The files to read (names relative to the checkpoint directory, sorted) and the index that lists them."""

    files: tuple[str, ...]
    index: Path | None = None
    placed: dict[str, str] = field(default_factory=dict)  # tensor name -> file, as the index has it


def is_file_name(name: Any) -> bool:
    """Whether `name` names a file inside the checkpoint directory (a relative path, no '..')."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")):
        return False
    parts = Path(name).parts
    return bool(parts) and ".." not in parts and Path(name).name not in ("", ".")


def weight_files(path: Path, config: dict[str, Any]) -> WeightFiles:
    """transformers' choice for a local directory (modeling_utils._get_resolved_checkpoint_files, no variant):
    torch distributed-checkpoint shards first (refused here), then config.json's `transformers_weights`, then
    model.safetensors (an index beside it is ignored), then the files model.safetensors.index.json maps tensors to.
    Any other *.safetensors (consolidated.safetensors, adapter_model.safetensors, a draft model's) is never read;
    a directory with neither file fails naming the ones it has, as transformers finds no weights there."""
    dcp = sorted(p.name for p in path.glob("*.safetensors") if _DCP_SHARD.fullmatch(p.name))
    if dcp:
        raise CheckpointError(f"{path}: {dcp} are torch distributed-checkpoint shards, which transformers loads "
                              "instead of any other weights here and elasticmoe does not read; save the model "
                              "with save_pretrained")
    explicit = config.get(WEIGHTS_KEY)
    if explicit is not None:
        if not (is_file_name(explicit) and explicit.endswith((".safetensors", ".safetensors.index.json"))):
            raise CheckpointError(f"{path / 'config.json'}: {WEIGHTS_KEY}={explicit!r} is not the name of a "
                                  f"*.safetensors or *.safetensors.index.json file in {path}")
        return _from_index(path, path / explicit) if explicit.endswith(".json") else _single(path, explicit)
    if os.path.lexists(path / SINGLE_FILE):
        return _single(path, SINGLE_FILE)
    if os.path.lexists(path / INDEX_FILE):
        return _from_index(path, path / INDEX_FILE)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}, so which of {found} hold this model "
                              f"is unclear (transformers loads none of them): add the index save_pretrained writes, "
                              f"or name the single file {SINGLE_FILE}")
    raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE} (no weights)")


def _single(path: Path, name: str) -> WeightFiles:
    if not (path / name).exists():
        raise CheckpointError(f"{path / name}: {absent(path / name)}")
    return WeightFiles((name,))


def _from_index(path: Path, index: Path) -> WeightFiles:
    """Every file the index places a tensor in, each checked to be a file of the directory that is there."""
    try:
        placed = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    except OSError as e:  # missing, a directory, no permission
        raise CheckpointError(f"{index}: cannot read: {e}") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object): {e}") from e
    for tensor, name in placed.items():
        if not is_file_name(name):
            raise CheckpointError(f"{index}: places {tensor!r} in {name!r}, which is not the name of a file in {path}")
    files = tuple(sorted(set(placed.values())))
    if not files:
        raise CheckpointError(f"{index}: its weight_map places no tensors")
    missing = [name for name in files if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"{index}: names {missing}, missing from {path} (an incomplete download?)")
    return WeightFiles(files, index, placed)
