"""MoDE as a PEFT method: ``peft.get_peft_model(model, mode.MoDEPeftConfig(...))``.

    cfg = mode.MoDEPeftConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                              target_modules=["gate_proj", "up_proj", "down_proj"], experts_per_modality=(4, 1),
                              image_token_ranges=((4, 8196),), begin_image=8197, end_image=8196)
    model = peft.get_peft_model(hf_model, cfg)   # MoDE layers, routing attached, adapters trainable
    model.save_pretrained(path)                  # adapter_config.json (peft_type "MODE"), adapter_model.safetensors
    model = peft.PeftModel.from_pretrained(fresh_hf_model, path)

The method is registered with PEFT (``peft.utils.register_peft_method``, name "mode") when this module
is imported; ``import mode`` arranges that once peft itself is imported (see ``mode/__init__.py``).
PEFT only registers the names of its ``PeftType`` enum, so "MODE" is added to it first. A process
where MoDE is not registered cannot read a MoDE adapter: PEFT looks the saved ``peft_type`` up in its
registry and raises ``KeyError: 'MODE'`` (rather than building some other adapter).

On disk, per adapted module: ``<module>.mode_A`` [E, r, K], ``<module>.mode_B`` [E, N, r] and
``<module>.mode_router`` [E, K] (E experts ordered by modality), under PEFT's ``base_model.model.``
prefix. ``mode.save_adapter`` / ``mode.load_adapter`` write and read the same files for ``apply_mode``
models. One adapter per model; merging is impossible (per-token routing), so it raises.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import Tensor, nn

from .adapter_check import adapted_modules, check_adapter_fits, vocab_size
from .config import MLP_PROJECTIONS, MoDEConfig, check_experts_per_modality
from .layer import MERGE_IMPOSSIBLE, ModalityRoutedLayer, init_experts
from .modality import ModalitySpec
from .model import attach_routing, detach_routing

METHOD_NAME = "mode"  # PEFT's method name; PeftType "MODE", parameter prefix "mode_"
PREFIX = METHOD_NAME + "_"
CHAMELEON = ModalitySpec.chameleon()
RECORDED_HERE = "_mode_recorded_in_this_process"  # attribute of a MoDEPeftConfig whose adapters it built


def _peft_type(name: str) -> PeftType:
    """The ``PeftType`` member called ``name``, added to the enum if missing (as PEFT's in-tree methods
    add theirs to its source): ``register_peft_method`` accepts only members, and PEFT calls
    ``peft_type.value`` on saved configs."""
    if name in PeftType._value2member_map_:
        return PeftType(name)
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    return member


MODE_PEFT_TYPE = _peft_type(METHOD_NAME.upper())


@dataclass
class MoDEPeftConfig(PeftConfig):
    """PEFT config of MoDE (PEFT's LoRA field names; the modality spec flat so that it serialises).

    Attributes:
        r, lora_alpha, lora_dropout: rank, alpha (scaling = alpha / r) and adapter-input dropout of
            every expert.
        target_modules: module names (or a regex, as in LoRA) of the nn.Linear modules to adapt.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in ``LoraConfig``.
        init_lora_weights: True: B = 0 (the layer starts equal to its base); False: B random too.
        init_weights: PEFT's generic name of the same; given, it sets init_lora_weights.
        experts_per_modality: (text experts, image experts); MoDE: (4, 1).
        image_token_ranges, begin_image, end_image, image_codes_in_vocab: ``mode.ModalitySpec`` (default:
            Chameleon/Anole).
        kd_temperature, kd_vocab_range: what ``mode.kd_loss`` uses (see ``mode.MoDEConfig``).
        adapted_modules, vocab_size: recorded when the adapters are built (leave them None): the adapted
            modules' names with their [in_features, out_features], and the rows of the output head. A
            config that holds them (read from a saved adapter) is checked against the model it is loaded
            onto (``mode.adapter_check``): a module missing, one more target (a deeper model), other
            widths, or a vocabulary without the image tokens raise ValueError naming the module or ids.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = field(default_factory=lambda: list(MLP_PROJECTIONS))
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    init_weights: bool | None = None
    experts_per_modality: tuple[int, ...] = (4, 1)
    image_token_ranges: tuple[tuple[int, int], ...] = CHAMELEON.image_token_ranges
    begin_image: int | None = CHAMELEON.begin_image
    end_image: int | None = CHAMELEON.end_image
    image_codes_in_vocab: bool = True
    kd_temperature: float = 2.0
    kd_vocab_range: tuple[int, int] | None = None
    adapted_modules: dict[str, list[int]] | None = None
    vocab_size: int | None = None

    target_parameters = None  # not a field: PEFT's module matching reads it; MoDE adapts modules only

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MODE_PEFT_TYPE
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)  # a list, saved in the given order
        if self.init_weights is not None:  # PEFT's generic name (most tuners; its generic tests set it)
            self.init_lora_weights = self.init_weights
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights: expected True (B = 0, the PEFT default) or False (B random too), "
                             f"got {self.init_lora_weights!r}")
        self.experts_per_modality = check_experts_per_modality(self.experts_per_modality)
        self.mode_config()  # validates the MoDE settings (ValueError naming the field)
        self.image_token_ranges = self.modality().image_token_ranges
        if self.kd_vocab_range is not None:
            self.kd_vocab_range = tuple(self.kd_vocab_range)

    def modality(self) -> ModalitySpec:
        return ModalitySpec(image_token_ranges=self.image_token_ranges, begin_image=self.begin_image,
                            end_image=self.end_image, image_codes_in_vocab=self.image_codes_in_vocab)

    def mode_config(self, autocast_adapter_dtype: bool = True) -> MoDEConfig:
        """The same settings as a ``mode.MoDEConfig`` (module names as target_modules)."""
        targets = self.target_modules
        return MoDEConfig(rank=self.r, alpha=self.lora_alpha, experts_per_modality=self.experts_per_modality,
                          dropout=self.lora_dropout,
                          target_modules=(targets,) if isinstance(targets, str) else tuple(targets or ()),
                          modality=self.modality(), kd_temperature=self.kd_temperature,
                          kd_vocab_range=self.kd_vocab_range, autocast_adapter_dtype=autocast_adapter_dtype)

    @classmethod
    def from_mode_config(cls, config: MoDEConfig, **kwargs) -> MoDEPeftConfig:
        """The PEFT config of an ``apply_mode`` model's settings (``kwargs``: other PeftConfig fields)."""
        spec = config.modality
        return cls(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                   target_modules=list(config.target_modules), experts_per_modality=config.experts_per_modality,
                   image_token_ranges=spec.image_token_ranges, begin_image=spec.begin_image, end_image=spec.end_image,
                   image_codes_in_vocab=spec.image_codes_in_vocab, kd_temperature=config.kd_temperature,
                   kd_vocab_range=config.kd_vocab_range, **kwargs)


