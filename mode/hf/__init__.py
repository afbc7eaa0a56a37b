"""Hugging Face helpers: where a model keeps its decoder and output head, its KV cache, and the
one cached decode loop every evaluation uses (``mode.hf.models``)."""
