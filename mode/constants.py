"""Constants shared by the method, the trainer and the workloads (defined here once)."""

# Label of positions that carry no loss (Hugging Face / PyTorch cross-entropy convention).
IGNORE_INDEX = -100
