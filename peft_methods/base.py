"""What every PEFT method shares: config base, the wrapped model, module matching, registry.

A method is one subclass of `Method` (one file per method) registered with `@register`. It
changes the Hugging Face model in place (wrapping the layers it adapts, like PEFT does, so the
tensor names match PEFT's) and may own extra modules (a prompt encoder) that live on the
`AdaptedModel` wrapper. Everything else — freezing, `modules_to_save`, the trainable report,
merge/unmerge, the two-file save format — is done here once.

On disk (METHODS.md §4) an adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, the layout and tensor names of Hugging Face PEFT:
- layer methods: `base_model.model.<module path>.<tensor>` (e.g. `...query.lora_A.weight`);
- prompt-learning methods: `prompt_embeddings` plus `base_model.<path>` for saved modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# The task heads PEFT saves for a classification task (PeftModelForSequenceClassification).
HEAD_NAMES = ("classifier", "score")
# What PEFT (0.22 on) lists in a classifier adapter's modules_to_save: the heads and
# DistilBERT's `pre_classifier`, initialized at random like the head. A model has some of
# them only, so the others missing from it is no mistake in a saved config.
CLASSIFIER_MODULES = (*HEAD_NAMES, "pre_classifier")


@dataclass(frozen=True)
class Layout:
    """Where a model's sub-layers are, as full module paths (as in `named_modules()`).

    The methods choose their default targets from it when `target_modules` (or an adapter's
    `*_modules`) is not given: LoRA and AdaLoRA the query and value projections, IA3 the key,
    value and feed-forward output projections, the bottleneck adapters the sub-layer outputs,
    UniPELT's prefix the self-attention modules. This package reads no model family itself:
    whoever knows the architecture passes it to `apply` (distill: `distill.arch.peft_layout`).
    Query/key/value include cross-attention projections; a fused QKV projection stands for
    each of the three.
    """

    query: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    value: tuple[str, ...] = ()
    attention_output: tuple[str, ...] = ()  # self-attention output projections
    cross_attention_output: tuple[str, ...] = ()
    ffn_output: tuple[str, ...] = ()  # feed-forward output (down) projections
    prefix_attention: tuple[str, ...] = ()  # self-attention modules that read a KV prefix

    def paths(self, *roles: str) -> list[str]:
        """The paths of `roles`, each once, in model order of first mention."""
        return list(dict.fromkeys(p for role in roles for p in getattr(self, role)))


def layout_defaults(layout: Layout | None, roles: tuple[str, ...], *, method: str,
                    option: str) -> list[str]:
    """Full paths of `roles` in `layout`, or a PeftMethodError asking for `option`."""
    paths = layout.paths(*roles) if layout is not None else []
    if not paths:
        raise PeftMethodError(
            f"{method}: no default `{option}` for this model: give `{option}` (module names, a "
            f"regular expression, or 'all-linear'), or apply the method with the model's "
            f"`layout` (which says where its {', '.join(r.replace('_', ' ') for r in roles)} "
            f"projections are)")
    return paths


def compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """`paths` as an adapter file records them, in PEFT's name-list form (a module matches an
    entry it equals or ends with, after a dot): for each path its shortest suffix that
    matches no module outside `paths` (`q_proj`, or `0.output.dense` where `output.dense`
    would also match BERT's attention output)."""
    wanted = set(paths)
    names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in wanted for n in names if n == suffix or n.endswith("." + suffix)):
                chosen.add(suffix)
                break
    return sorted(chosen)


class PeftMethodError(ValueError):
    """A user-facing mistake: bad config value, a pattern matching nothing, a method that does
    not fit the model, an adapter folder that is not one. The message says what is allowed."""


# --------------------------------------------------------------------------------------------
# config


