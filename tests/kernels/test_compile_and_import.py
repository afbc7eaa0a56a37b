"""torch.compile traces the ops without graph breaks; the package imports without triton."""
import os
import subprocess
import sys
import textwrap

import torch

import mode_kernels as mk


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    k, n, r = 12, 10, 4
    weight, bias = torch.randn(n, k), torch.randn(n)
    lora_a = torch.randn(5, r, k, requires_grad=True)
    lora_b = torch.randn(5, n, r, requires_grad=True)
    router = torch.randn(5, k, requires_grad=True)
    head = torch.randn(30, n, requires_grad=True)

    def step(x, ids, teacher_logits):
        plan = mk.plan_routing(ids, 2)
        h = mk.modality_lora_linear(x, weight, bias, plan, lora_a, lora_b, router,
                                    experts_per_modality=(4, 1), scaling=2.0, lora_input=x * 0.5)
        h2 = mk.modality_lora_linear(h, torch.eye(n), None, plan, lora_a[:, :, :n].detach(),
                                     lora_b, router[:, :n].detach(), experts_per_modality=(4, 1), scaling=2.0)
        kd = mk.fused_linear_kd_kl_loss(h2, h.detach(), head, temperature=2.0, vocab_range=(4, 25))
        return kd + mk.kd_kl_loss(h2 @ head.t(), teacher_logits, temperature=2.0, topk=5, mask=ids == 1)

    x, ids, tl = torch.randn(2, 7, k), torch.randint(0, 2, (2, 7)), torch.randn(2, 7, 30)
    eager = step(x, ids, tl)
    g_eager = torch.autograd.grad(eager, [lora_a, lora_b, router, head])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, ids, tl)
    g_comp = torch.autograd.grad(out, [lora_a, lora_b, router, head])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_import_and_run_without_triton():
    code = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is not installed")
        sys.meta_path.insert(0, NoTriton())
        import torch, mode_kernels as mk
        y = mk.modality_lora_linear(torch.randn(3, 4), torch.randn(2, 4), None, torch.tensor([0, 1, 1]),
                                    torch.randn(2, 1, 4), torch.zeros(2, 2, 1), experts_per_modality=(1, 1),
                                    scaling=1.0)
        assert y.shape == (3, 2)
        assert not mk.triton_available("routed_lora")
        try:
            mk.kd_kl_loss(torch.randn(2, 5), torch.randn(2, 5), backend="triton")
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("backend='triton' should raise without triton")
        assert "triton" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
