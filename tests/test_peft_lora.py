"""LoRA and LoRA+ against Hugging Face PEFT (the oracle) on tiny models of every family.

Oracle tests go both ways on the same base weights and non-trivial adapter weights (B ≠ 0):
ours → save → `peft.PeftModel.from_pretrained`, and `peft.get_peft_model` → save → our
`load_adapter`; the logits must agree.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_methods as pm
from peft_methods.lora import LoraLinear
from tiny_models import FAMILIES, VOCAB, apply, build, inputs, labels_for, logits

TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
# A new-task classifier saves its head and pooler (METHODS.md §3); PEFT needs them named.
TO_SAVE = {"bert": ["classifier", "pooler"]}


def randomize(model: torch.nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    """Non-trivial adapter weights (and task head / pooler) so that a tensor that is not
    saved or loaded shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or ".classifier." in f".{name}" or ".pooler." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_model(family: str, **options) -> PeftModel:
    config = LoraConfig(task_type=TASK[family], modules_to_save=TO_SAVE.get(family), **options)
    model = get_peft_model(build(family), config)
    randomize(model)
    return model.eval()


def ours(family: str, method: str = "lora", **options) -> pm.AdaptedModel:
    if family in TO_SAVE:
        options.setdefault("modules_to_save", TO_SAVE[family])
    model = apply(build(family), method, **options)
    randomize(model)
    return model.eval()


def lora_paths(model: torch.nn.Module) -> set[str]:
    """Module paths, relative to the Hugging Face model, of the layers carrying LoRA."""
    hf = model.get_base_model()  # both AdaptedModel and PeftModel have it
    return {n for n, m in hf.named_modules() if hasattr(m, "lora_A")}


# --------------------------------------------------------------------------------------------
# oracle: both directions


