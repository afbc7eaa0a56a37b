"""One module per Triton op file, each with ``compile_targets()`` for ``compile_check``."""
