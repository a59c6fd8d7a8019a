"""Instruction and chat data (distill/data/dialogues.py): sources, splits, response-only labels
with and without a chat template, and a recipe that adapts a causal LM on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.data.dialogues import (CHATTERBOT, IGNORE_INDEX, encode, load_dialogues, render,
                                    tokenize_dialogues)
from distill.errors import DistillError
from test_lm_recipes import word_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system",
             "hi", "hello", "how", "are", "you", "fine", "thanks", "bye", "what", "is", "2",
             "+", "4", "?", "!", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def test_chatterbot_conversations_split_by_whole_conversations() -> None:
    d = load_dialogues(CHATTERBOT)
    sizes = d.sizes()
    total = sum(sizes.values())
    assert total > 1000 and sizes["test"] == sizes["validation"] == int(0.1 * total)
    assert all(len(c) % 2 == 0 and c[0]["role"] == "user" and c[1]["role"] == "assistant"
               for c in d.train)
    assert load_dialogues(CHATTERBOT).test == d.test  # fixed by split_seed
    assert load_dialogues(CHATTERBOT, split_seed=1).test != d.test


def test_labels_fall_on_the_answers_only_with_a_chat_template() -> None:
    tok = chat_tokenizer()
    messages = [{"role": "user", "content": "how are you ?"},
                {"role": "assistant", "content": "fine thanks !"},
                {"role": "user", "content": "what is 2 + 2 ?"},
                {"role": "assistant", "content": "4 ."}]
    ids, labels = encode(messages, tok, max_length=256)
    assert tok.decode(ids) == tok.decode(tok(render(messages, tok, False),
                                             add_special_tokens=False)["input_ids"])
    learned = tok.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])
    # The answers and the template's end-of-turn after each; no user word, no role name.
    assert learned.split() == ["fine", "thanks", "!", "<|im_end|>", "4", ".", "<|im_end|>"]
    assert all(y in (IGNORE_INDEX, i) for i, y in zip(ids, labels))
    cut, cut_labels = encode(messages, tok, max_length=10)
    assert len(cut) == len(cut_labels) == 10


def test_conversations_open_with_the_tokens_the_tokenizer_puts_in_front() -> None:
    from tokenizers import processors

    tok = chat_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    plain, _ = encode([{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}], tok, max_length=64)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", tok.eos_token_id)])
    ids, labels = encode([{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}], tok, max_length=64)
    assert ids == [tok.eos_token_id] + plain and labels[0] == IGNORE_INDEX
    assert plain[0] == start  # the template's own first token follows it


def test_plain_format_without_a_template_and_the_eos_is_learned() -> None:
    tok = word_tokenizer()
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    ids, labels = encode(messages, tok, max_length=64)
    assert [tok.convert_ids_to_tokens(i) for i, y in zip(ids, labels) if y != IGNORE_INDEX] \
        == ["sat", "</s>"]


def test_instruction_and_chat_records(tmp_path: Path) -> None:
    rows = [{"instruction": "say hi", "input": "politely", "output": "hello"}] * 6 + \
        [{"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}]}] * 6
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_dialogues(str(path))
    assert sum(d.sizes().values()) == 12
    first = next(c for c in d.train + d.test + d.validation if len(c) == 2)
    assert first[0]["content"] == "say hi\n\npolitely"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DistillError, match="bad.jsonl record 1: expected"):
        load_dialogues(str(bad))
    with pytest.raises(DistillError, match="no conversation has an answer within"):
        tokenize_dialogues(load_dialogues(str(path)).train, word_tokenizer(), 1)


def test_a_recipe_adapts_a_causal_lm_on_conversations_with_kd(tmp_path: Path) -> None:
    """Instruction data as the adapt stage's own data: LoRA trained with KD from the run's
    teacher (live: conversations have no block shape to cache), perplexity on answers only."""
    from distill.config.loading import recipe_from_dict
    from distill.run.pipeline import run_recipe
    from test_lm_recipes import write_corpus, write_tiny_lm

    corpus = write_corpus(tmp_path / "docs")
    rows = [{"instruction": f"the {w} sat", "output": f"on the {w} ."}
            for w in ("cat", "dog", "bird", "mat", "tree", "roof") * 4]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in rows))
    model = write_tiny_lm(tmp_path / "lm", "llama")
    recipe = {"name": "chat", "teacher": {"model": str(model)},
              "data": {"dataset": str(corpus), "max_length": 32},
              "stages": [{"kind": "adapt", "method": "lora", "epochs": 2, "batch_size": 4,
                          "config": {"r": 4, "target_modules": "all-linear"},
                          "data": {"dataset": str(chat), "max_length": 32},
                          "loss": {"alpha": 0.5, "temperature": 1.0}}]}
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    metrics = json.loads((tmp_path / "run/stages/00-adapt/metrics.json").read_text())
    assert metrics["conversations"] == {"train": 20, "validation": 2, "test": 2}
    assert metrics["teacher_cache"] is None and metrics["teacher_loaded"]
    final = report["final"]
    assert final["metric"]["name"] == "perplexity"
    # 2 test conversations, answers of 4 words + the EOS: 5 targets each.
    assert final["tokens"] == 2 * 5


def test_attach_command_trains_lora_on_a_causal_lm_with_chat_data(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distill.cli import app
    from test_lm_recipes import write_tiny_lm

    rows = [{"messages": [{"role": "user", "content": f"the {w}"},
                          {"role": "assistant", "content": f"{w} sat ."}]}
            for w in ("cat", "dog", "bird", "mat", "tree") * 4]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(rows))
    model = write_tiny_lm(tmp_path / "lm", "qwen2")
    result = CliRunner().invoke(app, [
        "attach", str(model), "--data", str(chat), "--max-length", "32", "--epochs", "1",
        "--batch-size", "4", "-O", "r=4", "-O", "target_modules=all-linear",
        "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "test perplexity" in result.output
    assert (tmp_path / "run/stages/00-adapt/adapter/adapter_config.json").is_file()
    config = json.loads((tmp_path / "run/stages/00-adapt/adapter/adapter_config.json")
                        .read_text())
    assert config["task_type"] == "CAUSAL_LM"
    # Hugging Face PEFT reads the adapter onto the plain model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model),
                                           tmp_path / "run/stages/00-adapt/adapter")
    assert sum("lora_" in n for n, _ in peft_model.named_parameters()) > 0
