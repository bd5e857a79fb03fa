"""Tile configs for the Triton MoE kernels: tuned JSON tables per (E, N, K, dtype, GPU), else shape-aware defaults.

Tuned tables are looked up, in order, in $ELASTICMOE_MOE_CONFIG_DIR, $ELASTICMOE_CACHE/moe_configs (where
benchmarks/tune_moe.py writes them for this GPU) and the packaged configs/ directory; they are keyed by
token count (nearest key wins). Without one, the tiles follow the expected rows per expert, T * k / E.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "ELASTICMOE_MOE_CONFIG_DIR"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
CONSUMER_SMEM = 101376  # bytes per block on sm_86 / sm_89 / sm_120: every default fits this
SMEM_BY_ARCH = {8: 166912, 9: 232448, 10: 232448}  # major -> opt-in bytes per block (others: consumer)


def _tiles(bm, bn, bk, group, warps, stages) -> dict:
    return dict(zip(CONFIG_KEYS, (bm, bn, bk, group, warps, stages)))


# rows per expert (T * k / E) up to the key -> tiles. Decode streams weights (BN=32: more programs per
# expert); larger M grows BLOCK_M. Shared memory of the gate/up kernel (16-bit), at most
# stages * (BM*BK + 2*BK*BN) * 2 B (sm_90 measured by aot_check: 61,440 / 55,296 / 61,440 / 98,304 / 98,304).
DEFAULT_TILES = (
    (4, _tiles(16, 32, 128, 1, 4, 4)),  # <= 81,920 B
    (16, _tiles(16, 64, 64, 1, 4, 4)),  # <= 73,728 B
    (32, _tiles(32, 64, 64, 8, 4, 4)),  # <= 81,920 B
    (96, _tiles(64, 64, 64, 8, 4, 4)),  # <= 98,304 B
    (None, _tiles(128, 64, 64, 8, 8, 3)),  # <= 98,304 B
)
FP32_CAPS = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_stages": 3}  # exact FMA dots: no spills
W8A8_MIN_BLOCK_K = 32  # Triton's tl.dot of 8-bit operands on NVIDIA GPUs (min_dot_size): K >= 32
_warned_default = False


def device_name(device: torch.device) -> str:
    """File-name-safe device name, e.g. "NVIDIA_H100_80GB_HBM3"; "cpu" for non-CUDA devices."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(device)).strip("_")


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" / "float16" / "float32" / "float8_e4m3fn"."""
    return str(dtype).removeprefix("torch.")


def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str) -> str:
    """Name of the tuned table for w13 [E, 2N, K] / w2 [E, K, N] (N = intermediate I, K = hidden H)."""
    return f"E={num_experts},N={inter},K={hidden},dtype={dtype_name(dtype)},device={device}.json"


def user_config_dir() -> Path:
    """Where tune_moe.py writes: $ELASTICMOE_MOE_CONFIG_DIR, else $ELASTICMOE_CACHE/moe_configs."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    root = Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()
    return root / "moe_configs"


def config_dirs() -> list[Path]:
    """Search order for tuned tables: the user / per-GPU directory first, then the packaged one."""
    return [user_config_dir(), CONFIG_DIR]


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict[int, dict] | None:
    """Parse a config JSON {"<tokens>": {BLOCK_M: .., ...}} into {tokens: config}; None if absent."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a JSON tile table ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected an object {{\"<tokens>\": {{BLOCK_M: ..}}}}, got {type(raw).__name__}")
    table = {_token_key(key, file): _validated(cfg, file) for key, cfg in raw.items() if not key.startswith("_")}
    return table or None


def _token_key(key: str, file: Path) -> int:
    """A table key: a token count, digits only (a key "_..." is a comment)."""
    if not (key.isascii() and key.isdigit()):
        raise ValueError(f"{file}: key {key!r} is not a token count (digits only)")
    return int(key)


