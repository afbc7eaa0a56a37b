"""Every bad input raises a ValueError naming the argument (RuntimeError for an unavailable backend)."""
import pytest
import torch

import mode_kernels as mk

K, N, R = 6, 5, 2


def lora_args(**over):
    args = dict(x=torch.randn(3, K), weight=torch.randn(N, K), bias=torch.randn(N), modality=torch.tensor([0, 1, 0]),
                lora_a=torch.randn(5, R, K), lora_b=torch.randn(5, N, R), router_weight=torch.randn(5, K))
    kw = dict(experts_per_modality=(4, 1), scaling=2.0)
    for k, v in over.items():
        (kw if k in ("experts_per_modality", "scaling", "lora_input", "backend") else args)[k] = v
    return args, kw


@pytest.mark.parametrize("over,name", [
    (dict(x=torch.randn(3, K, dtype=torch.float64).long()), "x"),
    (dict(weight=torch.randn(N, K + 1)), "weight"),
    (dict(bias=torch.randn(N + 1)), "bias"),
    (dict(modality=torch.tensor([0, 2, 0])), "modality"),
    (dict(modality=torch.tensor([0, -1, 0])), "modality"),
    (dict(modality=torch.tensor([0, 1])), "modality"),
    (dict(modality=torch.tensor([0.0, 1.0, 0.0])), "modality"),
    (dict(modality=[0, 1, 0]), "modality"),
    (dict(lora_a=torch.randn(4, R, K)), "lora_a"),
    (dict(lora_a=torch.randn(5, R, K + 1)), "lora_a"),
    (dict(lora_b=torch.randn(5, N, R + 1)), "lora_b"),
    (dict(lora_b=torch.randn(4, N, R)), "lora_b"),
    (dict(router_weight=torch.randn(4, K)), "router_weight"),
    (dict(router_weight=None), "router_weight"),
    (dict(experts_per_modality=(4, 0)), "experts_per_modality"),
    (dict(experts_per_modality=()), "experts_per_modality"),
    (dict(experts_per_modality=(2.5, 1)), "experts_per_modality"),
    (dict(lora_input=torch.randn(3, K + 1)), "lora_input"),
    (dict(scaling="2"), "scaling"),
    (dict(backend="cuda"), "backend"),
])
def test_routed_lora_bad_input(over, name):
    args, kw = lora_args(**over)
    with pytest.raises(ValueError, match=name):
        mk.modality_lora_linear(*args.values(), **kw)


def test_routed_lora_plan_mismatch():
    args, kw = lora_args()
    args["modality"] = mk.plan_routing(torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="modality: the plan covers 4 tokens"):
        mk.modality_lora_linear(*args.values(), **kw)
    args["modality"] = mk.plan_routing(torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="modality: the plan has 3 modalities"):
        mk.modality_lora_linear(*args.values(), **kw)


def test_routed_lora_device_mismatch():
    args, kw = lora_args(weight=torch.randn(N, K, device="meta"))
    with pytest.raises(ValueError, match="weight: expected device"):
        mk.modality_lora_linear(*args.values(), **kw)


def test_triton_backend_unavailable_on_plain_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, kw = lora_args(backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mk.modality_lora_linear(*args.values(), **kw)


S = torch.randn(2, 4, 10)


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(mask=torch.ones(2, 4)), "mask"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask"),
    (dict(vocab_range=(5, 5)), "vocab_range"),
    (dict(vocab_range=(0, 11)), "vocab_range"),
    (dict(vocab_range=(-1, 3)), "vocab_range"),
    (dict(vocab_range="ab"), "vocab_range"),
    (dict(topk=0), "topk"),
    (dict(topk=11), "topk"),
    (dict(topk=4, vocab_range=(0, 3)), "topk"),
    (dict(backend="jax"), "backend"),
])
def test_kd_bad_input(kw, name):
    with pytest.raises(ValueError, match=name):
        mk.kd_kl_loss(S, torch.randn(2, 4, 10), **kw)


def test_kd_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="teacher_logits"):
        mk.kd_kl_loss(S, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="student_logits"):
        mk.kd_kl_loss(S.long(), S.long())
    with pytest.raises(ValueError, match="student_logits"):
        mk.kd_kl_loss(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("over,name", [
    (dict(teacher_hidden=torch.randn(3, 7)), "teacher_hidden"),
    (dict(weight=torch.randn(11, 7)), "weight"),
    (dict(teacher_weight=torch.randn(13, 8)), "teacher_weight"),
    (dict(student_hidden=torch.randn(3, 8).int()), "student_hidden"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction=None), "reduction"),
    (dict(vocab_range=(3, 13)), "vocab_range"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
])
def test_fused_linear_bad_input(over, name):
    args = dict(student_hidden=torch.randn(3, 8), teacher_hidden=torch.randn(3, 8), weight=torch.randn(12, 8))
    kw = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    with pytest.raises(ValueError, match=name):
        mk.fused_linear_kd_kl_loss(*args.values(), **kw)
