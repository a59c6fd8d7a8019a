"""The whole distill job against TextBrewer's and against a bare bf16 loop: time and accuracy.

One teacher, one student, one data set, three ways of distilling, each seed in turn:
- ours: the default recipe's distill stage (recipes/minilm-rotten-tomatoes.yaml: layers 0, 2,
  4 of the teacher, 3 epochs, `0.5·CE + 0.5·T²·KL` at T = 2, lr 1e-4) with the toolkit's
  defaults (bf16 auto, the teacher's logits cached, length-grouped batches, validation every
  epoch, the best epoch kept), run by `distill.run_recipe`: the job's time is the whole run
  (data, models, cache, training, validation, saving);
- TextBrewer 0.2.1's `GeneralDistiller`, as its README sets it up: the same student (the
  teacher's layers 0, 2, 4, cut by `distill.compress.depth.keep_layers`), the same tokenized
  examples in a plain shuffled `DataLoader` (batch 32, padded to the batch's longest), the
  teacher run every step, fp32 (its mixed precision needs apex and CUDA), AdamW (lr 1e-4,
  weight decay 0.01) with 10 % linear warm-up and gradient clipping at 1.0 like ours, a
  checkpoint per epoch (its default). Its `ce` KD loss has no T² factor, so it is weighted
  `kd_loss_weight = (1 − α)·T²` and the student's own CE loss `hard_label_weight = α`: the
  same gradients as ours. Timed from building the student to the end of `train`;
- a bare PyTorch loop under bf16 autocast on the same plain DataLoader (bench/floor.py's
  `bare`: what a user who writes 60 lines gets), timed for its training steps only, on the
  first seed only by default (`--bare-seeds`): its time hardly varies (114-116 s over 3
  seeds at f4094a1, when the job trained on 2,560 examples), and timing it once saves
  `make bench` minutes.

Both students are then scored the same way on the whole test split (1,280 reviews, batch 32).
`speedup` = TextBrewer's job seconds / ours; `acc_delta` = our test accuracy − TextBrewer's,
means over the seeds; `bf16_floor_speedup` = the bare bf16 loop's seconds / our job's on
the same seeds.

To fit `make bench`'s budget the three train on the first `--examples` training examples
(default 1,280: 40 steps an epoch, 1/8 of the split; the validation and test splits are
whole). Our job's fixed costs (loading, validation, saving) weigh more on a shorter job, so
this understates our speed-up over a whole-split job. (1,920 examples until the serving
bench grew: speed-up 2.73, ours − TextBrewer +0.0057 at 960a56c; 3.4 min more of `make bench`.)

    HF_HUB_OFFLINE=1 python bench/textbrewer_job.py
    # -> bench/results/textbrewer_job.json (~8 min)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import textbrewer
from rich.console import Console
from torch.utils.data import DataLoader
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          get_linear_schedule_with_warmup)

from distill import load_recipe, run_recipe
from distill.compress.depth import keep_layers
from floor import bare
from minilm_stages import (ALPHA, BATCH, LAYERS, LR, RECIPE, TEMPERATURE, default_distill,
                           train_split, tuned_teacher)
from provenance import RESULTS, ROOT, write_result
from serving import batches, one_pass

# The default recipe's distill stage (ALPHA, TEMPERATURE, LR, BATCH, LAYERS: its settings);
# what TextBrewer gets of the toolkit's defaults: weight decay, warm-up, clipping.
EPOCHS, WEIGHT_DECAY, WARMUP, CLIP = 3, 0.01, 0.1, 1.0


class Data:
    """The training examples (capped), the collator and the test split, as our run reads
    them."""

    def __init__(self, teacher: Path, examples: int) -> None:
        self.recipe, checked, self.train = train_split([f"teacher.model={teacher}",
                                                        f"data.max_train_examples={examples}"])
        self.collate = checked.task.collate(checked.tokenizer)
        self.test = checked.data.test

    def plain_collate(self, items: list[dict]) -> dict:
        """A padded batch as a plain user's collator makes it: input_ids, attention_mask,
        labels (not our `idx`, which the models would get as a stray keyword)."""
        return {k: v for k, v in self.collate(items).items() if k != "idx"}

    def loader(self, seed: int) -> DataLoader:
        """A plain shuffled DataLoader, what a TextBrewer user (or a bare loop) writes."""
        return DataLoader(self.train, batch_size=BATCH, shuffle=True,
                          collate_fn=self.plain_collate,
                          generator=torch.Generator().manual_seed(seed))

    def accuracy(self, model: torch.nn.Module, tokenizer) -> float:
        """Test accuracy of `model`, batch 32."""
        inputs = batches(tokenizer, self.test.texts, self.recipe.data.max_length)
        _, predicted = one_pass(model.eval(), inputs)
        return float((predicted == torch.tensor(self.test.labels)).float().mean())


def ours(data: Data, teacher: Path, seed: int, out: Path, console: Console) -> dict:
    """Our default distill job; its seconds and the kept student's test accuracy."""
    recipe = load_recipe(RECIPE, [f"teacher.model={teacher}",
                                  f"data.max_train_examples={len(data.train)}",
                                  f"stages=[{default_distill(seed=seed)}]"])
    start = time.perf_counter()
    report = run_recipe(recipe, output=out, force=True, console=console)
    seconds = time.perf_counter() - start
    stage = report["stages"][0]
    student = out / stage["artifact"]
    model = AutoModelForSequenceClassification.from_pretrained(student)
    return {"seconds": round(seconds, 2), "precision": stage.get("precision"),
            "accuracy": data.accuracy(model, AutoTokenizer.from_pretrained(student))}


