"""Parameter-efficient fine-tuning methods whose adapters Hugging Face PEFT can load.

    import peft_methods as pm
    model = pm.apply(hf_model, "lora", r=8, lora_alpha=16, target_modules=["query", "value"])
    model = pm.apply(hf_model, "lora", layout=pm.Layout(query=..., value=...))  # defaults
    pm.trainable_report(model)        # {"trainable_params": ..., "trainable_percent": ...}
    pm.save_adapter(model, "adapter/")  # adapter_config.json + adapter_model.safetensors
    model = pm.load_adapter(fresh_hf_model, "adapter/")   # also loads adapters PEFT saved

This package imports torch and transformers only (never `distill`). Each method is one module
that registers itself; importing the package registers them all.
"""

from __future__ import annotations

import importlib

from peft_methods.base import (
    REGISTRY,
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    get_method,
)
from peft_methods.ops import (
    adapter_state_dict,
    apply,
    load_adapter,
    merge,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
    trainable_report,
    unmerge,
)

# One line per method module; each registers its method(s) on import.
_METHOD_MODULES = (
    "full", "lora", "qlora", "adalora", "adapter", "bitfit", "ia3", "prompt_tuning",
    "p_tuning", "prefix_tuning", "unipelt", "diff_tuning",
)
for _name in _METHOD_MODULES:
    importlib.import_module(f"peft_methods.{_name}")


def available() -> list[str]:
    """Names of the registered methods."""
    return sorted(REGISTRY)


__all__ = ["AdaptedModel", "Layout", "Method", "MethodConfig", "PeftMethodError",
           "adapter_state_dict", "apply", "available", "get_method", "load_adapter", "merge",
           "merge_and_unload", "read_adapter_config", "save_adapter", "trainable_report",
           "unmerge"]
