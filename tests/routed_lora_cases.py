"""Shared by the routed-LoRA backend tests (Triton, native): random cases in float64, the backend
interface run on them, and the naive formula's output and gradients in the same dtype."""
import torch
from naive import routed_lora as naive_routed_lora

from mode_kernels.contract import RoutedLoraGrads, RoutedLoraNeeds, RoutedLoraOptions
from mode_kernels.routing import plan_routing

F64 = torch.float64
GRAD_NAMES = RoutedLoraGrads._fields
ALL_NEEDS = RoutedLoraNeeds(*(True,) * 7)
LOW_PRECISION_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_case(num_tokens, k, n, r, epm, *, ids=None, bias=True, separate=False, router=True, seed=0,
              device="cpu"):
    """float64 tensors (x, lora_input, weight, bias, lora_a, lora_b, router_weight), ids, plan, dy."""
    g = torch.Generator().manual_seed(seed)
    e = sum(epm)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device)

    if ids is None:
        ids = torch.randint(0, len(epm), (num_tokens,), generator=g)
    ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
    tensors = dict(x=rnd(num_tokens, k), lora_input=rnd(num_tokens, k) if separate else None,
                   weight=rnd(n, k, scale=k ** -0.5), bias=rnd(n) if bias else None,
                   lora_a=rnd(e, r, k, scale=k ** -0.5), lora_b=rnd(e, n, r, scale=r ** -0.5),
                   router_weight=rnd(e, k) if router else None)
    return tensors, ids, plan_routing(ids, len(epm)), rnd(num_tokens, n)


def cast(tensors, dtype):
    return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}


def run(impl, t, plan, dy, epm, needs=ALL_NEEDS, scaling=2.0):
    """(y, *grads) of a backend module's routed_lora_forward / routed_lora_backward (given the forward's saved)."""
    args = backend_args(t, plan, epm, scaling)
    y, saved = impl.routed_lora_forward(*args)
    # Only inputs that exist can need a gradient (the op layer's contract).
    needs = RoutedLoraNeeds(*(bool(n) and t[name] is not None for n, name in zip(needs, GRAD_NAMES)))
    return (y, *impl.routed_lora_backward(dy.to(y.dtype), *args, needs, saved))


def backend_args(t, plan, epm, scaling=2.0):
    """The arguments of a backend's routed_lora_forward for the tensors of ``make_case``."""
    return (t["x"], t["weight"], t["bias"], t["lora_input"], plan, t["lora_a"], t["lora_b"], t["router_weight"],
            RoutedLoraOptions(tuple(epm), scaling))


def naive_same_dtype(t, ids, dy, epm, scaling=2.0):
    """Output and gradients of the naive dense formula, computed in t's dtype under autograd."""
    leaves = {name: None if v is None else v.detach().clone().requires_grad_() for name, v in t.items()}
    y = naive_routed_lora(leaves["x"], leaves["weight"], leaves["bias"], ids, leaves["lora_a"], leaves["lora_b"],
                          leaves["router_weight"], epm, scaling, leaves["lora_input"])
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(None if leaves[name] is None else leaves[name].grad for name in GRAD_NAMES))


def check_close(ours, gold, rel, dtype=None):
    """Every output and gradient within rel * max|gold| of gold (and in ``dtype`` when given); None where gold is."""
    for name, o, g in zip(("y",) + GRAD_NAMES, ours, gold):
        assert (o is None) == (g is None), name
        if g is None:
            continue
        assert o.shape == g.shape and (dtype is None or o.dtype == dtype), name
        err = (o.double() - g.double()).abs().max().item() if g.numel() else 0.0
        scale = g.abs().max().item() if g.numel() else 0.0
        assert err <= rel * max(scale, 1e-30), f"{name}: max error {err:.3g} vs {rel} * {scale:.3g}"


def check_low_precision(ours, naive, gold, dtype):
    """The precision rule: |ours - gold| <= |naive in the same dtype - gold| + tol * max|gold|, elementwise."""
    tol = LOW_PRECISION_TOL[dtype]
    for name, o, nv, g in zip(("y",) + GRAD_NAMES, ours, naive, gold):
        if g is None:
            assert o is None, name
            continue
        assert o.shape == g.shape and o.dtype == dtype, name
        bound = (nv.double() - g).abs() + tol * g.abs().max()
        excess = ((o.double() - g).abs() - bound).max().item()
        assert excess <= 0, f"{name}: exceeds the same-dtype naive error by {excess:.3g}"
