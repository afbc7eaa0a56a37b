"""What a plain `pip install .` gives (.ci/run runs this in a fresh venv, outside the checkout): `mode` and
`mode_kernels` import from site-packages, triton is not installed, and every op runs forward and backward
on the CPU backends (native C++ and the torch reference), agreeing with each other; MoDE trains a step."""
import importlib.util
import sys

import torch

import mode
import mode_kernels as mk
from mode_kernels import backends

assert "site-packages" in mode.__file__ and "site-packages" in mk.__file__, (mode.__file__, mk.__file__)
assert importlib.util.find_spec("bench") is None, "bench/ was installed"
if "--no-triton" in sys.argv:
    assert importlib.util.find_spec("triton") is None, "triton was installed"
assert backends.native_available(), "the native CPU kernels did not build from the shipped sources"


def run_ops(backend: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    T, K, N, r, V = 24, 16, 12, 4, 40
    x = torch.randn(T, K, generator=gen, requires_grad=True)
    modality = torch.zeros(T, dtype=torch.long)
    modality[8:16] = 1
    a = torch.randn(5, r, K, generator=gen).requires_grad_()
    b = torch.randn(5, N, r, generator=gen).requires_grad_()
    router = torch.randn(5, K, generator=gen).requires_grad_()
    plan = mk.plan_routing(modality, num_modalities=2)
    y = mk.modality_lora_linear(x, torch.randn(N, K, generator=gen), None, plan, a, b, router,
                                experts_per_modality=(4, 1), scaling=2.0, backend=backend)
    student, teacher = torch.randn(T, V, generator=gen, requires_grad=True), torch.randn(T, V, generator=gen)
    kd = mk.kd_kl_loss(student, teacher, temperature=2.0, vocab_range=(4, 36), topk=8, backend=backend)
    hidden, weight = torch.randn(T, K, generator=gen, requires_grad=True), torch.randn(V, K, generator=gen)
    teacher_hidden = torch.randn(T, K, generator=gen)
    fused = mk.fused_linear_kd_kl_loss(hidden, teacher_hidden, weight, temperature=2.0, vocab_range=(4, 36),
                                       backend=backend)
    top = mk.teacher_topk(teacher_hidden, weight, 8, vocab_range=(4, 36), temperature=2.0, backend=backend)
    given = mk.fused_linear_kd_kl_loss(hidden, None, weight, teacher_topk=top, temperature=2.0, vocab_range=(4, 36),
                                       backend=backend)
    (y.square().mean() + kd + fused + given).backward()
    return [y, kd, fused, given, top.logits, x.grad, a.grad, b.grad, router.grad, student.grad, hidden.grad]


native, reference = run_ops("native"), run_ops("torch")
for got, want in zip(native, reference):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4))
spec = mode.ModalitySpec(image_token_ranges=((40, 60),), begin_image=61, end_image=60)
model = mode.apply_mode(model, mode.MoDEConfig(modality=spec))
gen = {"input_ids": torch.tensor([[3, 4, 61, 41, 57, 60]]), "labels": torch.tensor([[-100, -100, 61, 41, 57, 60]])}
loss = model(input_ids=gen["input_ids"], labels=gen["labels"]).loss + 0.3 * mode.kd_loss(model, gen)
loss.backward()
print(f"install check: mode and mode_kernels from site-packages, every op on native and torch, "
      f"a MoDE step (loss {loss.item():.3f}); triton {'absent' if '--no-triton' in sys.argv else 'not checked'}")
