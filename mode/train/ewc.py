"""Elastic weight consolidation on the adapters (Kirkpatrick et al. 2017; online form, Schwarz et al. 2018).

After each task the trainer adds the task's diagonal empirical Fisher information of the adapter
parameters, F += E_rows[(d log p(answer | prompt) / d theta)^2], one row at a time, and moves
the anchor theta* to the adapters as trained; later steps add

    ewc_lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

to the loss. F and theta* are buffers of an ``EWCState`` module attached to the model, so the
trainer's checkpoints carry them and a resumed run continues with the same penalty.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..workloads.protocol import to_device
from . import distributed
from .probe import task_loss

EWC_MODULE = "ewc_state"  # the attribute of the model holding EWCState


class EWCState(nn.Module):
    """Fisher diagonal and anchor of each trainable parameter, in ``model.parameters()`` order
    (buffers ``fisher_<i>``, ``anchor_<i>``; all zero before the first task ends: no penalty)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.count = len(params)
        for i, p in enumerate(params):
            self.register_buffer(f"fisher_{i}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"anchor_{i}", torch.zeros_like(p, dtype=torch.float32))

    def fisher(self) -> list[Tensor]:
        return [getattr(self, f"fisher_{i}") for i in range(self.count)]

    def anchors(self) -> list[Tensor]:
        return [getattr(self, f"anchor_{i}") for i in range(self.count)]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def attach_ewc(model: nn.Module) -> None:
    """Give ``model`` (with its adapters applied) an empty ``EWCState``."""
    model.add_module(EWC_MODULE, EWCState(_trainable(model)))


def ewc_state(model: nn.Module) -> EWCState:
    state = getattr(distributed.unwrap(model), EWC_MODULE, None)
    if state is None:
        raise ValueError("the model has no EWC state: build it with an EWC method (mode.train.ewc.attach_ewc)")
    return state


def ewc_penalty(model: nn.Module, ewc_lambda: float) -> Tensor:
    """ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2 over the trainable parameters."""
    state = ewc_state(model)
    params = _trainable(distributed.unwrap(model))
    return ewc_lambda / 2 * sum((f * (p.float() - a) ** 2).sum()
                                for p, f, a in zip(params, state.fisher(), state.anchors()))


def consolidate(model: nn.Module, rows: list, collate: Callable[[list], dict], samples: int, seed: list[int]) -> None:
    """Add the diagonal empirical Fisher of the task whose training ``rows`` are given (``samples``
    rows drawn by ``seed``, one gradient each, in eval mode: no dropout) and anchor the penalty at
    the current adapters. Gradients come from ``torch.autograd.grad`` (no ``.grad`` touched, no
    DDP hooks); every process computes the same values on the same rows."""
    module = distributed.unwrap(model)
    state, params = ewc_state(module), _trainable(module)
    device = params[0].device
    picked = np.random.default_rng(seed).choice(len(rows), size=min(samples, len(rows)), replace=False)
    was_training = module.training
    module.eval()
    fisher = [torch.zeros_like(f) for f in state.fisher()]
    try:
        for i in picked:
            batch = to_device(collate([rows[i]]), device)
            grads = torch.autograd.grad(task_loss(module, batch), params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.float() ** 2 / len(picked)
    finally:
        module.train(was_training)
    with torch.no_grad():
        for total, new, anchor, p in zip(state.fisher(), fisher, state.anchors(), params):
            total += new
            anchor.copy_(p.float())
