"""Expert placement: replicate hot experts over shards and split their tokens to balance load."""

from .placement import Placement
from .planner import greedy_from_scratch, plan

__all__ = ["Placement", "greedy_from_scratch", "plan"]
