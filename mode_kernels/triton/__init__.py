"""Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1). Importing this needs triton."""
