"""Native CPU kernels (C++ against ATen, in csrc/), built just in time: the fast CPU backend.

``backend="native"`` picks them; ``backend="auto"`` picks them for CPU tensors when they are built (the
torch reference otherwise). ``python -m mode_kernels.native build`` builds them ahead of time.
"""
from .build import NativeUnavailable, available, extension

__all__ = ["NativeUnavailable", "available", "extension"]
