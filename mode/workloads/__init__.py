"""What a trainer run trains and evaluates (``Workload``): the built-in ``digits`` benchmark and a
local Hugging Face checkpoint with JSONL tasks (``hf_checkpoint``)."""
from .base import Workload

__all__ = ["Workload"]
