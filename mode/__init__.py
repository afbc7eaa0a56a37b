"""MoDE (Modality-Decoupled Experts) on Hugging Face decoders.

    import mode
    cfg = mode.MoDEConfig(modality=mode.ModalitySpec.chameleon())
    model = mode.apply_mode(hf_model, cfg)          # in place; only adapters are trainable
    loss = out_ce + 0.3 * mode.kd_loss(model, generation_batch)

    peft_model = peft.get_peft_model(hf_model, mode.MoDEPeftConfig(...))   # MoDE as a PEFT method

Submodules load on first use, so ``import mode`` stays cheap. The method lives here; the experiment
harness apart from it: the trainer in ``mode.train`` and what it trains on in ``mode.workloads``
(the ``[train]`` extra: scikit-learn, matplotlib, PyYAML), never imported from here. Importing peft
takes seconds, so MoDE is registered with PEFT (``mode.peft``) when peft is imported, not by
``import mode`` itself: then ``PeftModel.from_pretrained`` reads MoDE adapters in any process that
imported ``mode``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_EXPORTS = {
    "MoDEConfig": "config",
    "ModalitySpec": "modality",
    "MoDELinear": "layer",
    "apply_mode": "model",
    "attach_routing": "model",
    "teacher_mode": "model",
    "save_adapter": "adapter_io",
    "load_adapter": "adapter_io",
    "kd_loss": "kd",
    "kd_teacher_topk": "kd",
    "enable_gradient_checkpointing": "gradient_checkpointing",
    "MoDEPeftConfig": "peft",
}

# Submodules reachable as attributes without an explicit import (mode.hf.MoDETrainer).
_SUBMODULES = ("peft", "hf")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mode' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _register_with_peft() -> None:
    try:
        importlib.import_module(".peft", __name__)
    except Exception as exc:  # never break `import peft` itself
        warnings.warn(f"mode: could not register MoDE with peft ({type(exc).__name__}: {exc}); MoDE adapters "
                      "cannot be loaded through PEFT in this process", stacklevel=2)


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first ``import peft`` it lets the other finders locate peft and
    makes its loader register MoDE right after peft has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_with_peft()

            spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif not any(isinstance(finder, _RegisterAfterPeftImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeftImport())