@dataclass
class MethodConfig:
    """Fields every method has. Subclasses add theirs (each documented) and check them in
    `__post_init__` (call `super().__post_init__()`)."""

    # Modules that train fully and are saved with the adapter (PEFT's `modules_to_save`).
    # None = automatic: for a classifier its head (`classifier`/`score`) and pooler, which a
    # new task needs (METHODS.md §3); nothing for language models. Names match a module whose
    # path equals the name or ends with `.name`.
    modules_to_save: list[str] | None = None
    # PEFT task type: SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION. None = from the
    # model class.
    task_type: str | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise PeftMethodError(f"Unsupported `task_type` {self.task_type!r}. Supported values "
                                  f"are {', '.join(repr(t) for t in TASK_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "TOKEN_CLS",
              "QUESTION_ANS")


def infer_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if name.endswith("ForConditionalGeneration") and getattr(
            getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def make_config(config_cls: type[MethodConfig], options: dict[str, Any], method: str
                ) -> MethodConfig:
    """`config_cls(**options)` with unknown keys reported by name with a "did you mean"."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [k for k in options if k not in names]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PeftMethodError(f"{method}: unknown option {', '.join(hints)}; allowed: "
                              f"{', '.join(names)}")
    return config_cls(**options)


# --------------------------------------------------------------------------------------------
# module matching


def module_matches(name: str, pattern: str | list[str]) -> bool:
    """PEFT's rule: a string is a regular expression over the full module path (fullmatch);
    a list matches a module whose path equals an entry or ends with `.entry`."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (weight stored transposed: [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) for nn.Linear and Conv1D alike."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: [in, out]
    return w.shape[0], w.shape[1]


def output_layer_names(model: nn.Module) -> set[str]:
    """Paths of the final projection(s) that `all-linear` leaves alone (lm_head, task head)."""
    names: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
        if name.split(".")[-1] in HEAD_NAMES or name.split(".")[0] in HEAD_NAMES:
            names.add(name)
    return names


def find_targets(model: nn.Module, target: str | list[str], *, method: str,
                 accept: Callable[[nn.Module], bool] = is_linear,
                 exclude: Iterable[str] = ()) -> list[str]:
    """Paths of the modules `target` selects (`"all-linear"` = every linear layer except the
    output layer and task head). A pattern that selects nothing is an error listing close
    names, and so is a selected module of a kind the method cannot wrap."""
    excluded = set(exclude)
    names = [n for n, _ in model.named_modules() if n and n not in excluded]
    modules = dict(model.named_modules())
    if target == "all-linear":
        skip = output_layer_names(model)
        found = [n for n in names if is_linear(modules[n]) and n not in skip]
    else:
        found = [n for n in names if module_matches(n, target)]
    if not found:
        leaves = sorted({n.split(".")[-1] for n in names if accept(modules[n])})
        wanted = [target] if isinstance(target, str) else list(target)
        close = sorted({c for w in wanted for c in difflib.get_close_matches(
            str(w).split(".")[-1], leaves, n=3, cutoff=0.4)})
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise PeftMethodError(f"{method}: target_modules {target!r} match no module of "
                              f"{type(model).__name__}{hint}; its adaptable modules are "
                              f"{', '.join(leaves[:20])}")
    bad = [n for n in found if not accept(modules[n])]
    if bad:
        kind = type(modules[bad[0]]).__name__
        raise PeftMethodError(f"{method}: cannot adapt {bad[0]} ({kind}); "
                              f"target_modules must select linear layers")
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def resolve_modules_to_save(model: nn.Module, config: MethodConfig, task_type: str
                            ) -> list[str]:
    """The module paths that train fully and are saved with the adapter."""
    keys = config.modules_to_save
    auto = keys is None
    if auto:
        keys = list(CLASSIFIER_MODULES) + ["pooler"] if task_type == "SEQ_CLS" else []
    found = [n for n, _ in model.named_modules() if n and module_matches(n, keys)]
    # keep outermost matches only (`classifier` and `classifier.dense` both match otherwise)
    found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    if not auto:
        heads_found = any(module_matches(n, list(HEAD_NAMES)) for n in found)
        for key in keys:
            # PEFT's classifier configs list every CLASSIFIER_MODULES name; a model has
            # some of them only.
            if key in CLASSIFIER_MODULES and heads_found:
                continue
            if not any(module_matches(n, [key]) for n in found):
                leaves = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
                close = difflib.get_close_matches(key, leaves, n=3)
                raise PeftMethodError(
                    f"modules_to_save: {key!r} matches no module"
                    + (f"; close names: {', '.join(close)}" if close else ""))
    return found


class WrapsBaseLayer:
    """Mixin for layers that wrap `self.base_layer`: Hugging Face code reads `layer.weight` and
    `layer.bias` on layers we wrap (T5 checks `self.wo.weight.dtype`), so the wrapper shows the
    wrapped layer's tensors, as PEFT's layers do."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


# --------------------------------------------------------------------------------------------
# the wrapped model


class AdaptedModel(nn.Module):
    """A Hugging Face model with one PEFT method applied.

    `model` is the (in-place modified) Hugging Face model; `extra` holds modules the method
    owns outside it (prompt encoders). `forward`/`generate` go through the method, so prompt
    methods can prepend their tokens; everything else passes straight through.
    """

    def __init__(self, model: nn.Module, method: Method, config: MethodConfig, task_type: str,
                 modules_to_save: list[str], layout: Layout | None = None) -> None:
        super().__init__()
        self.model = model
        self.layout = layout  # where the model's sub-layers are, for default targets
        self.extra = nn.ModuleDict()
        self.method = method
        self.peft_config = config
        self.task_type = task_type
        self.modules_to_save = modules_to_save
        self.merged = False

    # HF-like conveniences used by training/evaluation code
    @property
    def config(self):  # noqa: D401 - the base model's config
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kwargs):
        return self.method.forward(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.method.generate(self, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.model

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser the method adds to the task loss (AdaLoRA orthogonality,
        diff-tuning's λ‖Δ‖), or None."""
        return self.method.extra_loss(self)

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict] | None:
        """Optimizer parameter groups when the method needs its own (LoRA+), else None."""
        return self.method.optimizer_groups(self, lr, weight_decay)

    def on_step(self, step: int) -> None:
        """Called after each optimizer step, before gradients are cleared (AdaLoRA's budget)."""
        self.method.on_step(self, step)