def _validated(cfg: dict, file: Path) -> dict:
    """The entry's CONFIG_KEYS as ints; ValueError naming the file and key unless a GPU can compile the tiles:
    BLOCK_* powers of two >= 16 (tl.arange, tl.dot), num_warps a power of two, GROUP_M and num_stages >= 1."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: config {cfg!r} is not an object of {list(CONFIG_KEYS)}")
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"{file}: config {cfg} lacks {missing}")
    wrong = [key for key in CONFIG_KEYS if isinstance(cfg[key], bool) or not isinstance(cfg[key], int)]
    if wrong:
        raise ValueError(f"{file}: config {cfg}: {wrong} must be integers")
    out = {key: cfg[key] for key in CONFIG_KEYS}
    for key, val in out.items():
        tile = key.startswith("BLOCK_")
        if (tile or key == "num_warps") and not (_is_pow2(val) and val >= (16 if tile else 1)) or val < 1:
            need = "a power of two >= 16" if tile else "a power of two" if key == "num_warps" else ">= 1"
            raise ValueError(f"{file}: config {cfg}: {key} must be {need}, got {val}")
    return out


def nearest(table: dict[int, dict], num_tokens: int) -> dict:
    """The entry whose token-count key is nearest to num_tokens (ties go to the smaller key)."""
    key = min(table, key=lambda m: (abs(m - num_tokens), m))
    return dict(table[key])


def default_tiles(rows_per_expert: float) -> dict:
    """Shape-aware default: the first DEFAULT_TILES bucket holding rows_per_expert = T * k / E."""
    return dict(next(cfg for bound, cfg in DEFAULT_TILES if bound is None or rows_per_expert <= bound))


@functools.lru_cache(maxsize=None)
def smem_limit(device: str) -> int:
    """Opt-in shared memory per block of `device`; the consumer-GPU limit for anything but CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return CONSUMER_SMEM
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(dev.index or 0)["max_shared_mem"])
    except Exception:  # noqa: BLE001  no driver query: fall back to the architecture table
        return SMEM_BY_ARCH.get(torch.cuda.get_device_capability(dev)[0], CONSUMER_SMEM)


def smem_bytes(cfg: dict, elem_bytes: int) -> int:
    """Upper bound on the gate/up kernel's shared memory (the larger kernel): stages x (A + 2 B tiles)."""
    per_stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]
    return cfg["num_stages"] * per_stage * elem_bytes


def finalize(cfg: dict, inter: int, hidden: int, dtype: torch.dtype, limit: int, quant: tuple | None = None) -> dict:
    """Cap tiles by the problem (tiny test shapes), fp32 register budget and shared memory `limit`.

    quant (block-FP8 weights): (activation dtype, scale block bk, act_quant); BLOCK_K then divides bk
    (W8A16, the fp32 caps apply to fp32 activations) or equals it (W8A8; a bk that is no power of two, e.g. 96:
    the largest power of two dividing it, at most 128).
    """
    cfg = dict(cfg)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, _pow2(min(inter, hidden))))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, _pow2(min(inter, hidden))))
    act_dtype, group_k, act_quant = quant or (dtype, None, False)
    if act_dtype == torch.float32 and not act_quant:
        cfg = {key: min(val, FP32_CAPS.get(key, val)) for key, val in cfg.items()}
    if group_k is not None:
        if act_quant:  # bk = 96 -> 32: the kernel then loads each tile's whole bk group for the amax
            cfg["BLOCK_K"] = group_k if _is_pow2(group_k) else min(group_k & -group_k, 128)
        else:  # the largest power of two <= BLOCK_K dividing bk (bk = 96 -> 32; min(BLOCK_K, bk) could be 96)
            while cfg["BLOCK_K"] > 16 and group_k % cfg["BLOCK_K"]:
                cfg["BLOCK_K"] //= 2
        check_quant_tiles(cfg, group_k, act_quant)
    if act_quant and cfg["BLOCK_M"] >= 64:  # quantizing a [BM, 128] tile per step: 4 warps spill (sm_90)
        cfg["num_warps"] = max(cfg["num_warps"], 8)
    elem = torch.empty((), dtype=act_dtype).element_size()  # >= the weights' bytes: an upper bound for fp8
    while smem_bytes(cfg, elem) > limit and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while smem_bytes(cfg, elem) > limit and cfg["BLOCK_K"] > 32 and not act_quant:
        cfg["BLOCK_K"] //= 2
    while smem_bytes(cfg, elem) > limit and cfg["BLOCK_M"] > 16:
        cfg["BLOCK_M"] //= 2
    return cfg


