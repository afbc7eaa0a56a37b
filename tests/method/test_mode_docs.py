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


HF_DOC = DOC.parent / "hf.md"


def test_hf_examples_run(tmp_path, monkeypatch):
    """docs/hf.md's three blocks, in order (the Trainer and TRL blocks train the PEFT model of the first)."""
    import mode

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", HF_DOC.read_text(), re.S)
    assert len(blocks) == 3
    scope = {}
    exec(compile(blocks[0], str(HF_DOC), "exec"), scope)
    ids = torch.tensor([[3, 61, 45, 52, 60, 7]])
    fresh = scope["base"]().eval()(input_ids=ids).logits
    for name in ("model", "reloaded", "plain"):
        assert torch.equal(scope[name].eval()(input_ids=ids).logits, fresh), name  # B = 0: the base model
    exec(compile(blocks[1], str(HF_DOC), "exec"), scope)
    final = tmp_path / "mode-run" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    trained = mode.load_adapter(scope["base"](), final).eval()
    expected = scope["model"].eval()(input_ids=ids).logits
    assert not torch.equal(expected, fresh)
    assert torch.equal(trained(input_ids=ids).logits, expected)
    exec(compile(blocks[2], str(HF_DOC), "exec"), scope)
    logged = [entry for entry in scope["sft"].state.log_history if "kd_loss" in entry]
    assert len(logged) == 2 and all({"loss", "entropy", "mean_token_accuracy"} <= entry.keys() for entry in logged)
