"""Recipes as typed dataclasses: every section and stage, its keys, defaults and checks.

A recipe is plain YAML (no tags, no code; read and validated by `distill.config.loading`).
Every key has a default in its dataclass below; the comment on each field is its
documentation. Each dataclass's `check` adds the problems a type alone cannot express.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from distill.config.schema import seed_range, value_range


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelSpec:
    """Where a model comes from."""

    # `builtin:minilm-l6`, a local Hugging Face directory, or a hub id (needs network).
    model: str = "builtin:minilm-l6"
    # What the model does: `sequence-classification` (a label per text; accuracy) or
    # `causal-lm` (next-token prediction on a text corpus; perplexity). null: read from the
    # model's config (a base model without a task head is taken as a classifier's body).
    task: Literal["sequence-classification", "causal-lm"] | None = None
    # Run code shipped with a model repository. Off unless you trust its author.
    trust_remote_code: bool = False
    # Read pickled weights (pytorch_model.bin, *.pt) when the model folder has no safetensors,
    # with torch.load(weights_only=True). Off: unpickling can run code; convert them instead.
    allow_pickle: bool = False
    # The frozen teacher of `distill` and `shrink` (heal) stages only; `finetune` trains the
    # teacher as saved. Its weights' dtype: bfloat16 halves the memory of a float32 teacher
    # (soft labels then carry bf16 rounding, ~3 significant digits); null = as saved.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Spread the frozen teacher over this process's devices ("auto", "balanced",
    # "sequential", "cpu", "cuda:1", ...) with accelerate's big-model dispatch: layers that do
    # not fit on the GPUs go to CPU RAM, then to `offload_folder` on disk. One process only.
    device_map: str | None = None
    # Memory budget per device for `device_map`, e.g. {"0": 10GiB, cpu: 30GiB}; default: what
    # the devices have free.
    max_memory: dict[str, str] | None = None
    # Folder for the teacher layers offloaded to disk (needs `device_map`).
    offload_folder: str | None = None

    def check(self, path: str) -> list[str]:
        return [f"{path}.{key}: needs `device_map` (e.g. auto) to take effect"
                for key in ("max_memory", "offload_folder")
                if getattr(self, key) is not None and self.device_map is None]


@dataclass
class DataConfig:
    """The task data: a built-in dataset, one local file, or a folder of split files."""

    # `builtin:rotten_tomatoes`, `builtin:bbc_news`, a .csv/.json/.jsonl/.parquet file (split
    # 80/10/10 with `split_seed`), or a folder with train/validation/test files. Language models
    # also read text corpora and conversations (distill/data/text.py, dialogues.py), and a list
    # of text corpora as one mixture.
    dataset: str | list[str] = "builtin:rotten_tomatoes"
    # A hub id, or a folder saved by `datasets`, is read with `datasets` (distill/data/hub.py):
    # its configuration, and one split to use as the whole source (carved 80/10/10 like a
    # file); null: the dataset's own train/validation/test, missing ones carved out of train.
    config: str | None = None
    split: str | None = None
    # A text mixture's share of blocks per source, in the order of `dataset` (e.g. [1, 1]:
    # as many blocks of each); null: in proportion to the sources' sizes.
    weights: list[float] | None = field(default=None, metadata=value_range(0, lo_open=True))
    # Language-model text larger than memory: read the source as a stream and keep only the
    # first max_train_examples / max_eval_examples blocks of each split (both then required;
    # distill/data/streaming.py says how a stream is split).
    streaming: bool = False

    def check(self, path: str) -> list[str]:
        if self.weights is None:
            return []
        if not isinstance(self.dataset, list) or len(self.weights) != len(self.dataset):
            n = len(self.dataset) if isinstance(self.dataset, list) else 1
            return [f"{path}.weights: {len(self.weights)} weights for {n} dataset(s); give one "
                    "per source of a dataset list"]
        return []
    text_column: str = "text"
    label_column: str = "label"
    # Tokens per example; longer texts are truncated.
    max_length: int = field(default=128, metadata=value_range(8, 4096))
    # Keep only the first N training / evaluation examples (after the deterministic shuffle).
    max_train_examples: int | None = field(default=None, metadata=value_range(1))
    max_eval_examples: int | None = field(default=None, metadata=value_range(1))
    # Seed of the train/validation/test split of a single file (fixed so numbers compare).
    split_seed: int = field(default=0, metadata=seed_range())
    # Language models: add N blocks of max_length tokens sampled from the run's teacher to the
    # training split (general text in the teacher's own distribution, so a heal keeps more
    # than its corpus holds; distill/kd/teacher_samples.py). Sampled once, then read from the cache.
    teacher_samples: int | None = field(default=None, metadata=value_range(1))


@dataclass
class TrainArgs:
    """The shared training loop's settings (every training stage has these keys)."""

    epochs: float = field(default=3, metadata=value_range(0, lo_open=True))
    batch_size: int = field(default=32, metadata=value_range(1))
    eval_batch_size: int = field(default=64, metadata=value_range(1))
    learning_rate: float = field(default=5e-5, metadata=value_range(0, lo_open=True))
    weight_decay: float = field(default=0.01, metadata=value_range(0))
    # Fraction of the optimizer steps spent warming the learning rate up linearly from 0.
    warmup_ratio: float = field(default=0.1, metadata=value_range(0, 1))
    # Shuffled batches of examples of similar length (each epoch still sees every example
    # once, in random order): far less padding on text of mixed lengths. false: uniformly
    # random batches.
    group_by_length: bool = True
    # Micro-batches per optimizer step.
    grad_accum_steps: int = field(default=1, metadata=value_range(1))
    max_grad_norm: float | None = field(default=1.0, metadata=value_range(0, lo_open=True))
    # bfloat16 autocast. "auto": decided at the start of the stage on the machine it trains on,
    # by timing a few forward + backward passes of the stage's own model in both precisions;
    # bf16 only where it is clearly faster (distill/train/precision.py: faster with AMX or
    # AVX-512 BF16, far slower on AVX2-only CPUs); true/false force it.
    bf16: bool | Literal["auto"] = "auto"
    # torch.compile the trained model's forward for the training steps (validation stays
    # eager). It pays on long runs only: the first step compiles for a minute or two (2 CPU
    # cores), after which a SmolLM2 LoRA heal step under bf16 took 0.78x the eager one and a
    # MiniLM student's 0.98x (bench/results/compile_step.json). One process or DDP only.
    compile: bool = False
    # Write a log line every N optimizer steps.
    log_every: int = field(default=10, metadata=value_range(1))
    # Evaluate on the validation split every epoch and keep the best weights.
    keep_best: bool = True
    # Save a checkpoint every N optimizer steps (and at each epoch end) so that a killed run
    # resumes (`distill run --resume RUN_DIR`); null = only at epoch ends.
    checkpoint_every: int | None = field(default=200, metadata=value_range(1))
    # Seed of this stage (data order, dropout, fresh weights); default: the recipe's seed.
    seed: int | None = field(default=None, metadata=seed_range())
    # What trains: `full` (every weight) or a PEFT method of `peft_methods` (lora, ia3, ...;
    # `distill attach --help` lists them) with its options in `config`, e.g. {r: 8,
    # target_modules: all-linear}. A distill stage merges a mergeable method into the student
    # it saves and keeps any other as an adapter on it; a heal step, whose model the next cut
    # works on, takes mergeable methods only.
    method: str = "full"
    config: dict[str, Any] = field(default_factory=dict)

    def check(self, path: str) -> list[str]:
        return method_problems(self.method, self.config, path)


