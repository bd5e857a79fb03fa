"""elasticmoe: elastic, Ray-based serving of Mixture-of-Experts LLMs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from elasticmoe.engine.llm import LLM, RequestOutput
    from elasticmoe.engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:  # lazy: `import elasticmoe` stays cheap (no torch) for the CLI and Serve
    if name in ("LLM", "RequestOutput"):
        from elasticmoe.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from elasticmoe.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
