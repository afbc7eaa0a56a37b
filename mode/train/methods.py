"""The methods a run compares: which adapters each builds, what it trains on, and what else its loss holds.

    mode          4 text LoRA experts + 1 image LoRA, routed by modality, + KD from the frozen model
                  on the generation stream
    mode-nokd     the same without KD (ablation)
    lora          one LoRA for all tokens
    moelora       the 4-expert text-style mixture for all tokens (no modality split)
    lora-kd       one LoRA with MoDE's KD (does MoDE's gain come from KD or from the modality split?)
    lora-matched  one LoRA at the rank whose parameters match MoDE's (``matched_lora_rank``)
    joint         one LoRA trained on every task's rows at every stage (the multi-task upper bound;
                  same steps and evaluations as the sequential methods)
    replay        one LoRA; a share of each batch (--replay-share) from a buffer of --replay-size
                  rows of each earlier task (``mode.train.rehearsal``)
    ewc           one LoRA with a diagonal-Fisher penalty towards the adapters after each earlier
                  task (online EWC, ``mode.train.ewc``)

Text-only methods route every token as text: their modality spec's image range lies past the
vocabulary, so no token is an image token and the image expert stays idle (not counted in
``trainable_params``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..layer import MoDELinear

# what a step's task batch is drawn from (``mode.train.rehearsal.step_rows``)
TASK_ROWS, ALL_TASKS, REPLAY = "task", "all tasks", "replay"


@dataclass(frozen=True)
class Method:
    experts_per_modality: tuple[int, int]  # (text experts, image experts)
    split_modality: bool  # False: every token is routed as text
    kd: bool  # distil the frozen model on the generation stream
    rows: str = TASK_ROWS  # TASK_ROWS, ALL_TASKS (joint) or REPLAY
    ewc: bool = False  # add the EWC penalty (mode.train.ewc)
    matched_rank: bool = False  # LoRA rank matching MoDE's parameters instead of --rank

    @property
    def plain_lora(self) -> bool:
        """One LoRA that every token reaches: its adapters are exported as a plain PEFT LoRA."""
        return self.experts_per_modality[0] == 1 and not self.split_modality


LORA = Method((1, 1), split_modality=False, kd=False)
METHODS = {
    "mode": Method((4, 1), split_modality=True, kd=True),
    "mode-nokd": Method((4, 1), split_modality=True, kd=False),
    "lora": LORA,
    "moelora": Method((4, 1), split_modality=False, kd=False),
    "lora-kd": replace(LORA, kd=True),
    "lora-matched": replace(LORA, matched_rank=True),
    "joint": replace(LORA, rows=ALL_TASKS),
    "replay": replace(LORA, rows=REPLAY),
    "ewc": replace(LORA, ewc=True),
}


def adapter_params(in_features: int, out_features: int, rank: int, method: Method) -> int:
    """Adapter parameters of one adapted linear that can receive a gradient under the method's
    routing: the image expert only if tokens reach it, router rows only of a modality with several experts."""
    text, image = method.experts_per_modality
    used_experts = text + image if method.split_modality else text
    routed_modalities = [n for n in ((text, image) if method.split_modality else (text,)) if n > 1]
    return used_experts * rank * (in_features + out_features) + sum(routed_modalities) * in_features


def matched_lora_rank(model: nn.Module, target_modules: tuple[str, ...], rank: int) -> int:
    """The rank of one LoRA on ``model``'s target linears whose parameter count is nearest to
    MoDE's at ``rank`` (4 + 1 experts and the text router): on digits' 2-layer model at rank 8, 42."""
    mode_total = per_rank = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            mode_total += adapter_params(module.in_features, module.out_features, rank, METHODS["mode"])
            per_rank += module.in_features + module.out_features
    if not per_rank:
        raise ValueError(f"matched_lora_rank: no nn.Linear named {target_modules} in {type(model).__name__}")
    return max(1, round(mode_total / per_rank))


def trainable_params(model: nn.Module, method: Method) -> int:
    """Adapter parameters that can receive a gradient under the method's routing (``adapter_params``)."""
    return sum(adapter_params(m.in_features, m.out_features, m.rank, method)
               for m in model.modules() if isinstance(m, MoDELinear))
