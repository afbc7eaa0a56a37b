"""What every Triton kernel module shares."""
import os

import torch

# Triton's interpreter (numpy emulation) computes tl.dot on bf16 operands wrongly in 3.9:
# kernels upcast dot operands to float32 when this is set, and keep bf16 when compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# No launch grid dimension may exceed this (CUDA's limit for grid y/z; we hold x to it too).
MAX_GRID = 65535

# Under the interpreter (no GPU) launches are planned for an H100 SXM's 132 SMs, so tests and
# bench.offline run the launches such a GPU would.
INTERPRET_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SM_COUNT