class MoDEPeftLinear(ModalityRoutedLayer, nn.Module, BaseTunerLayer):
    """PEFT's form of ``mode.MoDELinear``: the same experts, stored per adapter name (one adapter)."""

    adapter_layer_names = ("mode_A", "mode_B", "mode_router")
    other_param_names = ("r", "lora_alpha", "scaling", "mode_dropout")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, *, experts_per_modality: tuple[int, ...],
                 r: int, lora_alpha: float, lora_dropout: float, init_lora_weights: bool = True):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.experts_per_modality = check_experts_per_modality(experts_per_modality)
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.mode_A, self.mode_B, self.mode_router = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.mode_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._disable_adapters = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool = True) -> None:
        if self.mode_A:
            raise ValueError(f"{self.module_name}: MoDE supports one adapter per model, this layer already has "
                             f"{list(self.mode_A)}")
        base = self.base_layer
        experts = sum(self.experts_per_modality)
        # In the base's dtype, as PEFT's LoRA: PeftModel upcasts half-precision adapters to float32
        # unless autocast_adapter_dtype=False.
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        a = torch.empty(experts, r, base.in_features, **like)
        b = torch.empty(experts, base.out_features, r, **like)
        router = torch.empty(experts, base.in_features, **like)
        init_experts(a, b, router)
        if not init_lora_weights:  # PEFT's convention for a non-identity start
            with torch.no_grad():
                for expert in b:
                    nn.init.kaiming_uniform_(expert, a=5 ** 0.5)
        self.mode_A[adapter_name] = nn.Parameter(a)
        self.mode_B[adapter_name] = nn.Parameter(b)
        self.mode_router[adapter_name] = nn.Parameter(router)
        self.mode_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.set_adapter(adapter_name)

    @property
    def runs_adapter(self) -> bool:
        return not (self.disable_adapters or self.teacher) and any(n in self.mode_A for n in self.active_adapters)

    def forward(self, x: Tensor, *args, modality: Tensor | None = None, **kwargs) -> Tensor:
        active = [name for name in self.active_adapters if name in self.mode_A]
        if not self.runs_adapter:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(f"{self.module_name}: MoDE runs one adapter at a time, active: {active}")
        name = active[0]
        return self._adapted_forward(x, modality, self.mode_A[name], self.mode_B[name], self.mode_router[name],
                                     self.mode_dropout[name], self.scaling[name])

    def __repr__(self) -> str:
        return "mode." + super().__repr__()


