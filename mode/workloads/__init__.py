"""What a trainer run trains and evaluates: the workload protocol (``protocol``), workloads by name
(``registry``), the built-in ``digits`` benchmark and a local Hugging Face model with JSONL tasks
(``hf_model``), and the scores they share (``scoring``)."""
from .protocol import Environment, RunSettings, Workload, WorkloadError, WorkloadFactory

__all__ = ["Environment", "RunSettings", "Workload", "WorkloadError", "WorkloadFactory"]
