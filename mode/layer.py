"""MoDELinear: a frozen nn.Linear plus modality-routed LoRA experts (one fused op per call).

Text tokens (modality 0) go through a dense softmax mixture of LoRA experts, image tokens
(modality 1) through their own LoRA; ``mode_kernels.modality_lora_linear`` does both in one
call, so no per-expert Python loop or boolean-mask gather happens here.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch
from torch import Tensor, nn

import mode_kernels as mk

from .config import check_experts_per_modality

MERGE_IMPOSSIBLE = ("MoDE adapters cannot be merged into the base weight: each token picks its experts by its "
                    "modality (and text tokens mix theirs by an input-dependent router), so no single weight "
                    "matrix equals the adapted layer. Keep the layer unmerged.")


OUTSIDE_FORWARD = "it was called outside a forward of the model it was attached to"


class RoutingState:
    """What the MoDE layers of one model share during a forward: the routing plan built once
    from the forward's modality ids (set and cleared by the hooks of ``mode.attach_routing``).

    ``layers`` are the MoDE layers sharing it; ``missing_reason`` says why no plan exists (a
    forward without modality ids is fine while no layer runs an adapter: teacher mode, PEFT's
    ``disable_adapter()``, a deleted adapter).
    """

    def __init__(self, config, layers):
        self.config = config
        self.layers = layers
        self.plan: mk.RoutingPlan | None = None
        self.missing_reason = OUTSIDE_FORWARD
        self.checkpointing_modules: list[nn.Module] = []  # given a checkpoint function by Hugging Face
        self.depth = 0  # nesting of hooked forwards: the model's forward calls its decoder's
        self.pending_inside_image: Tensor | None = None

    def snapshot(self) -> tuple:
        """What a layer's output depends on besides its input: the plan and each layer's teacher flag."""
        return self.plan, [layer.teacher for layer in self.layers]

    @contextmanager
    def restored(self, snapshot: tuple) -> Iterator[None]:
        """Run with the routing of an earlier forward (activation checkpointing recomputes layers
        during backward, after that forward has cleared its plan); the current one comes back after."""
        current = self.snapshot()
        self._set(snapshot)
        try:
            yield
        finally:
            self._set(current)

    def _set(self, snapshot: tuple) -> None:
        self.plan, teacher = snapshot
        for layer, flag in zip(self.layers, teacher):
            layer.teacher = flag


HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of new adapters on a base of ``base_dtype``: float32 for a float16/bfloat16 base
    (PEFT's ``autocast_adapter_dtype``: AdamW updates of rank-r factors are lost to half precision's
    8-10 bit mantissa), else the base's dtype. The op runs the base GEMM in the base's dtype either way."""
    return torch.float32 if autocast_adapter_dtype and base_dtype in HALF_DTYPES else base_dtype


def init_experts(lora_a: Tensor, lora_b: Tensor, router: Tensor) -> None:
    """PEFT's LoRA init per expert (A Kaiming-uniform, B zeros: a fresh layer equals its base);
    the router as a bias-free nn.Linear initialises its weight."""
    with torch.no_grad():
        for a in lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))


class ModalityRoutedLayer:
    """Mixin of every MoDE layer (``MoDELinear`` and the PEFT layer in ``mode.peft``).

    Attributes set by ``mode.attach_routing``: ``routing`` (the model's ``RoutingState``) and
    ``module_name``. ``teacher`` (set by ``mode.teacher_mode``) makes the layer return its base
    layer's output, computing no adapter at all.
    """

    routing: RoutingState | None = None
    module_name: str = "MoDE layer"
    teacher: bool = False
    experts_per_modality: tuple[int, ...]

    @property
    def runs_adapter(self) -> bool:
        """Whether this layer's next forward computes an adapter (and so needs the routing plan)."""
        return not self.teacher

    def _modality(self, modality) -> Tensor | mk.RoutingPlan:
        if modality is not None:
            return modality
        if self.routing is None:
            raise ValueError(f"{self.module_name}: no modality given; pass modality ids (or a plan) to forward, "
                             "or attach the layer to a model with mode.apply_mode / mode.attach_routing")
        if self.routing.plan is None:
            raise ValueError(f"{self.module_name}: no modality ids for this forward: {self.routing.missing_reason}")
        return self.routing.plan

    def _adapted_forward(self, x: Tensor, modality, lora_a: Tensor, lora_b: Tensor, router: Tensor,
                         dropout: nn.Module, scaling: float) -> Tensor:
        base = self.base_layer
        modality = self._modality(modality)
        # Dropout reaches only the adapters' input; the op keeps the fused path either way. x stays in
        # the base's dtype with float32 adapters: the op takes mixed dtypes, so the base GEMM is not upcast.
        lora_input = dropout(x) if self.training and getattr(dropout, "p", 0.0) > 0 else None
        return mk.modality_lora_linear(x, base.weight, base.bias, modality, lora_a, lora_b, router,
                                       experts_per_modality=self.experts_per_modality, scaling=scaling,
                                       lora_input=lora_input)

    def merge(self, *args, **kwargs) -> NoReturn:
        raise RuntimeError(f"{self.module_name}: {MERGE_IMPOSSIBLE}")

    def unmerge(self, *args, **kwargs) -> NoReturn:
        raise RuntimeError(f"{self.module_name}: {MERGE_IMPOSSIBLE}")


class MoDELinear(ModalityRoutedLayer, nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with per-modality LoRA experts.

    For a token of modality m with experts S_m (experts ordered by modality):
        y = W0 x + b + scaling * sum_{e in S_m} g_e(x) B_e A_e dropout(x),
    g = softmax over S_m of router[S_m] x in float32 (g = 1 for a single expert).

    Parameters: ``lora_A`` [E, r, K] (Kaiming-uniform per expert), ``lora_B`` [E, N, r] (zeros),
    ``router`` [E, K]; E = sum(experts_per_modality), scaling = alpha / r. They are float32 on a
    float16/bfloat16 base unless ``autocast_adapter_dtype=False`` (then in the base's dtype).
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 8, alpha: float = 16,
                 experts_per_modality: tuple[int, ...] = (4, 1), dropout: float = 0.0,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.experts_per_modality = check_experts_per_modality(experts_per_modality)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        experts = sum(self.experts_per_modality)
        like = {"device": base_layer.weight.device,
                "dtype": adapter_dtype(base_layer.weight.dtype, autocast_adapter_dtype)}
        self.lora_A = nn.Parameter(torch.empty(experts, rank, base_layer.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(experts, base_layer.out_features, rank, **like))
        self.router = nn.Parameter(torch.empty(experts, base_layer.in_features, **like))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_experts(self.lora_A, self.lora_B, self.router)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor, modality: Tensor | mk.RoutingPlan | None = None) -> Tensor:
        """``modality``: ids of shape x.shape[:-1] or a routing plan; None takes the plan the
        model's forward set up (``mode.apply_mode``)."""
        if self.teacher:
            return self.base_layer(x)
        return self._adapted_forward(x, modality, self.lora_A, self.lora_B, self.router, self.lora_dropout,
                                     self.scaling)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, experts_per_modality={self.experts_per_modality}"


def routed_layers(model: nn.Module) -> list[tuple[str, ModalityRoutedLayer]]:
    """(name, layer) of every MoDE layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModalityRoutedLayer)]
