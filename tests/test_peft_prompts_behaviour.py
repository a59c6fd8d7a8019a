"""Prompt-learning methods on their own: initialisation (text, vocabulary samples), training
touches only the prompt and the saved modules, save -> load is exact (collapsed encoders give
the same outputs), p_tuning_v2 keeps its name, and misfits fail with clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file

import peft_methods as pm
from peft_methods.base import PeftMethodError
from peft_methods.prompt_tuning import PromptTable
from tiny_models import VOCAB, apply, build, inputs, labels_for

M = 4
METHODS = {"prompt_tuning": {}, "p_tuning": {"encoder_reparameterization_type": "LSTM"},
           "prefix_tuning": {}, "p_tuning_v2": {}}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WordPiece tokenizer over the tiny models' 100 ids: `w7` is id 7, [CLS] 2, [SEP] 3."""
    from transformers import BertTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(len(SPECIAL), VOCAB)]
    path = tmp_path_factory.mktemp("tok")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    return path


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs(family)).logits


# -------------------------------------------------------------------------------------------
# initialisation


@pytest.mark.parametrize(("m", "ids"), [(12, [2, 7, 8, 9, 3, 2, 7, 8, 9, 3, 2, 7]),
                                        (3, [2, 7, 8])])
def test_text_init_repeats_or_cuts_the_text_like_peft(m: int, ids: list[int],
                                                      tokenizer_dir: Path) -> None:
    options = {"num_virtual_tokens": m, "prompt_tuning_init": "TEXT",
               "prompt_tuning_init_text": "w7 w8 w9",
               "tokenizer_name_or_path": str(tokenizer_dir)}
    adapted = apply(build("gpt2"), "prompt_tuning", **options)
    words = adapted.model.get_input_embeddings().weight
    table = adapted.extra["prompt_encoder"].embedding.weight
    torch.testing.assert_close(table, words[ids], rtol=0, atol=0)
    reference = peft.get_peft_model(build("gpt2"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", **options))
    torch.testing.assert_close(table, reference.prompt_encoder["default"].embedding.weight)


def test_text_init_fills_both_submodules_of_t5(tokenizer_dir: Path) -> None:
    adapted = apply(build("t5"), "prompt_tuning", num_virtual_tokens=3,
                    prompt_tuning_init="TEXT", prompt_tuning_init_text="w7 w8",
                    tokenizer_name_or_path=str(tokenizer_dir))
    words = adapted.model.get_input_embeddings().weight
    torch.testing.assert_close(adapted.extra["prompt_encoder"].embedding.weight,
                               words[[2, 7, 8, 3, 2, 7]], rtol=0, atol=0)


def test_text_init_adapter_loads_without_the_tokenizer(tokenizer_dir: Path,
                                                       tmp_path: Path) -> None:
    import shutil

    local = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, local)
    adapted = apply(build("bert"), "prompt_tuning", num_virtual_tokens=M,
                    prompt_tuning_init="TEXT", prompt_tuning_init_text="w7",
                    tokenizer_name_or_path=str(local))
    pm.save_adapter(adapted, tmp_path / "a")
    shutil.rmtree(local)  # a saved prompt is the table itself; no text init on load
    loaded = pm.load_adapter(build("bert"), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, "bert"), logits(adapted, "bert"))


def test_sample_vocab_init_takes_vocabulary_rows() -> None:
    adapted = apply(build("llama"), "prompt_tuning", num_virtual_tokens=M,
                    prompt_tuning_init="SAMPLE_VOCAB")
    words = adapted.model.get_input_embeddings().weight
    for row in adapted.extra["prompt_encoder"].embedding.weight:
        assert (words == row).all(dim=1).any()