@dataclass
class StudentSpec:
    """Which teacher layers the student keeps (weights copied from the teacher)."""

    # Explicit teacher layer indices, e.g. [0, 2, 4].
    layers: list[int] | None = None
    # Or: this many layers, evenly spaced over the teacher's.
    num_layers: int | None = field(default=None, metadata=value_range(1))

    def check(self, path: str) -> list[str]:
        problems = []
        if self.layers is not None and self.num_layers is not None:
            problems.append(f"{path}: set either `layers` or `num_layers`, not both")
        if self.layers is None and self.num_layers is None:
            problems.append(f"{path}: set `layers` (e.g. [0, 2, 4]) or `num_layers` (e.g. 3)")
        if self.layers is not None:
            if not self.layers:
                problems.append(f"{path}.layers: must list at least one layer")
            if any(i < 0 for i in self.layers):
                problems.append(f"{path}.layers: {self.layers} has negative indices; "
                                "layers count from 0")
            if len(set(self.layers)) != len(self.layers):
                problems.append(f"{path}.layers: {self.layers} repeats a layer")
        return problems


@dataclass
class LossConfig:
    """`alpha·CE + (1−alpha)·T²·KL(teacher‖student)` plus weighted intermediate losses."""

    # Weight of the hard-label cross-entropy; 1 = plain fine-tuning, 0 = pure distillation.
    alpha: float = field(default=0.5, metadata=value_range(0, 1))
    # Softmax temperature T of the soft labels.
    temperature: float = field(default=2.0, metadata=value_range(0, lo_open=True))
    # Weight of the hidden-state MSE (student layer i vs teacher layer layer_map[i]).
    hidden_mse: float = field(default=0.0, metadata=value_range(0))
    # Weight of the attention-map KL (same layer map; heads averaged if counts differ).
    attention_kl: float = field(default=0.0, metadata=value_range(0))
    # Weight of the cosine loss between the final hidden states.
    cosine: float = field(default=0.0, metadata=value_range(0))
    # Teacher layer (0-based) each student layer learns from; default: evenly spaced block ends.
    layer_map: list[int] | None = field(default=None, metadata=value_range(0))
    # The divergence of the soft-label term: forward_kl (Hinton), reverse_kl (MiniLLM), jsd
    # (generalized JSD with `beta`, as TRL's GKD), skew_forward_kl / skew_reverse_kl (DistiLLM,
    # mixing `skew` of the other distribution in).
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                        "skew_reverse_kl"] = "forward_kl"
    beta: float = field(default=0.5, metadata=value_range(0, 1))
    skew: float = field(default=0.1, metadata=value_range(0, 1))
    # Language models: learn from the teacher's k most probable next tokens (renormalised, the
    # rest of the mass kept as one bucket) -- what the teacher cache stores, 8k + 4 bytes per
    # token; null = the whole vocabulary (then nothing is cached).
    top_k: int | None = field(default=None, metadata=value_range(1))


