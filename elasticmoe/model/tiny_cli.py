"""The `make-tiny-model` command's flags and the plain data they check (no torch: the CLI's parser is built here)."""

from __future__ import annotations

import argparse

from elasticmoe.model.embedded import TINY_FAMILIES
from elasticmoe.model.tokenizer import DEFAULT_VOCAB

LAYOUTS: tuple[str, ...] = ("per-expert", "packed")
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # the torch dtypes of tiny.DTYPES
SIZE_UNITS = ("TB", "GB", "MB", "KB")  # what save_pretrained takes (huggingface_hub splits the shards)


def check_shard_size(size: str | int) -> str | int:
    """`size` unless save_pretrained would refuse it (ValueError naming max_shard_size): it did so only after
    save_tiny_model had deleted the output directory's old weights."""
    text = str(size).strip()
    try:
        ok = isinstance(size, int) or (text[-2:].upper() in SIZE_UNITS and float(text[:-2]) >= 0)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"max_shard_size: {size!r} is not a size like '200KB' (units {', '.join(SIZE_UNITS)})")
    return size


def _shard_size_arg(text: str) -> str:
    try:
        return str(check_shard_size(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``make-tiny-model`` options to ``parser``."""
    parser.add_argument("--family", required=True, choices=TINY_FAMILIES)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=None, help="expert FFN size (default: hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help=f"tokenizer/model vocab (default {DEFAULT_VOCAB})")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default 2)")
    parser.add_argument("--layout", choices=LAYOUTS, default="per-expert")
    parser.add_argument("--max-shard-size", type=_shard_size_arg, default=None,
                        help='e.g. "200KB" to shard the safetensors')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharpen", type=float, default=4.0, help="router weight scale")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``make-tiny-model`` from parsed arguments; prints the output path, returns an exit code."""
    from elasticmoe.model.tiny import make_tiny_model

    path = make_tiny_model(
        args.family, args.out, layers=args.layers, experts=args.experts, hidden=args.hidden,
        intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
        top_k=args.top_k, layout=args.layout, max_shard_size=args.max_shard_size, seed=args.seed,
        sharpen=args.sharpen, dtype=args.dtype,
    )
    print(path)
    return 0
