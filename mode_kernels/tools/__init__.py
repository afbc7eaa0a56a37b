"""Developer tools that are not part of the ops: ``compile_check`` (compile every Triton kernel for
sm_80/sm_90 without a GPU) and its per-op targets in ``targets/``."""