@dataclass
class FinetuneStage(TrainArgs):
    """Full fine-tuning of the teacher on the task (makes the task teacher)."""

    kind: Literal["finetune"] = "finetune"
    # Skip when the teacher already has a trained head for exactly these labels.
    skip_if_tuned: bool = True


@dataclass
class DistillStage(TrainArgs):
    """A student from a subset of the teacher's layers, trained with soft-label KD."""

    kind: Literal["distill"] = "distill"
    student: StudentSpec = field(default_factory=lambda: StudentSpec(num_layers=3))
    loss: LossConfig = field(default_factory=LossConfig)
    # Compute the teacher's soft labels once and reuse them every epoch (logit losses only;
    # for language models with `loss.top_k`).
    cache_teacher: bool = True


@dataclass
class EvaluateStage:
    """Test-split metrics, size and CPU latency of every model of the run."""

    kind: Literal["evaluate"] = "evaluate"
    split: Literal["test", "validation"] = "test"
    batch_size: int = field(default=64, metadata=value_range(1))
    # Measure CPU latency at batch 1 and 32 (median of `latency_runs` timed runs).
    latency: bool = True
    latency_runs: int = field(default=10, metadata=value_range(1))
    # More data to score every model on (same task), each reported beside the recipe's own:
    # e.g. a corpus the heal never saw, [{dataset: builtin:bbc_news, max_eval_examples: 64}].
    eval_data: list[DataConfig] = field(default_factory=list)


@dataclass
class ShrinkStep:
    """One cut of a progressive shrink: any of depth and the widths, from the current model."""

    # Keep this many of the current model's layers (chosen by the stage's `depth_strategy`).
    layers: int | None = field(default=None, metadata=value_range(1))
    # Width targets (units ranked by activation importance on the calibration batch).
    hidden: int | None = field(default=None, metadata=value_range(1))
    heads: int | None = field(default=None, metadata=value_range(1))
    intermediate: int | None = field(default=None, metadata=value_range(1))
    # Heal epochs after this cut; default: the stage's `heal.epochs`. A progressive schedule
    # can heal an intermediate cut briefly and spend its steps on the final depth (SmolLM2,
    # bench/smollm_heal.py: at equal steps a one-shot heal beat a 50/50 progressive one).
    heal_epochs: float | None = field(default=None, metadata=value_range(0, lo_open=True))

    def check(self, path: str) -> list[str]:
        if not self.targets():
            return [f"{path}: a step needs at least one of layers, hidden, heads, intermediate"]
        return []

    def targets(self) -> dict[str, int]:
        """What this step cuts to, e.g. {layers: 24} (the heal's length is not a target)."""
        return {k: v for k, v in (("layers", self.layers), ("hidden", self.hidden),
                                  ("heads", self.heads), ("intermediate", self.intermediate))
                if v is not None}

    def describe(self) -> str:
        """A short name for the step, e.g. `layers4` or `hidden256-heads8`."""
        return "-".join(f"{k}{v}" for k, v in self.targets().items())


