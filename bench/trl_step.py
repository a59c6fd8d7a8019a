"""Our language-model distillation step against TRL's GKD trainer, same models and batches.

TRL's off-policy GKD (`trl.experimental.gkd.GKDTrainer`, `lmbda=0`: the dataset's tokens, no
generation; `beta=0`: forward KL(teacher ‖ student) over the full vocabulary at temperature 1,
the mean over the positions that have a next token) is exactly our token loss with `alpha=0`,
`temperature=1`, no top-k (`token_kd_loss`, `forward_kl`). TRL's `DistillationTrainer` always
generates its completions (on-policy), so it is not the same work and is not timed here.

The teacher is SmolLM2-135M (30 layers), the student its 20 evenly spaced layers (saved once,
every weight trains), the data `--blocks` Shakespeare training blocks of 128 tokens, batch 4,
float32, AdamW at 1e-4, gradient clipping at 1.0, the teacher run live on every batch (no
cache: TRL has none). Each side trains one epoch over the same blocks in a fresh process:
ours through the recipes' own `kd_train` (what a distill or heal stage runs), TRL's through
`GKDTrainer.train()`; each side's seconds are its training loop's (TRL: `on_train_begin` to
`on_train_end`, ours: the loop's own clock), model loading excluded. Rounds alternate the two,
each round swapping who goes first.
Both use PyTorch's fused AdamW (TRL's default `adamw_torch_fused`, ours on plain CPU weights).
TRL's activation checkpointing (on by default in its SFT-based configs) is turned off: it
recomputes the forward in the backward pass, work our loop does not do.

`step_ratio` = the median over rounds of our seconds per step / TRL's in the same round (the
two runs next to each other in time). This machine's speed drifts in phases of tens of seconds
to minutes (the same side's epoch took 4.68 to 5.29 s a step within one run): a ratio of the
best round of each can pair one side's fast phase with the other's slow one, which read 1.033
at a3283bf with 2 rounds (per round 1.040, 1.033; trl_step.json at 790d8b9) and 0.879 a few
minutes later with 3 rounds (per round 0.993, 0.979, 0.873; trl_step_3rounds.json). Hence 3
rounds, each round's ratio, and their median.

    HF_HUB_OFFLINE=1 python bench/trl_step.py [--blocks 32] [--rounds 3]
    # -> bench/results/trl_step.json (~4.5 min)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from provenance import RESULTS, write_result  # noqa: E402
from smollm_stages import TEACHER, context, prepare  # noqa: E402

LAYERS = 20
BATCH, LR, BLOCK = 4, 1e-4, 128


def ours(work: Path, blocks: int, name: str) -> dict:
    """One epoch of our distillation (live teacher, full-vocabulary forward KL, fp32)."""
    import torch

    from distill.config.recipe import HealConfig, LossConfig
    from distill.stages.training import frozen_teacher, kd_train

    torch.manual_seed(0)
    ctx = context(work, name, blocks, BLOCK)
    student, _ = ctx.task.load_model(str(work / "student"), ctx.data)
    student.requires_grad_(True)
    args = HealConfig(epochs=1, batch_size=BATCH, learning_rate=LR, bf16=False, warmup_ratio=0.0,
                      keep_best=False, checkpoint_every=None, log_every=1, seed=0)
    loss = LossConfig(alpha=0.0, temperature=1.0)  # top_k None: the whole vocabulary
    teacher = frozen_teacher(ctx)
    teacher.get()  # loaded before the clock starts, as TRL's is
    result, _ = kd_train(ctx, student, teacher, TEACHER, args, loss, cache_teacher=False,
                         cache_dir=work / "cache", log_path=work / name / "log.jsonl",
                         desc="ours")
    losses = [json.loads(x)["loss"] for x in (work / name / "log.jsonl").read_text().splitlines()]
    return {"steps": result.steps, "seconds": round(result.seconds, 2),
            "first_loss": round(losses[0], 5)}


def trl(work: Path, blocks: int, name: str) -> dict:
    """One epoch of TRL's GKDTrainer (off-policy, forward KL) on the same blocks."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.stages.training import frozen_teacher

    torch.manual_seed(0)
    ctx = context(work, name, blocks, BLOCK)
    train = ctx.tokenized("train")
    rows = {"input_ids": [list(map(int, r["input_ids"])) for r in train]}
    student, _ = ctx.task.load_model(str(work / "student"), ctx.data)
    student.requires_grad_(True)
    teacher = frozen_teacher(ctx).get()

    def collate(examples: list[dict]) -> dict:
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            clock["end"] = time.perf_counter()

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = GKDConfig(
        output_dir=str(work / name), lmbda=0.0, beta=0.0, seq_kd=False,
        per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_drop_last=False,
        max_length=BLOCK,
        # TRL's SFT-based configs checkpoint activations by default (a second forward in the
        # backward pass); off, so both sides do the same work (ours does not checkpoint).
        gradient_checkpointing=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         data_collator=collate, train_dataset=Dataset.from_dict(rows),
                         processing_class=ctx.tokenizer, callbacks=[Clock(), Losses()])
    out = trainer.train()
    return {"steps": out.global_step, "seconds": round(clock["end"] - clock["start"], 2),
            "first_loss": round(losses[0], 5) if losses else None,
            "optimizer": type(trainer.optimizer.optimizer
                              if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "trl_step.json")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # a child process's side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        row = (ours if args.side == "ours" else trl)(Path(args.work), args.blocks, args.name)
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(row))
        return 0
    import trl as trl_package

    # The work folder (prepared models, each side's run) is this script's own: gone at exit.
    with tempfile.TemporaryDirectory(prefix="trl-step-bench-") as tmp:
        work = Path(tmp)
        prepare(work, LAYERS)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            # Each round swaps who goes first (a machine that slows or speeds up over the run
            # favours neither).
            for side in ("ours", "trl")[::1 if r % 2 == 0 else -1]:
                out = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--work", str(work),
                     "--name", f"{side}-{r}", "--blocks", str(args.blocks)],
                    check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["seconds_per_step"] = round(row["seconds"] / row["steps"], 3)
                runs[side].append(row)
                print(side, json.dumps(row), flush=True)
    best = {side: min(r["seconds_per_step"] for r in rows) for side, rows in runs.items()}
    paired = [round(o["seconds_per_step"] / t["seconds_per_step"], 3)
              for o, t in zip(runs["ours"], runs["trl"])]
    result = {
        "teacher": TEACHER, "student_layers": LAYERS, "blocks": args.blocks,
        "block_tokens": BLOCK, "batch": BATCH, "precision": "fp32",
        "loss": "forward KL, full vocabulary, T = 1, alpha = 0 (TRL GKD: lmbda 0, beta 0)",
        "trl_version": trl_package.__version__, "runs": runs,
        "seconds_per_step": best,  # the best round of each side
        "best_round_ratio": round(best["ours"] / best["trl"], 3),
        "round_ratios": paired,
        "step_ratio": statistics.median(paired),
    }
    path = write_result(args.json, result)
    print(f"step_ratio {result['step_ratio']} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
