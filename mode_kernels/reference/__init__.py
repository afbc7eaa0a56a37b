"""Pure-PyTorch reference implementations: the CPU path and the oracle of the Triton kernels."""
from . import kd_kl, routed_lora  # noqa: F401