# --------------------------------------------------------------------------------------------
# methods and the registry


class Method:
    """One PEFT method. Subclasses set the class attributes and implement `inject`."""

    name: ClassVar[str]                      # registry key, e.g. "lora"
    peft_type: ClassVar[str]                 # adapter_config.json `peft_type`, e.g. "LORA"
    config_cls: ClassVar[type[MethodConfig]]
    prompt_learning: ClassVar[bool] = False  # PEFT's prompt-learning key layout
    mergeable: ClassVar[bool] = False        # merge()/unmerge() supported
    identity_at_init: ClassVar[bool] = True  # outputs unchanged right after apply()
    # on_step reads whole gradients (AdaLoRA's importance), which FSDP and DeepSpeed partition.
    reads_gradients: ClassVar[bool] = False
    # Parameter/buffer name parts that mark the method's own tensors inside the HF model
    # (e.g. ("lora_A", "lora_B")); used by the default state-dict IO.
    markers: ClassVar[tuple[str, ...]] = ()

    # -- to implement ------------------------------------------------------------------------
    def inject(self, adapted: AdaptedModel) -> None:
        """Add the method's modules to `adapted.model` (and/or `adapted.extra`). Called after
        every base parameter was frozen; new parameters train by default."""
        raise NotImplementedError

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        """Raise PeftMethodError when the method cannot fit this model."""

    # -- optional hooks ----------------------------------------------------------------------
    def forward(self, adapted: AdaptedModel, *args, **kwargs):
        return adapted.model(*args, **kwargs)

    def generate(self, adapted: AdaptedModel, *args, **kwargs):
        return adapted.model.generate(*args, **kwargs)

    def extra_loss(self, adapted: AdaptedModel) -> torch.Tensor | None:
        return None

    def optimizer_groups(self, adapted: AdaptedModel, lr: float, weight_decay: float
                         ) -> list[dict] | None:
        return None

    def on_step(self, adapted: AdaptedModel, step: int) -> None:
        return None

    def merge(self, adapted: AdaptedModel) -> None:
        """Default: every injected layer with a `merge()` merges."""
        self._require_mergeable()
        for module in adapted.model.modules():
            if module is not adapted.model and hasattr(module, "merge") and \
                    callable(module.merge) and getattr(module, "is_peft_layer", False):
                module.merge()

    def unmerge(self, adapted: AdaptedModel) -> None:
        self._require_mergeable()
        for module in adapted.model.modules():
            if getattr(module, "is_peft_layer", False) and hasattr(module, "unmerge"):
                module.unmerge()

    def _require_mergeable(self) -> None:
        if not self.mergeable:
            raise PeftMethodError(f"{self.name} cannot be merged into the base weights; "
                                  f"mergeable methods: {', '.join(mergeable_methods())}")

    # -- file format -------------------------------------------------------------------------
    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        """adapter_config.json. Default: the config's fields plus the PEFT bookkeeping."""
        out = {k: v for k, v in adapted.peft_config.to_dict().items()}
        out.update(peft_type=self.peft_type, task_type=adapted.task_type,
                   modules_to_save=adapted.modules_to_save or None, inference_mode=True,
                   base_model_name_or_path=getattr(adapted.model.config, "_name_or_path", None)
                   or None)
        return out

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        """Our config from an adapter_config.json (ours or PEFT's): known fields only."""
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        return self.config_cls(**{k: v for k, v in data.items() if k in names})

    def key_prefix(self) -> str:
        return "base_model." if self.prompt_learning else "base_model.model."

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        """The method's own tensors under PEFT's names (modules_to_save are added by the
        caller). Default: every parameter of the HF model whose path has a marker part."""
        prefix = self.key_prefix()
        return {prefix + n: t for n, t in _marked(adapted.model, self.markers)}

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        """Load tensors named as `adapter_state_dict` names them; raises on missing keys."""
        prefix = self.key_prefix()
        own = dict(_marked(adapted.model, self.markers))
        load_named(own, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   what=self.name)


