"""What every Triton kernel module shares."""
import os

# Triton's interpreter (numpy emulation) computes tl.dot on bf16 operands wrongly in 3.9:
# kernels upcast dot operands to float32 when this is set, and keep bf16 when compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# No launch grid dimension may exceed this (CUDA's limit for grid y/z; we hold x to it too).
MAX_GRID = 65535
