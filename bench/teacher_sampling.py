"""Teacher sampling speed: `generate`'s own sampler vs the toolkit's (same blocks, one run).

`data.teacher_samples` generates blocks from the teacher under bf16 autocast. The baseline is
what the toolkit did before: `generate(do_sample=True)` on the frozen teacher, 50 sequences at
once, whose weights autocast casts again at every decoding step (it caches casts only of
weights that require grad) and whose `torch.multinomial` draws an exponential variate per
vocabulary entry. The toolkit's `teacher_samples.sample` casts each weight once per batch
(`cast_once`), draws by inverse CDF (`InverseCdfDraw`) and samples up to 150 sequences at once
(`batch_size`). Both sample the real SmolLM2-135M teacher, alternating arms; the record has
tokens per second of each and the ratio.

    python bench/teacher_sampling.py          # -> bench/results/teacher_sampling.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill.kd import teacher_samples  # noqa: E402
from distill.models.loading import resolve_model_path  # noqa: E402
from provenance import RESULTS, write_result  # noqa: E402


@torch.no_grad()
def baseline(teacher: torch.nn.Module, start: int, count: int, length: int, eos: int
             ) -> torch.Tensor:
    """[count, length] ids sampled as the toolkit did before: `generate`'s sampler, seed 0."""
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=length, min_new_tokens=length, eos_token_id=eos,
                              pad_token_id=start)
    blocks = []
    for b, first in enumerate(range(0, count, 50)):  # 50 sequences at once, as it did
        ids = torch.full((min(50, count - first), 1), start)
        torch.manual_seed(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   generation_config=config)
        blocks.append(out[:, 1:1 + length])
    return torch.cat(blocks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=teacher_samples.MAX_BATCH,
                    help="blocks per timed sampling")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per arm (alternated)")
    ap.add_argument("--json", type=Path, default=RESULTS / "teacher_sampling.json")
    args = ap.parse_args()
    path = resolve_model_path("builtin:smollm2-135m")
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)  # as the run's frozen teacher
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = teacher_samples.start_token(tokenizer)
    arms = {"generate_multinomial": lambda: baseline(teacher, start, args.blocks, args.length,
                                                     tokenizer.eos_token_id),
            "toolkit": lambda: teacher_samples.sample(teacher, start, args.blocks, args.length,
                                                      seed=0, bf16=True,
                                                      pad=tokenizer.pad_token_id,
                                                      eos=tokenizer.eos_token_id)}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, run in arms.items():
            begin = time.perf_counter()
            ids = run()
            seconds[name].append(time.perf_counter() - begin)
            assert ids.shape == (args.blocks, args.length)
    tokens = args.blocks * args.length
    result: dict = {"teacher": "builtin:smollm2-135m", "blocks": args.blocks,
                    "length": args.length, "baseline_batch": 50,
                    "batch": teacher_samples.batch_size(teacher.config, args.length), "bf16": True,
                    "threads": torch.get_num_threads(), "repeats": args.repeats}
    for name, times in seconds.items():
        result[name] = {"seconds": [round(t, 1) for t in times],
                        "tokens_per_s": round(tokens / statistics.median(times), 1)}
    result["speedup"] = round(statistics.median(seconds["generate_multinomial"])
                              / statistics.median(seconds["toolkit"]), 2)
    write_result(args.json, result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