@dataclass
class HealConfig(TrainArgs):
    """KD from the teacher after each cut (the shared loop's keys plus the loss)."""

    epochs: float = field(default=1, metadata=value_range(0, lo_open=True))
    learning_rate: float = field(default=1e-4, metadata=value_range(0, lo_open=True))
    loss: LossConfig = field(default_factory=LossConfig)
    # Reuse the teacher's cached logits across steps (logit losses only).
    cache_teacher: bool = True

    def check(self, path: str) -> list[str]:
        return super().check(path) or merged_method_problems(self.method, path)


@dataclass
class ShrinkStage:
    """Progressive shrinking: cut, heal with KD, measure; step by step (METHODS.md §2)."""

    kind: Literal["shrink"] = "shrink"
    schedule: list[ShrinkStep] = field(default_factory=list)
    # Start from the latest model of the run ("previous") or from the teacher.
    start: Literal["previous", "teacher"] = "previous"
    # How a depth cut picks the layers to keep.
    depth_strategy: Literal["importance", "uniform", "top"] = "importance"
    # Depth importance: `loss`, the loss increase when a block is skipped (measured best on
    # SmolLM2: ppl x3.0 vs x13 for block influence 1 − cos(h_in, h_out) when 10 of 30 layers
    # go); `hidden`, how much skipping it changes the final hidden states (models without a
    # task head); `influence`; `auto`: `loss` with a task head, else `hidden`.
    importance_score: Literal["auto", "loss", "hidden", "influence"] = "auto"
    # Training examples in the calibration batch (importance of layers, heads, neurons).
    calibration_examples: int = field(default=256, metadata=value_range(1))
    heal: HealConfig = field(default_factory=HealConfig)

    def check(self, path: str) -> list[str]:
        if not self.schedule:
            return [f"{path}.schedule: list at least one step, e.g. [{{layers: 4}}, "
                    "{hidden: 256, heads: 8}]"]
        return []


@dataclass
class AdaptStage(TrainArgs):
    """PEFT on a model of the run (METHODS.md §3), maybe for another task with a new head.

    The adapter (PEFT format) is saved in the stage folder; the stage evaluates itself on its
    data's test split, since its task may not be the recipe's.
    """

    kind: Literal["adapt"] = "adapt"
    # A method of `peft_methods` (`distill attach --help` lists them), e.g. lora, ia3, houlsby.
    # AdaLoRA's `total_step` defaults to the stage's optimizer steps.
    method: str = "lora"
    # The base model: "previous" (the run's latest model), "teacher", or a path/built-in name.
    model: str = "previous"
    # The task data; default: the recipe's `data`. A new label set gets a new head.
    data: DataConfig | None = None
    # PEFT methods train few parameters and want larger steps than full fine-tuning.
    learning_rate: float = field(default=1e-3, metadata=value_range(0, lo_open=True))
    # A name for the report rows (default: the method).
    label: str | None = None
    # Like `teacher.allow_pickle`, for a `model` path: read its pickled weights (no
    # safetensors in the folder) with torch.load(weights_only=True).
    allow_pickle: bool = False
    # Distill while adapting: `alpha` < 1 adds the KD terms against `teacher` (the default
    # alpha = 1 trains on the task's hard loss only).
    loss: LossConfig = field(default_factory=lambda: LossConfig(alpha=1.0))
    # The teacher of the KD terms: "run" (the run's teacher), or a path/built-in name of a
    # teacher for this stage's task (same tokenizer).
    teacher: str = "run"


