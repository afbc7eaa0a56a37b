"""Test set-up: without a CUDA GPU, Triton kernels run on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