def check_quant_tiles(cfg: dict, group_k: int, act_quant: bool) -> None:
    """Raise ValueError unless BLOCK_K fits the scale block bk = group_k: divides it (W8A16) or equals it (W8A8;
    divides it there too when bk is no power of two). W8A8 also needs BLOCK_K >= W8A8_MIN_BLOCK_K (a dot of fp8
    operands takes K >= 32 on a GPU; the interpreter runs any K), so bk a multiple of 32."""
    block_k = cfg["BLOCK_K"]
    tile_group = act_quant and _is_pow2(group_k)
    fits = block_k == group_k if tile_group else group_k % block_k == 0
    if not fits or block_k < 16 or not _is_pow2(block_k):
        need = f"== {group_k}" if tile_group else f"a power of two >= 16 dividing {group_k}"
        raise ValueError(f"block-FP8 tiles need BLOCK_K {need}; got {block_k}")
    if act_quant and block_k < W8A8_MIN_BLOCK_K:
        raise ValueError(f"act_quant (W8A8) needs the scale block bk a multiple of {W8A8_MIN_BLOCK_K} (a K step stays "
                         f"in one bk group, and a GPU's fp8 dot takes K >= {W8A8_MIN_BLOCK_K}); bk = {group_k} gives "
                         f"BLOCK_K {block_k}: use act_quant=False (W8A16)")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def get_config(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, num_tokens: int,
               device: torch.device, top_k: int = 1, quant: tuple | None = None) -> dict:
    """Tile config for a call with num_tokens tokens; warns once per process when no tuned table exists.

    dtype: the weights' (names the tuned table); quant: see finalize (block-FP8 weights)."""
    global _warned_default
    table, name = _table_for(num_experts, inter, hidden, dtype, str(device))
    if table is None and not _warned_default:
        _warned_default = True
        warnings.warn(
            f"elasticmoe.kernels: no tuned MoE config {name} in {[str(d) for d in config_dirs()]}; using "
            "shape-aware default tiles (run benchmarks/tune_moe.py on this GPU to create one)",
            stacklevel=4,  # the caller of fused_moe
        )
    cfg = nearest(table, num_tokens) if table else default_tiles(num_tokens * top_k / max(num_experts, 1))
    return finalize(cfg, inter, hidden, dtype, smem_limit(str(device)), quant)


def candidate_configs(num_experts: int, inter: int, hidden: int, dtype: torch.dtype,
                      device: torch.device, quant: tuple | None = None) -> list[dict]:
    """Every distinct config get_config can return for this shape (what a warm-up must compile)."""
    table, _ = _table_for(num_experts, inter, hidden, dtype, str(device))
    raw = table.values() if table else [cfg for _, cfg in DEFAULT_TILES]
    return distinct([finalize(cfg, inter, hidden, dtype, smem_limit(str(device)), quant) for cfg in raw])


def distinct(configs) -> list[dict]:
    """The configs without repeats, first occurrences in order."""
    return [dict(items) for items in dict.fromkeys(tuple(c.items()) for c in configs)]


@functools.lru_cache(maxsize=None)
def _table_for(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str):
    """(tuned table or None, file name). Cached: once per shape."""
    name = config_file_name(num_experts, inter, hidden, dtype, device_name(torch.device(device)))
    for folder in config_dirs():
        table = load_table(str(folder / name))
        if table is not None:
            return table, name
    return None, name


def clear_cache() -> None:
    """Forget parsed tables (after writing a new config file in this process)."""
    load_table.cache_clear()
    _table_for.cache_clear()
    smem_limit.cache_clear()