@pytest.mark.parametrize("family", FAMILIES)
def test_ours_saved_loads_in_peft(family: str, tmp_path) -> None:
    model = ours(family, r=4, lora_alpha=8)
    pm.save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(build(family), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, family), logits(model, family))
    assert logits(model, family).sub(logits(build(family), family)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_saved_loads_in_ours(family: str, tmp_path) -> None:
    theirs = peft_model(family, r=4, lora_alpha=16)
    theirs.save_pretrained(tmp_path / "p")
    model = pm.load_adapter(build(family), tmp_path / "p")
    assert model.method.name == "lora"
    torch.testing.assert_close(logits(model, family), logits(theirs, family))
    assert lora_paths(model) == lora_paths(theirs)


def test_default_targets_are_peft_defaults() -> None:
    for family in FAMILIES:
        assert lora_paths(ours(family)) == lora_paths(peft_model(family)), family


def test_rslora_scaling_matches_peft(tmp_path) -> None:
    model = ours("llama", r=4, lora_alpha=8, use_rslora=True)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    pm.save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["use_rslora"] is True
    torch.testing.assert_close(logits(theirs, "llama"), logits(model, "llama"))
    # and the other way: PEFT's rsLoRA adapter gives the same logits here
    peft_rs = peft_model("llama", r=4, lora_alpha=8, use_rslora=True)
    peft_rs.save_pretrained(tmp_path / "p")
    torch.testing.assert_close(logits(pm.load_adapter(build("llama"), tmp_path / "p"), "llama"),
                               logits(peft_rs, "llama"))


def test_plain_lora_config_is_clean_for_peft(tmp_path) -> None:
    """Every key we write is a LoraConfig field: PEFT loads it without its 'unexpected
    keyword' warning."""
    pm.save_adapter(ours("gpt2"), tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(build("gpt2"), tmp_path / "a")
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    config = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True  # Conv1D
    assert "distill_method" not in config


def test_unsupported_peft_option_is_refused(tmp_path) -> None:
    peft_model("llama", use_dora=True).save_pretrained(tmp_path / "p")
    with pytest.raises(pm.PeftMethodError, match="use_dora"):
        pm.load_adapter(build("llama"), tmp_path / "p")


# --------------------------------------------------------------------------------------------
# model contract


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family: str) -> None:
    for init in (True, "gaussian"):
        model = apply(build(family), "lora", init_lora_weights=init)
        torch.testing.assert_close(logits(model, family), logits(build(family), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(family: str) -> None:
    model = ours(family, target_modules="all-linear", lora_alpha=4)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    unmerged = logits(model, family)
    pm.merge(model)
    torch.testing.assert_close(logits(model, family), unmerged, rtol=1e-4, atol=1e-4)
    changed = [n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith("base_layer.weight") for n in changed)
    pm.unmerge(model)
    for n, p in model.model.named_parameters():
        torch.testing.assert_close(p, before[n])
    torch.testing.assert_close(logits(model, family), unmerged)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_selects_what_peft_selects(family: str) -> None:
    assert lora_paths(ours(family, target_modules="all-linear")) == \
        lora_paths(peft_model(family, target_modules="all-linear"))


def test_regex_and_names_select_like_peft() -> None:
    for target in (r".*\.(q_proj|o_proj)", ["gate_proj", "layers.1.self_attn.k_proj"]):
        assert lora_paths(ours("llama", target_modules=target)) == \
            lora_paths(peft_model("llama", target_modules=target)), target


def test_only_adapter_and_saved_modules_train() -> None:
    model = ours("bert")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = inputs("bert")
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels_for("bert", batch))
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    assert all(".lora_" in n or ".classifier." in n or ".pooler." in n for n in changed)
    report = pm.trainable_report(model)
    assert report["trainable_params"] == sum(p.numel() for p in model.parameters()
                                             if p.requires_grad)


# --------------------------------------------------------------------------------------------
# errors


def test_bad_target_names_close_names() -> None:
    with pytest.raises(pm.PeftMethodError, match=r"qury.*close names: .*query"):
        apply(build("bert"), "lora", target_modules=["qury"])
    with pytest.raises(pm.PeftMethodError, match="match no module"):
        apply(build("llama"), "lora", target_modules=r".*\.nothing")
    with pytest.raises(pm.PeftMethodError, match="linear layers"):
        apply(build("llama"), "lora", target_modules=["embed_tokens"])


def test_classifier_modules_to_save_as_peft_lists_them() -> None:
    """PEFT (0.22 on) saves a classifier's adapter with modules_to_save [classifier, score,
    pre_classifier]: a model has some of them only, which is no mistake; DistilBERT's
    `pre_classifier`, initialized at random like its head, trains fully by default as in PEFT;
    a misspelt name is still refused."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    listed = apply(build("bert"), "lora", modules_to_save=["classifier", "score",
                                                           "pre_classifier"])
    assert listed.modules_to_save == ["classifier"]
    distil = apply(DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64, num_labels=2)),
        "lora", target_modules=["q_lin", "v_lin"])
    assert distil.modules_to_save == ["pre_classifier", "classifier"]
    with pytest.raises(pm.PeftMethodError, match="'classifer' matches no module; close "
                                                 "names: classifier"):
        apply(build("bert"), "lora", modules_to_save=["classifer"])


@pytest.mark.parametrize("options, message", [
    ({"r": 0}, "Unsupported `r` 0"),
    ({"lora_alpha": -1}, "Unsupported `lora_alpha`"),
    ({"lora_dropout": 1.5}, "Unsupported `lora_dropout`"),
    ({"init_lora_weights": "kaiming"}, "Unsupported `init_lora_weights` 'kaiming'. Supported"),
    ({"target_modules": []}, "Unsupported `target_modules`"),
    ({"rank": 4}, "unknown option 'rank'"),
])
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(pm.PeftMethodError, match=message.replace("`", ".")):
        apply(build("bert"), "lora", **options)


def test_lora_plus_option_errors() -> None:
    with pytest.raises(pm.PeftMethodError, match="loraplus_lr_ratio"):
        apply(build("bert"), "lora_plus", loraplus_lr_ratio=0)


# --------------------------------------------------------------------------------------------
# LoRA+


def test_lora_plus_groups_have_lr_ratio() -> None:
    model = ours("bert", method="lora_plus", loraplus_lr_ratio=16)
    groups = model.optimizer_groups(lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3)
    assert by_name["lora_A"]["lr"] == pytest.approx(1e-3)
    assert by_name["no_decay"]["weight_decay"] == 0.0
    b_params = {id(m.lora_B.weight) for m in model.modules() if isinstance(m, LoraLinear)}
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_params
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)  # torch accepts the groups as they are


def test_lora_plus_saves_as_lora_for_peft(tmp_path) -> None:
    model = ours("gpt2", method="lora_plus")
    pm.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["distill_method"] == "lora_plus"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the two keys it does not know
        theirs = PeftModel.from_pretrained(build("gpt2"), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, "gpt2"), logits(model, "gpt2"))
    again = pm.load_adapter(build("gpt2"), tmp_path / "a")
    assert again.method.name == "lora_plus" and again.peft_config.loraplus_lr_ratio == 16
    torch.testing.assert_close(logits(again, "gpt2"), logits(model, "gpt2"))


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_matches_peft_and_leaves_the_plain_architecture(
        family: str, tmp_path) -> None:
    """Ours and PEFT's `merge_and_unload` on the same LoRA weights (PEFT's saved adapter,
    loaded by us) give the same plain model: the original state-dict keys, the same weights,
    and the adapted model's outputs."""
    theirs = peft_model(family, r=4, lora_alpha=8, target_modules="all-linear")
    theirs.save_pretrained(tmp_path / "p")
    mine = pm.load_adapter(build(family), tmp_path / "p").eval()
    expected = logits(mine, family)
    torch.testing.assert_close(logits(theirs, family), expected)
    plain = pm.merge_and_unload(mine)
    reference = theirs.merge_and_unload()
    assert set(plain.state_dict()) == set(build(family).state_dict())
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, family), expected, rtol=1e-5, atol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=1e-5, atol=1e-6)
