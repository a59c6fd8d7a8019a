"""Causal language models through every stage of a recipe (the `causal-lm` task).

Tiny random Llama, Qwen2 and GPT-2 models with a word-level tokenizer, on a corpus of 20
documents drawn from a small Markov chain (so there is something to learn): finetune ->
distill (top-k cached KD) -> shrink with heal -> evaluate; the report's metric is perplexity
and retention is teacher ppl / student ppl.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill.config.loading import recipe_from_dict
from distill.errors import DistillError
from distill.run.pipeline import run_recipe

WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof and then it was "
         "red blue green big small quick slow happy sad").split()
FAMILIES = ("llama", "qwen2", "gpt2")


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS, ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   eos_token="</s>")


def write_corpus(folder: Path, documents: int = 20, seed: int = 0) -> Path:
    """Documents from a Markov chain in which each word has 3 likely successors."""
    rng = random.Random(seed)
    successors = {w: rng.sample(WORDS, 3) for w in WORDS}
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        word, words = rng.choice(WORDS), []
        for _ in range(300):
            words.append(word)
            word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(WORDS)
        (folder / f"doc{d:02d}.txt").write_text(" ".join(words) + " .\n", encoding="utf-8")
    return folder


def write_tiny_lm(path: Path, family: str, layers: int = 4, seed: int = 0) -> Path:
    """A random causal LM of `family` with the word tokenizer, saved in HF format."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, \
        Qwen2Config, Qwen2ForCausalLM

    tok = word_tokenizer()
    # An embedding table padded past the tokenizer, as many checkpoints have (and some
    # tokenizer classes add a token of their own when they load).
    vocab = len(tok) + 8
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers,
                                           n_head=4, n_positions=128))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def lm_recipe(model: Path, corpus: Path, **stage_overrides: dict) -> dict:
    # fp32 pinned: runs compared with each other must not each time bf16 (`auto`) on their own
    heal = {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3, "log_every": 2, "bf16": False,
            "loss": {"alpha": 0.2, "temperature": 1.0, "top_k": 8}}
    return {
        "name": "lm", "seed": 0,
        "teacher": {"model": str(model)},  # the task is inferred: a *ForCausalLM checkpoint
        "data": {"dataset": str(corpus), "max_length": 32},
        "stages": [
            {"kind": "finetune", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
             "log_every": 2, "bf16": False},
            {"kind": "distill", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
             "log_every": 2, "bf16": False, "student": {"layers": [0, 1, 3]},
             "loss": {"alpha": 0.2, "temperature": 1.0, "top_k": 8}},
            {"kind": "shrink", "schedule": [{"layers": 2}, {"layers": 1}],
             "calibration_examples": 16, "heal": heal},
            {"kind": "evaluate", "latency_runs": 1},
        ],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_on_a_causal_lm(family: str, corpus: Path, tmp_path: Path) -> None:
    model = write_tiny_lm(tmp_path / "teacher", family)
    report = run_recipe(recipe_from_dict(lm_recipe(model, corpus)), output=tmp_path / "run")
    assert report["task"] == "causal-lm"
    teacher = report["teacher"]
    assert teacher["metric"]["name"] == "perplexity"
    # Fine-tuning on the corpus took the random model far below a uniform guess (31; the
    # GPT-2 teacher ends at 15.4-16.0 over seeds and batch orders).
    assert teacher["metric"]["value"] < 0.6 * len(word_tokenizer())
    final = report["final"]
    assert final["retention"] == pytest.approx(teacher["metric"]["value"]
                                               / final["metric"]["value"])
    assert math.isfinite(final["metric"]["value"]) and final["latency_ms"]["batch32"] > 0
    assert final["generation"]["tokens_per_s"] > 0 and len(final["samples"]) == 3
    assert "## Greedy samples" in (tmp_path / "run/report.md").read_text()
    distill = json.loads((tmp_path / "run/stages/01-distill/metrics.json").read_text())
    assert distill["teacher_cache"]["kind"] == "top-k" and distill["teacher_cache"]["k"] == 8
    assert distill["teacher_cache"]["bytes_per_token"] == pytest.approx(8 * 8 + 4, rel=0.2)
    assert "best_validation_perplexity" in distill
    shrink = json.loads((tmp_path / "run/stages/02-shrink/metrics.json").read_text())
    assert [s["layers"] for s in shrink["steps"]] == [2, 1]
    for step in shrink["steps"]:
        assert 1 < step["validation_before_heal"] < float("inf")
        assert 1 < step["best_validation_perplexity"] < float("inf")
    # Every saved model reloads with plain transformers and generates.
    last = tmp_path / "run" / report["stages"][2]["artifact"]
    lm = AutoModelForCausalLM.from_pretrained(last)
    tok = AutoTokenizer.from_pretrained(last)
    prompt = tok("the cat", return_tensors="pt")
    out = lm.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert lm.config.num_hidden_layers == 1


def test_shrink_after_distill_reads_the_cache_and_never_loads_the_teacher(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's top-k cache is written once (by the distill stage, which loads the teacher to
    cut the student from it) and read by every heal step of the shrink stage, which then never
    loads the teacher at all."""
    import distill.stages.training as stage

    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = recipe["stages"][1:3]  # distill, shrink: the same teacher, k and T
    # The first cut heals half as long as the stage's heal (a per-step `heal_epochs`).
    recipe["stages"][1]["schedule"] = [{"layers": 2, "heal_epochs": 0.5}, {"layers": 1}]
    loads: list[str] = []
    real = stage.load_frozen_teacher
    monkeypatch.setattr(stage, "load_frozen_teacher",
                        lambda ctx, *a: loads.append(ctx.teacher_source) or real(ctx, *a))
    run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert len(loads) == 1  # the distill stage's
    distill = json.loads((tmp_path / "run/stages/00-distill/metrics.json").read_text())
    assert distill["teacher_loaded"]
    steps = json.loads((tmp_path / "run/stages/01-shrink/metrics.json").read_text())["steps"]
    for step in steps:
        assert step["teacher_cache"]["kind"] == "top-k" and step["teacher_loaded"] is False
    assert [s["name"] for s in steps] == ["0-layers2", "1-layers1"]
    assert [s["heal_epochs"] for s in steps] == [0.5, 1]
    assert steps[0]["steps"] == math.ceil(steps[1]["steps"] / 2)
    assert steps[0]["target"] == {"layers": 2}
    shards = list((tmp_path / "run/teacher_cache").glob("shard-*.safetensors"))
    assert shards and (tmp_path / "run/teacher_cache/manifest.json").is_file()


def test_task_is_inferred_and_a_mismatch_is_refused(corpus: Path, tmp_path: Path,
                                                    tiny_teacher: Path, tiny_csv: Path) -> None:
    recipe = lm_recipe(write_tiny_lm(tmp_path / "lm", "gpt2"), corpus)
    recipe["stages"] = [{"kind": "evaluate", "latency": False}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert report["task"] == "causal-lm" and report["teacher"]["metric"]["name"] == "perplexity"
    bad = {"name": "x", "teacher": {"model": str(tiny_teacher), "task": "causal-lm"},
           "data": {"dataset": str(corpus)}, "stages": [{"kind": "evaluate"}]}
    with pytest.raises(DistillError, match="saved as a sequence-classification model"):
        run_recipe(recipe_from_dict(bad), output=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_lora_distill_and_heal_merge_into_a_plain_student(corpus: Path, tmp_path: Path) -> None:
    """`method: lora` on distill and heal: few weights train, and the saved student is the
    plain architecture with the adapter merged in (no LoRA tensors, reloads with plain
    transformers)."""
    from safetensors import safe_open

    model = write_tiny_lm(tmp_path / "teacher", "qwen2")
    recipe = lm_recipe(model, corpus)
    lora = {"method": "lora", "config": {"r": 4, "lora_alpha": 8,
                                         "target_modules": "all-linear"}}
    recipe["stages"] = [recipe["stages"][1] | lora,
                        recipe["stages"][2] | {"schedule": [{"layers": 2}],
                                               "heal": recipe["stages"][2]["heal"] | lora},
                        {"kind": "evaluate", "latency": False}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    for artifact in ("stages/00-distill/model", "stages/01-shrink/steps/0-layers2/model"):
        with safe_open(str(tmp_path / "run" / artifact / "model.safetensors"), "pt") as fh:
            assert not [k for k in fh.keys() if "lora" in k]
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / artifact)
    distill = json.loads((tmp_path / "run/stages/00-distill/metrics.json").read_text())
    assert distill["method"] == "lora" and distill["teacher_cache"]["kind"] == "top-k"
    assert math.isfinite(report["final"]["metric"]["value"])


def test_adapt_distills_from_the_run_teacher_while_it_adapts(corpus: Path,
                                                            tmp_path: Path) -> None:
    model = write_tiny_lm(tmp_path / "teacher", "gpt2")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = [recipe["stages"][1],
                        {"kind": "adapt", "method": "lora", "epochs": 1, "batch_size": 8,
                         "config": {"r": 4, "target_modules": "all-linear"},
                         "loss": {"alpha": 0.5, "temperature": 1.0, "top_k": 8}}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    metrics = json.loads((tmp_path / "run/stages/01-adapt/metrics.json").read_text())
    assert metrics["teacher"] == str(model) and metrics["loss"]["alpha"] == 0.5
    # The distill stage's top-k is reused: same teacher, data, k and T.
    assert metrics["teacher_cache"]["kind"] == "top-k" and not metrics["teacher_loaded"]
    assert report["final"]["metric"]["name"] == "perplexity"
    logs = [json.loads(line) for line in
            (tmp_path / "run/stages/01-adapt/log.jsonl").read_text().splitlines()]
    assert any("loss_kd" in rec for rec in logs if rec["type"] == "train")


def test_a_method_that_cannot_merge_is_refused_for_heal() -> None:
    from distill.errors import RecipeError

    with pytest.raises(RecipeError, match="houlsby cannot be merged.*allowed: full"):
        recipe_from_dict({"stages": [{"kind": "shrink", "schedule": [{"layers": 2}],
                                      "heal": {"method": "houlsby"}}]})


@pytest.mark.parametrize("method,config", [("prefix_tuning", {"num_virtual_tokens": 4}),
                                           ("houlsby", {"reduction_factor": 4})])
def test_distill_keeps_a_method_that_cannot_merge_as_an_adapter(
        method: str, config: dict, corpus: Path, tmp_path: Path) -> None:
    import peft_methods
    from distill.tasks import get_task

    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = [recipe["stages"][1] | {"method": method, "config": config}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    stage = tmp_path / "run" / "stages" / "00-distill"
    record = report["stages"][0]["model"]
    assert report["stages"][0]["artifact"].endswith("adapter")
    assert record["method"] == method and 0 < record["trainable_params"] < record["params"]
    # The base is the student as it was cut: the teacher's layers [0, 1, 3], untouched.
    base, _ = get_task("causal-lm").load_model(str(stage / "model"), None)
    teacher, _ = get_task("causal-lm").load_model(str(model), None)
    assert torch.equal(base.model.layers[2].mlp.up_proj.weight,
                       teacher.model.layers[3].mlp.up_proj.weight)
    config_file = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert config_file["base_model_name_or_path"] == str(stage / "model")
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    plain = base(input_ids=ids).logits
    adapted = peft_methods.load_adapter(base, stage / "adapter")  # wraps base in place
    assert not torch.allclose(adapted(input_ids=ids).logits, plain)


def test_eval_command_on_a_causal_lm(corpus: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distill.cli import app

    model = write_tiny_lm(tmp_path / "lm", "llama")
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(corpus),
                                      "--max-length", "32", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "tokens" in result.output
    # Data of the wrong kind for the task: one clear line, exit code 2.
    bad = CliRunner().invoke(app, ["eval", str(model), "--data", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "text source not found" in bad.output


def test_eval_command_reads_one_split_of_a_dataset(corpus: Path, tmp_path: Path) -> None:
    """`--data-split` (a recipe's `data.split`): only that split is read, and train,
    validation and test are carved from it; a split the dataset lacks is named as typed."""
    import datasets
    from typer.testing import CliRunner

    from distill.cli import app

    documents = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents}),
                          "test": datasets.Dataset.from_dict({"text": ["too short"]})}
                         ).save_to_disk(tmp_path / "saved")
    model = write_tiny_lm(tmp_path / "lm", "llama")
    args = ["eval", str(model), "--data", str(tmp_path / "saved"), "--max-length", "32",
            "--no-latency"]
    # Its own test split (one line) holds no block of 32 tokens to score; carved from train,
    # the test documents do.
    whole = CliRunner().invoke(app, args)
    assert whole.exit_code == 2 and "fewer than one block of 32 (--max-length)" in whole.output
    result = CliRunner().invoke(app, [*args, "--data-split", "train"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    bad = CliRunner().invoke(app, [*args, "--data-split", "dev"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "--data-split: 'dev' is not a split" in bad.output


def test_evaluate_scores_every_model_on_each_eval_data_too(corpus: Path, tmp_path: Path) -> None:
    """`eval_data`: a second corpus (here another Markov chain, which healing never saw),
    scored for every model with its own retention."""
    other = write_corpus(tmp_path / "other", seed=7)
    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = [recipe["stages"][1],
                        {"kind": "evaluate", "latency": False,
                         "eval_data": [{"dataset": str(other), "max_length": 32,
                                        "max_eval_examples": 8}]}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    for rec in (report["teacher"], report["final"]):
        [scored] = rec["eval_data"]
        assert scored["dataset"] == str(other) and scored["perplexity"] > 1
    student = report["final"]["eval_data"][0]
    teacher = report["teacher"]["eval_data"][0]
    assert student["retention"] == pytest.approx(teacher["perplexity"] / student["perplexity"])
    # The models table shows it too: "value (retention)" under the dataset's name.
    table = (tmp_path / "run" / "report.md").read_text()
    assert "| perplexity on other |" in table
    assert f"{student['perplexity']:.4f} ({100 * student['retention']:.1f}%)" in table
    bad = recipe | {"stages": [{"kind": "evaluate", "eval_data": [
        {"dataset": str(tmp_path / "missing")}]}]}
    with pytest.raises(DistillError, match=r"stages.0.eval_data.0: text source not found"):
        run_recipe(recipe_from_dict(bad), output=tmp_path / "bad")


def test_bbc_news_is_a_text_corpus_for_language_models() -> None:
    from distill.data.text import BBC_NEWS, load_lm_text

    text = load_lm_text(BBC_NEWS)
    assert text.sizes() == {"train": 1781, "validation": 222, "test": 222}
    assert all(doc.strip() for doc in text.test)


# ----------------------------------------------------------------------------- bad input
def _other_tokenizer_lm(path: Path) -> Path:
    """A tiny GPT-2 whose tokenizer has one more word than the run's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    write_tiny_lm(path, "gpt2")
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS, ".", ",", "extra"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)
    return path


LM_BAD_INPUT = [
    ("text folder missing", "text source not found",
     lambda r, t: r["data"].update(dataset=str(t / "nowhere"))),
    ("too few documents", "too few to hold out 10 %",
     lambda r, t: r["data"].update(dataset=str(write_corpus(t / "few", documents=5)))),
    ("top_k past the vocabulary", "stages.1.loss.top_k: 5000 is more than the",
     lambda r, t: r["stages"][1]["loss"].update(top_k=5000)),
    ("unknown divergence", "stages.1.loss.divergence",
     lambda r, t: r["stages"][1]["loss"].update(divergence="kl")),
    ("a method that cannot merge on heal", "houlsby cannot be merged",
     lambda r, t: r["stages"][2]["heal"].update(method="houlsby")),
    ("eval_data missing", "stages.3.eval_data.0: text source not found",
     lambda r, t: r["stages"][3].update(eval_data=[{"dataset": str(t / "none")}])),
    ("conversations in a text mixture", "a list mixes text corpora only",
     lambda r, t: r["data"].update(dataset=[r["data"]["dataset"], "builtin:chatterbot"])),
    ("chat record of neither form", "record 1: expected",
     lambda r, t: r["stages"].__setitem__(2, {
         "kind": "adapt", "data": {"dataset": str(_bad_chat(t))}})),
    ("adapt teacher with another tokenizer", "tokenizer mismatch",
     lambda r, t: r["stages"].__setitem__(2, {
         "kind": "adapt", "teacher": str(_other_tokenizer_lm(t / "other")),
         "loss": {"alpha": 0.5}})),
]


def _bad_chat(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    return path


@pytest.mark.parametrize("what,needle,patch", LM_BAD_INPUT, ids=[c[0] for c in LM_BAD_INPUT])
def test_bad_language_model_input_is_one_clear_line(what: str, needle: str, patch,
                                                    corpus: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from distill.cli import app

    recipe = lm_recipe(write_tiny_lm(tmp_path / "teacher", "llama"), corpus)
    patch(recipe, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_dataset_list_on_a_classifier_is_refused(tiny_teacher: Path, tiny_csv: Path,
                                                   tmp_path: Path) -> None:
    from conftest import tiny_recipe

    recipe = tiny_recipe(tiny_teacher, tiny_csv)
    recipe["data"]["dataset"] = [str(tiny_csv), str(tiny_csv)]
    with pytest.raises(DistillError, match="a classifier trains on one dataset"):
        run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_top_k_on_a_classifier_is_refused(tiny_teacher: Path, tiny_csv: Path,
                                          tmp_path: Path) -> None:
    from conftest import tiny_recipe

    recipe = tiny_recipe(tiny_teacher, tiny_csv)
    recipe["stages"][1]["loss"]["top_k"] = 4
    with pytest.raises(DistillError, match="top_k: applies to token-level tasks"):
        run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")


def test_a_damaged_cache_shard_is_recomputed_never_used(corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the distill stage (which fills the cache) and the shrink stage (which reads it)
    one shard is damaged: the heal recomputes that shard with the teacher and ends bitwise
    where an undamaged run ends."""
    from safetensors.torch import load_file

    from distill.kd import topk_cache

    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = lm_recipe(model, corpus)
    recipe["stages"] = recipe["stages"][1:3]
    recipe["stages"][1]["schedule"] = [{"layers": 2}]
    clean = tmp_path / "clean"
    run_recipe(recipe_from_dict(recipe), output=clean)

    calls = {"n": 0}
    real = topk_cache.load_or_compute

    def damaging(folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the shrink stage's read: flip bytes in the first shard
            shard = sorted(Path(folder).glob("shard-*.safetensors"))[0]
            data = bytearray(shard.read_bytes())
            data[-8:] = bytes(8)
            shard.write_bytes(bytes(data))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(topk_cache, "load_or_compute", damaging)
    damaged = tmp_path / "damaged"
    run_recipe(recipe_from_dict(recipe), output=damaged)
    step = json.loads((damaged / "stages/01-shrink/metrics.json").read_text())["steps"][0]
    assert step["teacher_loaded"]  # the shard was recomputed from the teacher
    name = "stages/01-shrink/steps/0-layers2/model/model.safetensors"
    a, b = load_file(str(clean / name)), load_file(str(damaged / name))
    assert all(torch.equal(a[k], b[k]) for k in a)
