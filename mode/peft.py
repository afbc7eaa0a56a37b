"""MoDE layers through PEFT: ``get_peft_model`` builds them, ``save_pretrained`` / ``PeftModel.from_pretrained``
round-trip them.

    lora_config = mode.peft.register(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                target_modules=["gate_proj", "up_proj", "down_proj"]))
    model = get_peft_model(hf_model, lora_config)
    mode.attach_routing(model, mode.MoDEConfig(...))      # modality ids per forward, as apply_mode does

    # later, into a fresh base model (PEFT does not store custom layers in adapter_config.json,
    # so register them on the loaded config again):
    lora_config = mode.peft.register(LoraConfig.from_pretrained(path))
    model = PeftModel.from_pretrained(hf_model, path, config=lora_config)
    mode.attach_routing(model, mode.MoDEConfig(...))

Rank, alpha and dropout come from the LoraConfig; one adapter per model (PEFT's adapter
switching and merging do not apply: per-token routing cannot be merged into a weight).
On disk each module holds ``lora_A`` [E, r, K], ``lora_B`` [E, N, r] and ``lora_router`` [E, K].
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .config import check_experts_per_modality
from .layer import ModalityRoutedLayer, init_experts

try:
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError as exc:  # pragma: no cover - peft is a dependency
    raise ImportError(f"mode.peft needs the peft package: {exc}") from exc


def register(lora_config, experts_per_modality: tuple[int, ...] = (4, 1)):
    """Make ``lora_config`` build ``MoDELoraLinear`` layers for the nn.Linear modules it targets.
    Returns the same config."""
    epm = check_experts_per_modality(experts_per_modality)
    hook = getattr(lora_config, "_register_custom_module", None)
    if not callable(hook):
        import peft
        raise RuntimeError(f"peft {peft.__version__}: LoraConfig has no _register_custom_module (PEFT's custom "
                           "LoRA layer hook, peft >= 0.14); upgrade peft or use mode.apply_mode")
    hook({nn.Linear: functools.partial(MoDELoraLinear, experts_per_modality=epm)})
    return lora_config


class MoDELoraLinear(ModalityRoutedLayer, nn.Module, BaseTunerLayer):
    """PEFT's form of ``mode.MoDELinear``: the same experts, stored per adapter name."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_router")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, *,
                 experts_per_modality: tuple[int, ...], r: int = 8, lora_alpha: float = 8, **kwargs):
        nn.Module.__init__(self)
        if isinstance(base_layer, BaseTunerLayer):
            raise ValueError(f"{kwargs.get('target_name', 'a module')}: already has a PEFT adapter; MoDE "
                             "supports one adapter per model")
        self.base_layer = base_layer
        self.experts_per_modality = check_experts_per_modality(experts_per_modality)
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.lora_A, self.lora_B, self.lora_router = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._disable_adapters = False
        dropout = getattr(config, "lora_dropout", 0.0)
        init_weights = getattr(config, "init_lora_weights", True)
        self.update_layer(adapter_name, r, lora_alpha, dropout, init_weights)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, **kwargs) -> None:
        if self.lora_A:
            raise ValueError(f"{kwargs.get('target_name', 'MoDE layer')}: MoDE supports one adapter per model, "
                             f"this layer already has {list(self.lora_A)}")
        if init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights={init_lora_weights!r}: MoDE layers support True (B = 0, the "
                             "PEFT default) or False (B random too)")
        base = self.base_layer
        experts = sum(self.experts_per_modality)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        a = torch.empty(experts, r, base.in_features, **like)
        b = torch.empty(experts, base.out_features, r, **like)
        router = torch.empty(experts, base.in_features, **like)
        init_experts(a, b, router)
        if init_lora_weights is False:  # PEFT's convention for a non-identity start
            with torch.no_grad():
                for expert in b:
                    nn.init.kaiming_uniform_(expert, a=5 ** 0.5)
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.lora_router[adapter_name] = nn.Parameter(router)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.set_adapter(adapter_name)

    def forward(self, x: Tensor, *args, modality=None, **kwargs) -> Tensor:
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.teacher or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(f"{self.module_name}: MoDE runs one adapter at a time, active: {active}")
        name = active[0]
        return self._adapted_forward(x, modality, self.lora_A[name], self.lora_B[name], self.lora_router[name],
                                     self.lora_dropout[name], self.scaling[name])

    def __repr__(self) -> str:
        return "mode." + super().__repr__()