def textbrewer_job(data: Data, teacher: torch.nn.Module, tokenizer, seed: int,
                   out: Path) -> dict:
    """TextBrewer's GeneralDistiller job (see the module docstring); seconds, accuracy."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    student = keep_layers(teacher, LAYERS).train().requires_grad_(True)
    loader = data.loader(seed)
    steps = EPOCHS * len(loader)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train_config = textbrewer.TrainingConfig(device="cpu", output_dir=str(out / "model"),
                                             log_dir=str(out / "logs"))
    distill_config = textbrewer.DistillationConfig(
        temperature=TEMPERATURE, kd_loss_type="ce",
        kd_loss_weight=(1 - ALPHA) * TEMPERATURE**2, hard_label_weight=ALPHA)

    def adaptor(batch, outputs) -> dict:
        return {"logits": outputs.logits, "losses": outputs.loss}

    distiller = textbrewer.GeneralDistiller(train_config, distill_config, teacher, student,
                                            adaptor_T=adaptor, adaptor_S=adaptor)
    distiller.train(optimizer, loader, num_epochs=EPOCHS, max_grad_norm=CLIP,
                    scheduler_class=get_linear_schedule_with_warmup,
                    scheduler_args={"num_warmup_steps": int(WARMUP * steps),
                                    "num_training_steps": steps})
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "precision": "fp32",
            "accuracy": data.accuracy(student, tokenizer)}


def bare_bf16(data: Data, teacher: torch.nn.Module, seed: int) -> dict:
    """The bare loop under bf16 autocast, same epochs, plain shuffled batches: seconds."""
    torch.manual_seed(seed)
    student = keep_layers(teacher, LAYERS)
    steps = EPOCHS * len(data.loader(seed))
    loader = data.loader(seed)  # one generator across the epochs: a fresh order each epoch
    seconds, _ = bare(teacher, student, lambda: loader, steps, bf16=True)
    return {"seconds": round(seconds, 2), "precision": "bf16 autocast"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--examples", type=int, default=1280, help="training examples used")
    ap.add_argument("--bare-seeds", type=int, default=1,
                    help="time the bare bf16 loop on this many of the first seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-textbrewer")
    ap.add_argument("--json", type=Path, default=RESULTS / "textbrewer_job.json")
    args = ap.parse_args()
    console = Console()
    logging.getLogger("Distillation").setLevel(logging.WARNING)  # TextBrewer's per-step log
    teacher_dir = tuned_teacher(console)
    data = Data(teacher_dir, args.examples)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    teacher.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    runs: dict[str, list[dict]] = {"ours": [], "textbrewer": [], "bare_bf16": []}
    for i, seed in enumerate(args.seeds):
        jobs = {"ours": lambda: ours(data, teacher_dir, seed, args.out / "ours", console),
                "textbrewer": lambda: textbrewer_job(data, teacher, tokenizer, seed,
                                                     args.out / "textbrewer"),
                "bare_bf16": lambda: bare_bf16(data, teacher, seed)}
        if i >= args.bare_seeds:
            del jobs["bare_bf16"]
        order = list(jobs) if i % 2 == 0 else list(reversed(jobs))  # drift hits every side
        for name in order:
            row = {"seed": seed} | jobs[name]()
            runs[name].append(row)
            console.print(f"seed {seed} {name}: {row}")
    seconds = {name: sum(r["seconds"] for r in rows) for name, rows in runs.items()}
    accuracy = {name: statistics.mean(r["accuracy"] for r in runs[name])
                for name in ("ours", "textbrewer")}
    diffs = [o["accuracy"] - t["accuracy"] for o, t in zip(runs["ours"], runs["textbrewer"])]
    result = {
        "setup": {"teacher": "MiniLM-L6 tuned on Rotten Tomatoes (recipes/minilm-rotten-"
                             "tomatoes.yaml stage 0)", "student_layers": LAYERS,
                  "epochs": EPOCHS, "batch": BATCH, "train_examples": len(data.train),
                  "steps_per_epoch": len(data.loader(0)), "test_examples": len(data.test.labels),
                  "seeds": args.seeds, "textbrewer": textbrewer.__version__,
                  "ours_stage": default_distill(seed="<seed>")},
        "runs": runs,
        "speedup": round(seconds["textbrewer"] / seconds["ours"], 3),
        "bf16_floor_speedup": round(seconds["bare_bf16"] / sum(
            r["seconds"] for r in runs["ours"][:len(runs["bare_bf16"])]), 3),
        "accuracy_mean": {k: round(v, 4) for k, v in accuracy.items()},
        "acc_delta": round(statistics.mean(diffs), 4),
        "acc_delta_per_seed": [round(d, 4) for d in diffs],
        "acc_delta_sd": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None,
    }
    console.print({k: result[k] for k in ("speedup", "bf16_floor_speedup", "accuracy_mean",
                                          "acc_delta")})
    console.print(f"wrote {write_result(args.json, result)}")


if __name__ == "__main__":
    main()
