"""The example of docs/mode_layer.md runs and does what it says."""
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "mode_layer.md"


def test_readme_example_runs_a_training_step():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, str(DOC), "exec"), scope)
    model = scope["model"]
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) after the step
    assert torch.isfinite(scope["loss"]) and scope["loss"] > 0
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the step moved the adapters off zero
