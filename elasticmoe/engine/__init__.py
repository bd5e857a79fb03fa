"""The engine: continuous batching, sampling and the offline LLM API (any dispatcher for the experts)."""