def method_problems(method: str, config: dict[str, Any], path: str) -> list[str]:
    """A training stage's PEFT method and its options, checked by the method's own config
    class (unknown method, unknown option, bad value)."""
    import peft_methods

    # The method's own config classes check types, not finiteness: `lora_dropout: .nan`
    # would train on NaN. No PEFT option means anything by NaN or ±inf.
    non_finite = _non_finite(config, f"{path}.config")
    if non_finite:
        return non_finite
    try:
        config_cls = peft_methods.get_method(method).config_cls
        options = dict(config)
        if "total_step" in {f.name for f in dataclasses.fields(config_cls)}:
            # The stage fills in the real step count (AdaLoRA's schedule) when absent.
            options.setdefault("total_step", 10**9)
        peft_methods.base.make_config(config_cls, options, method)
    except peft_methods.PeftMethodError as exc:
        key = "method" if "unknown PEFT method" in str(exc) else "config"
        return [f"{path}.{key}: {exc}"]
    except (TypeError, ValueError) as exc:
        return [f"{path}.config: {exc}"]
    return []


def merged_method_problems(method: str, path: str) -> list[str]:
    """A heal step merges its method into the student the next cut works on."""
    import peft_methods

    if method in ("full", *peft_methods.base.mergeable_methods()):
        return []
    return [f"{path}.method: {method} cannot be merged into the student a heal step hands to "
            f"the next cut; allowed: full, {', '.join(peft_methods.base.mergeable_methods())} "
            "(or attach it after the shrink in an adapt stage, with KD: loss.alpha < 1)"]


def _non_finite(value: Any, path: str) -> list[str]:
    """A problem for each NaN or ±inf float in `value` (nested mappings and lists walked)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path}: {value!r} is not a finite number; allowed: a finite number"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}.{i}")]
    return []


@dataclass
class ExportStage:
    """A model of the run written for serving, each artifact checked against the float32
    model on the evaluation split and timed (distill/stages/export.py)."""

    kind: Literal["export"] = "export"
    # The model: "previous" (the run's latest model), "teacher", or a path/built-in name.
    model: str = "previous"
    # bf16: Hugging Face folder, bfloat16 safetensors; onnx: float32 ONNX graph; onnx-int8:
    # that graph with int8 matrix weights (ONNX Runtime's dynamic quantization).
    formats: list[Literal["bf16", "onnx", "onnx-int8"]] = field(
        default_factory=lambda: ["bf16", "onnx", "onnx-int8"])
    # Keep only the tokens the task's data uses (and the special ones): a smaller embedding
    # table and tokenizer, the same predictions on the data (WordPiece, Unigram, WordLevel).
    trim_vocabulary: bool = False
    split: Literal["test", "validation"] = "test"
    batch_size: int = field(default=64, metadata=value_range(1))
    # Time each artifact at batch 1 and 32 (median of `latency_runs` runs), full-length inputs.
    latency: bool = True
    latency_runs: int = field(default=10, metadata=value_range(1))

    def check(self, path: str) -> list[str]:
        if not self.formats:
            return [f"{path}.formats: name at least one of bf16, onnx, onnx-int8"]
        twice = sorted({f for f in self.formats if self.formats.count(f) > 1})
        return [f"{path}.formats: {', '.join(twice)} given twice"] if twice else []


Stage = Union[FinetuneStage, DistillStage, ShrinkStage, AdaptStage, EvaluateStage,
              ExportStage]
STAGE_KINDS: dict[str, type] = {"finetune": FinetuneStage, "distill": DistillStage,
                                "shrink": ShrinkStage, "adapt": AdaptStage,
                                "evaluate": EvaluateStage, "export": ExportStage}


@dataclass
class Recipe:
    """A whole run: the teacher, the data and the stages, in order."""

    name: str = "run"
    description: str = ""
    seed: int = field(default=0, metadata=seed_range())
    # Folder that holds run directories (`<output_dir>/<name>`).
    output_dir: str = "runs"
    teacher: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Stage] = field(default_factory=list, metadata={"kinds": STAGE_KINDS})

    def check(self, path: str) -> list[str]:
        problems = []
        if not self.stages:
            problems.append("stages: the recipe has no stages; allowed kinds: "
                            + ", ".join(STAGE_KINDS))
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            problems.append(f"name: {self.name!r} must be a plain folder name "
                            "(no '/', '\\' or leading '.')")
        return problems
