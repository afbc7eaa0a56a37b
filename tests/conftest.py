"""Test set-up shared by every layer (kernels/, method/, trainer/, bench/).

Shared helpers are plain modules on the path (pyproject's ``pythonpath = ["tests"]``):
``naive.py`` (float64 gold formulas) and ``tiny_models.py`` (tiny random Hugging Face decoders).
"""
import os
import shutil

import pytest

# Without a CUDA GPU, Triton kernels run on CPU tensors in Triton's interpreter. TRITON_INTERPRET
# must be set before triton is first imported, hence here, before any test module.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: intra-op threads only add overhead, and on a shared machine a lot of it
    (restored after each module). A test that needs several threads sets them itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    """How many of the documents' code blocks ran and command lines parsed (tests/test_docs.py)."""
    counts = {}
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_docs.py::" in nodeid and getattr(report, "when", "call") == "call":
                kind = "python blocks run" if "::test_python_block" in nodeid else \
                    "command lines parsed" if "::test_command_line" in nodeid else None
                if kind:
                    counts.setdefault(kind, {"passed": 0, "failed": 0})[outcome] += 1
    for kind, n in counts.items():
        terminalreporter.write_line(f"documents: {n['passed'] + n['failed']} {kind} ({n['passed']} passed, "
                                    f"{n['failed']} failed)")
