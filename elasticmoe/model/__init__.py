"""Executing Hugging Face MoE checkpoints as a dense half plus an expert half."""

from __future__ import annotations

from typing import TYPE_CHECKING

from elasticmoe.lazy import lazy_exports

# Public names -> defining submodule. Resolved lazily (PEP 562) so that a module here that needs no torch (tiny_cli,
# embedded, families) imports none: the `elasticmoe` command's parser reads tiny_cli (tests/test_cli_imports.py).
_EXPORTS: dict[str, str] = {
    "Checkpoint": "checkpoint",
    "CheckpointError": "safetensors_header",
    "ModelFiles": "files",
    "ModelSpec": "spec",
    "ModelSpecError": "family_config",
    "open_model": "files",
    "read_spec": "files",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from elasticmoe.model.checkpoint import Checkpoint
    from elasticmoe.model.family_config import ModelSpecError
    from elasticmoe.model.files import ModelFiles, open_model, read_spec
    from elasticmoe.model.safetensors_header import CheckpointError
    from elasticmoe.model.spec import ModelSpec


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