# -------------------------------------------------------------------------------------------
# training, saving, loading


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_only_prompt_and_saved_modules_train(method: str, family: str) -> None:
    torch.manual_seed(0)
    adapted = apply(build(family), method, num_virtual_tokens=M, **METHODS[method])
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    own = ("extra.prompt_encoder.",) + tuple(f"model.{n}." for n in adapted.modules_to_save)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(own) for n in trainable)
    batch = inputs(family) | {"labels": labels_for(family, inputs(family))}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    adapted.train()
    losses = []
    for _ in range(8):
        loss = adapted(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # everything it trains moved, nothing else did
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_save_load_round_trip_is_exact(method: str, family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapted = apply(build(family), method, num_virtual_tokens=M, **METHODS[method])
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_adapter(adapted, tmp_path / "a")
    loaded = pm.load_adapter(build(family), tmp_path / "a")
    assert loaded.method.name == method  # p_tuning_v2 too (our `distill_method` key)
    assert isinstance(loaded.extra["prompt_encoder"], PromptTable)  # the collapsed prompt
    torch.testing.assert_close(logits(loaded, family), logits(adapted, family))
    first, again = pm.adapter_state_dict(adapted), pm.adapter_state_dict(loaded)
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key


def test_prefix_projection_collapses_to_its_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapted = apply(build("gpt2"), "prefix_tuning", num_virtual_tokens=M,
                    encoder_hidden_size=8)
    encoder = adapted.extra["prompt_encoder"]
    assert encoder.transform[0].out_features == 8
    with torch.no_grad():
        expected = encoder.transform(encoder.embedding.weight)  # [m, L·2·d]
    table = pm.adapter_state_dict(adapted)["prompt_embeddings"]
    assert table.shape == (M, 2 * 2 * 32)
    torch.testing.assert_close(table, expected)
    pm.save_adapter(adapted, tmp_path / "a")
    loaded = pm.load_adapter(build("gpt2"), tmp_path / "a")
    assert sum(p.numel() for p in loaded.extra.parameters()) == table.numel()
    torch.testing.assert_close(logits(loaded, "gpt2"), logits(adapted, "gpt2"))


def test_zero_init_prefixes_are_zero() -> None:
    for projection in (True, False):
        adapted = apply(build("gpt2"), "prefix_tuning", num_virtual_tokens=M,
                        prefix_projection=projection, init_weights="zero")
        assert not pm.adapter_state_dict(adapted)["prompt_embeddings"].any()


def test_p_tuning_v2_loads_in_peft_as_prefix_tuning(tmp_path: Path) -> None:
    adapted = apply(build("llama"), "p_tuning_v2", num_virtual_tokens=M)
    pm.save_adapter(adapted, tmp_path / "a")
    assert pm.read_adapter_config(tmp_path / "a")["distill_method"] == "p_tuning_v2"
    with pytest.warns(UserWarning, match="distill_method"):
        loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, "llama"), logits(adapted, "llama"))


def test_prompts_change_outputs_and_mask_grows() -> None:
    base = logits(build("gpt2"), "gpt2")
    adapted = apply(build("gpt2"), "prompt_tuning", num_virtual_tokens=M)
    out = logits(adapted, "gpt2")
    assert out.shape[1] == base.shape[1] + M  # the virtual tokens are in the sequence
    assert not torch.allclose(out[:, M:], base)


def test_prefix_position_ids_continue_after_the_prefix() -> None:
    """Given positions 0..n-1, prefix tuning shifts them by m, which is where the model puts
    the tokens itself (the cache holds m entries), so both calls agree."""
    adapted = apply(build("gpt2"), "prefix_tuning", num_virtual_tokens=M).eval()
    batch = inputs("gpt2")
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch, position_ids=positions).logits,
                                   adapted(**batch).logits)


def test_prompt_tuning_ignores_position_ids_with_a_warning() -> None:
    adapted = apply(build("gpt2"), "prompt_tuning", num_virtual_tokens=M).eval()
    batch = inputs("gpt2")
    with pytest.warns(UserWarning, match="position_ids"), torch.no_grad():
        out = adapted(**batch, position_ids=torch.zeros_like(batch["input_ids"])).logits
    torch.testing.assert_close(out, logits(adapted, "gpt2"))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generation_equals_greedy_without_cache(method: str, family: str) -> None:
    """generate() (prompt or prefixes in the KV cache, one new token per step) picks the same
    tokens as re-running the adapted forward over the whole sequence each step, on a
    left-padded batch with generate's position ids. Independent of PEFT, so it also holds
    the transformers versions PEFT does not follow (test_peft_prompts.py)."""
    adapted = apply(build(family), method, num_virtual_tokens=M, **METHODS[method]).eval()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:  # off the (zero or near-zero) initial prompts
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ids = inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # right-padding / position-id notices
        cached = adapted.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                  do_sample=False)
        for _ in range(6):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate makes them
            logits = adapted(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(cached, ids)


def test_generate_without_attention_mask() -> None:
    adapted = apply(build("llama"), "p_tuning_v2", num_virtual_tokens=M).eval()
    ids = inputs("llama")["input_ids"][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = adapted.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, :ids.shape[1]], ids)


