"""Tile-config lookup for the Triton MoE kernels: JSON tables per (E, N, K, dtype, device), keyed by tokens."""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_FILE = "default.json"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_warned_default = False


def device_name(device: torch.device) -> str:
    """File-name-safe device name, e.g. "NVIDIA_H100_80GB_HBM3"; "cpu" for non-CUDA devices."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(device)).strip("_")


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" / "float16" / "float32"."""
    return str(dtype).removeprefix("torch.")


def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str) -> str:
    """Name of the tuned table for w13 [E, 2N, K] / w2 [E, K, N] (N = intermediate I, K = hidden H)."""
    return f"E={num_experts},N={inter},K={hidden},dtype={dtype_name(dtype)},device={device}.json"


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict[int, dict] | None:
    """Parse a config JSON {"<tokens>": {BLOCK_M: .., ...}} into {tokens: config}; None if absent."""
    file = Path(path)
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    table = {int(key): _validated(cfg, file) for key, cfg in raw.items() if not key.startswith("_")}
    return table or None


def _validated(cfg: dict, file: Path) -> dict:
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"{file}: config {cfg} lacks {missing}")
    return {key: int(cfg[key]) for key in CONFIG_KEYS}


def nearest(table: dict[int, dict], num_tokens: int) -> dict:
    """The entry whose token-count key is nearest to num_tokens (ties go to the smaller key)."""
    key = min(table, key=lambda m: (abs(m - num_tokens), m))
    return dict(table[key])


def get_config(
    num_experts: int, inter: int, hidden: int, dtype: torch.dtype, num_tokens: int, device: torch.device
) -> dict:
    """Tile config for a call with num_tokens tokens; warns once per process when falling back to defaults."""
    global _warned_default
    table, name = _table_for(num_experts, inter, hidden, dtype, str(device))
    if name is not None and not _warned_default:
        _warned_default = True
        warnings.warn(
            f"elasticmoe.kernels: no tuned MoE config {name} in {CONFIG_DIR}; using default tiles "
            "(run benchmarks/tune_moe.py on this GPU to create one)",
            stacklevel=4,  # the caller of fused_moe
        )
    return nearest(table, num_tokens)


@functools.lru_cache(maxsize=None)
def _table_for(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str):
    """(table, None) for a tuned file, else (default table, missing file name). Cached: once per shape."""
    name = config_file_name(num_experts, inter, hidden, dtype, device_name(torch.device(device)))
    table = load_table(str(CONFIG_DIR / name))
    if table is not None:
        return table, None
    return load_table(str(CONFIG_DIR / DEFAULT_FILE)), name


def clear_cache() -> None:
    """Forget parsed tables (after writing a new config file in this process)."""
    load_table.cache_clear()
    _table_for.cache_clear()