def _marked(model: nn.Module, markers: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    items = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t) for n, t in items if any(m in n.split(".") for m in markers)]


def load_named(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], *,
               what: str) -> None:
    """Copy `source[k]` into `target[k]` for every k in `target`; missing keys and shape
    mismatches are errors (an adapter for another model), extra keys are ignored here."""
    missing = [k for k in target if k not in source]
    if missing:
        raise PeftMethodError(f"{what}: the adapter lacks {len(missing)} tensor(s) this model "
                              f"needs, e.g. {missing[0]} — was it saved for another model?")
    with torch.no_grad():
        for k, t in target.items():
            src = source[k]
            if tuple(src.shape) != tuple(t.shape):
                raise PeftMethodError(f"{what}: {k} has shape {tuple(src.shape)} in the adapter "
                                      f"but this model needs {tuple(t.shape)} — was it saved "
                                      f"for another model?")
            t.copy_(src.to(dtype=t.dtype, device=t.device))


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one line registers a method under `cls.name`."""
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise PeftMethodError(f"unknown PEFT method {name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def method_for_peft_type(peft_type: str, data: dict[str, Any]) -> Method:
    """Our method for an adapter_config.json; `distill_method` (ours) wins over peft_type."""
    ours = data.get("distill_method")
    if ours:
        return get_method(ours)
    for m in REGISTRY.values():
        if m.peft_type == peft_type:
            return m
    raise PeftMethodError(f"adapter peft_type {peft_type!r} is not supported; supported: "
                          f"{', '.join(sorted({m.peft_type for m in REGISTRY.values()}))}")


def mergeable_methods() -> list[str]:
    return sorted(n for n, m in REGISTRY.items() if m.mergeable)