class MoDEPeftModel(BaseTuner):
    """PEFT tuner of MoDE: replaces the targeted nn.Linear modules by ``MoDEPeftLinear`` layers and
    attaches the per-forward routing (``mode.attach_routing``)."""

    prefix = PREFIX
    tuner_layer_cls = MoDEPeftLinear
    target_module_mapping: dict[str, list[str]] = {}  # MoDEPeftConfig defaults to MoDE's targets

    def _create_and_replace(self, peft_config: MoDEPeftConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        if isinstance(target, MoDEPeftLinear):
            raise ValueError(f"{current_key}: already has a MoDE adapter {list(target.mode_A)}; MoDE supports one "
                             "adapter per model")
        if isinstance(target, BaseTunerLayer) or not isinstance(target, nn.Linear):
            raise ValueError(f"target_modules: {current_key} is a {type(target).__name__}, MoDE adapts nn.Linear only")
        layer = MoDEPeftLinear(target, adapter_name, experts_per_modality=peft_config.experts_per_modality,
                               r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                               lora_dropout=peft_config.lora_dropout, init_lora_weights=peft_config.init_lora_weights)
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model: nn.Module, config: MoDEPeftConfig, adapter_name: str) -> None:
        modules = adapted_modules(model)
        # New adapters record what they were built on, in the caller's config (PEFT keeps that object); a
        # config recorded so in this process may be passed again for another model and records anew.
        if config.adapted_modules is None or getattr(config, RECORDED_HERE, False):
            config.adapted_modules, config.vocab_size = modules, vocab_size(model)
            setattr(config, RECORDED_HERE, True)  # not a field: never saved
        else:  # a saved adapter (PeftModel.from_pretrained): PEFT itself would only warn about missing weights
            check_adapter_fits(model, modules, config.adapted_modules, config.vocab_size, config.modality(),
                               f"MoDE adapter {adapter_name!r}")
        attach_routing(model, config.mode_config())

    # The routing hooks follow the adapters: gone with the MoDE layers (unload) or the last adapter.
    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs) -> nn.Module:
        if merge:  # before anything is unloaded
            raise RuntimeError(f"merge_and_unload: {MERGE_IMPOSSIBLE}")
        detach_routing(self.model)
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.peft_config:
            detach_routing(self.model)


def _naming_the_file(from_json_file):
    """PeftConfig.from_json_file whose JSONDecodeError names the file (PEFT parses adapter_config.json
    before it knows the adapter's type, so MoDE's config class cannot do it); the same exception type."""
    @functools.wraps(from_json_file)
    def wrapper(cls, path_json_file, **kwargs):
        try:
            return from_json_file.__func__(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(f"{path_json_file}: not valid JSON: {exc.msg}", exc.doc, exc.pos) from None
    return classmethod(wrapper)


if MODE_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:  # once per process (this module may be re-imported)
    register_peft_method(name=METHOD_NAME, config_cls=MoDEPeftConfig, model_cls=MoDEPeftModel)
    PeftConfig.from_json_file = _naming_the_file(PeftConfig.from_json_file)
