"""A local Hugging Face checkpoint as a workload: pre-tokenized JSONL tasks (``data``), checkpoint
loading and evaluation (``loading``), and the trainer's workload (``workload``)."""