# -------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize(("method", "options", "message"), [
    ("prompt_tuning", {"num_virtual_tokens": 0}, "Unsupported `num_virtual_tokens` 0"),
    ("prompt_tuning", {"prompt_tuning_init": "WORDS"},
     "Unsupported `prompt_tuning_init` 'WORDS'. Supported values are 'RANDOM', 'TEXT'"),
    ("prompt_tuning", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"},
     "needs `tokenizer_name_or_path`"),
    ("prompt_tuning", {"tokenizer_kwargs": {"use_fast": True}}, "only used with"),
    ("prompt_tuning", {"task_type": "TOKEN_CLS"}, "Unsupported `task_type` 'TOKEN_CLS'"),
    ("p_tuning", {"encoder_reparameterization_type": "GRU"},
     "Unsupported `encoder_reparameterization_type` 'GRU'. Supported values are 'MLP', 'LSTM'"),
    ("p_tuning", {"encoder_num_layers": 3}, "LSTM encoder only"),
    ("p_tuning", {"encoder_dropout": 1.5}, "Unsupported `encoder_dropout` 1.5"),
    ("prefix_tuning", {"init_weights": "ones"}, "Unsupported `init_weights` 'ones'"),
    ("prefix_tuning", {"num_transformer_submodules": 3},
     "Unsupported `num_transformer_submodules` 3"),
    ("prefix_tuning", {"num_virtual_token": 3}, "did you mean 'num_virtual_tokens'"),
    ("p_tuning_v2", {"prefix_projection": True}, "no reparameterisation"),
])
def test_bad_options_are_named(method: str, options: dict, message: str) -> None:
    with pytest.raises(PeftMethodError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply(build("gpt2"), method, **options)


def test_prefix_needs_a_kv_cache() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64, num_labels=2))
    with pytest.raises(PeftMethodError, match="takes no KV cache.*prompt_tuning"):
        apply(model, "prefix_tuning")
    adapted = apply(model, "prompt_tuning", num_virtual_tokens=M)  # embeddings still fit
    assert adapted(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)


def test_unsupported_task_and_generate_on_a_classifier() -> None:
    from transformers import BertForTokenClassification

    with pytest.raises(PeftMethodError, match="supports task types.*TOKEN_CLS"):
        apply(BertForTokenClassification(build("bert").config), "p_tuning")
    adapted = apply(build("bert"), "prompt_tuning", num_virtual_tokens=M)
    with pytest.raises(PeftMethodError, match="generate\\(\\) needs task type"):
        adapted.generate(input_ids=inputs("bert")["input_ids"])


@pytest.mark.parametrize("name", ["cache", "past_key_values"])  # transformers >= 5.24 / before
def test_prefix_refuses_own_cache_and_gradient_checkpointing(name: str) -> None:
    from transformers import DynamicCache

    adapted = apply(build("gpt2"), "prefix_tuning", num_virtual_tokens=M)
    with pytest.raises(PeftMethodError, match="do not pass your own"):
        adapted(**inputs("gpt2"), **{name: DynamicCache()})
    model = build("gpt2")
    model.activation_checkpointing_enable()
    with pytest.raises(PeftMethodError, match="gradient checkpointing"):
        apply(model, "p_tuning_v2")


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    pm.save_adapter(apply(build("gpt2"), "prefix_tuning", num_virtual_tokens=M), tmp_path / "a")
    with pytest.raises(PeftMethodError, match="shape .* another model"):
        pm.load_adapter(build("llama"), tmp_path / "a")  # Llama's KV prefix is narrower
    save_file({"wrong": torch.zeros(2)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(PeftMethodError, match="no `prompt_embeddings`"):
        pm.load_adapter(build("gpt2"), tmp_path / "a")


def test_t5_prefix_needs_one_prefix_per_decoder_layer() -> None:
    from transformers import T5ForConditionalGeneration

    config = build("t5").config
    config.num_decoder_layers = 3
    with pytest.raises(PeftMethodError, match="decoder has 3 layers.*num_layers=3"):
        apply(T5ForConditionalGeneration(config), "prefix_tuning")
    adapted = apply(T5ForConditionalGeneration(config), "prefix_tuning", num_layers=3,
                    num_virtual_tokens=M)
    assert logits(adapted, "t5").shape == (2, 5, VOCAB)
