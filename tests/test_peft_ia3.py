"""(IA)³ against Hugging Face PEFT, the oracle, in both directions, on every tiny family.

Ours → PEFT: apply, set non-trivial vectors (and head weights), save_adapter, load with
`peft.PeftModel.from_pretrained` onto a fresh identical base: same logits. PEFT → ours:
`peft.get_peft_model`, non-trivial values, save_pretrained, our load_adapter: same logits.
Plus: the default targets (keys, values, feed-forward outputs, from the model's layout) against
PEFT's own per-family defaults, merge/unmerge, training touches only ia3_l and the
modules_to_save, and the config errors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import peft_methods as pm
from peft_methods.base import PeftMethodError, infer_task_type
from peft_methods.ia3 import IA3Layer
from tiny_models import DEPTH, FAMILIES, HIDDEN, apply, build, inputs, labels_for, logits

peft = pytest.importorskip("peft")


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """ia3_l ← 1 + 0.5·N(0, 1) (far from the identity) and a nudge to every other trainable
    tensor (the task head), so that a wrong load shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def peft_layers(peft_model) -> dict[str, bool]:
    """{module path in the HF model: is_feedforward} for PEFT's IA3 layers."""
    from peft.tuners.ia3 import IA3Layer as PeftIA3Layer
    base = peft_model.base_model.model
    return {n: m.is_feedforward for n, m in base.named_modules() if isinstance(m, PeftIA3Layer)}


def our_layers(adapted: pm.AdaptedModel) -> dict[str, bool]:
    return {n: m.is_feedforward for n, m in adapted.model.named_modules()
            if isinstance(m, IA3Layer)}


def peft_model_for(family: str, seed: int = 0):
    config = peft.IA3Config(task_type=infer_task_type(build(family)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that GPT-2's Conv1D needs fan_in_fan_out
        return peft.get_peft_model(build(family, seed), config).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_against_peft(family: str) -> None:
    """Keys, values and feed-forward outputs (input-scaled), from the model's layout: the
    layers PEFT's own table wraps for GPT-2, Llama and T5. For BERT PEFT's `output.dense`
    also matches the attention output projection (a suffix collision; it then scales that
    projection's input as if it were a feed-forward layer): ours leaves it out."""
    ours = our_layers(apply(build(family), "ia3"))
    theirs = peft_layers(peft_model_for(family))
    assert sum(ours.values()) == DEPTH * (2 if family == "t5" else 1)  # one per block
    if family == "bert":
        extra = {n: ff for n, ff in theirs.items() if n not in ours}
        assert set(extra) == {f"bert.encoder.layer.{i}.attention.output.dense"
                              for i in range(DEPTH)} and all(extra.values())
        theirs = {n: ff for n, ff in theirs.items() if n in ours}
    assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_our_adapter_loads_in_peft(family: str, tmp_path: Path) -> None:
    adapted = apply(build(family), "ia3")
    perturb(adapted)
    ours = logits(adapted, family)
    assert not torch.allclose(ours, logits(build(family), family))
    pm.save_adapter(adapted, tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(build(family), tmp_path / "ad").eval()
    assert set(peft_layers(theirs)) == set(our_layers(adapted))
    torch.testing.assert_close(logits(theirs, family), ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_ours(family: str, tmp_path: Path) -> None:
    theirs = peft_model_for(family)
    perturb(theirs, seed=1)
    want = logits(theirs, family)
    assert not torch.allclose(want, logits(build(family), family))
    theirs.save_pretrained(tmp_path / "ad")
    ours = pm.load_adapter(build(family), tmp_path / "ad")
    assert ours.method.name == "ia3"
    torch.testing.assert_close(logits(ours, family), want)


def test_seq_cls_head_travels_with_the_adapter(tmp_path: Path) -> None:
    """BERT classification: the head (and pooler) are modules_to_save, saved under PEFT's
    names, and PEFT's load gives them back (the oracle above would fail otherwise)."""
    adapted = apply(build("bert"), "ia3")
    assert adapted.modules_to_save == ["bert.pooler", "classifier"]
    pm.save_adapter(adapted, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["task_type"] == "SEQ_CLS"
    # The defaults by their shortest unambiguous names (`output.dense` alone would also match
    # the attention output projections: PEFT's own default does, see above).
    assert config["target_modules"] == ["0.output.dense", "1.output.dense", "key", "value"]
    assert config["feedforward_modules"] == ["0.output.dense", "1.output.dense"]


def test_vector_shapes_are_peft_s() -> None:
    """[out, 1] for ordinary targets, [1, in] for feed-forward ones; Conv1D included."""
    adapted = apply(build("gpt2"), "ia3")
    attn = adapted.model.get_submodule("transformer.h.0.attn.c_attn")
    mlp = adapted.model.get_submodule("transformer.h.0.mlp.c_proj")
    assert attn.ia3_l.shape == (3 * HIDDEN, 1) and not attn.is_feedforward
    assert mlp.ia3_l.shape == (1, 4 * HIDDEN) and mlp.is_feedforward
    assert json.loads(json.dumps(adapted.method.peft_config_dict(adapted)))["fan_in_fan_out"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_merge_unmerge(family: str) -> None:
    base = logits(build(family), family)
    adapted = apply(build(family), "ia3")
    torch.testing.assert_close(logits(adapted, family), base, rtol=0, atol=0)
    perturb(adapted)
    weights = {n: p.detach().clone() for n, p in adapted.model.named_parameters()
               if "base_layer" in n}
    unmerged = logits(adapted, family)
    pm.merge(adapted)
    torch.testing.assert_close(logits(adapted, family), unmerged, rtol=1e-5, atol=1e-5)
    pm.unmerge(adapted)
    torch.testing.assert_close(logits(adapted, family), unmerged, rtol=1e-5, atol=1e-5)
    for n, p in adapted.model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-7)


def test_unmerge_is_exact_with_zero_entries() -> None:
    """A zero in ia3_l wipes a row of W when merging; unmerge still restores it."""
    adapted = apply(build("bert"), "ia3")
    layer = adapted.model.get_submodule("bert.encoder.layer.0.attention.self.key")
    with torch.no_grad():
        layer.ia3_l[:3] = 0.0
    weight = layer.base_layer.weight.detach().clone()
    bias = layer.base_layer.bias.detach().clone()
    pm.merge(adapted)
    assert torch.all(layer.base_layer.weight[:3] == 0)
    pm.unmerge(adapted)
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.base_layer.bias, bias, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_only_ia3_and_saved_modules(family: str, tmp_path: Path) -> None:
    adapted = apply(build(family), "ia3")
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(family)
    batch["labels"] = labels_for(family, batch)
    for _ in range(3):
        adapted(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    saved = tuple(f"model.{s}." for s in adapted.modules_to_save)
    assert changed and all(n.endswith(".ia3_l") or n.startswith(saved) for n in changed)
    assert any(n.endswith(".ia3_l") for n in changed)
    pm.save_adapter(adapted, tmp_path / "ad")
    loaded = pm.load_adapter(build(family), tmp_path / "ad")
    torch.testing.assert_close(logits(loaded, family), logits(adapted, family), rtol=0, atol=0)


def test_explicit_targets_and_regex() -> None:
    adapted = apply(build("llama"), "ia3", target_modules=r".*\.(v_proj|down_proj)",
                    feedforward_modules=r".*\.down_proj")
    layers = our_layers(adapted)
    assert len(layers) == 2 * DEPTH
    assert all(ff == name.endswith("down_proj") for name, ff in layers.items())


def test_config_errors() -> None:
    with pytest.raises(PeftMethodError, match="subset of `target_modules`; not in it: wo"):
        apply(build("t5"), "ia3", target_modules=["k", "v"], feedforward_modules=["wo"])
    with pytest.raises(PeftMethodError, match="match no module.*close names: .*k_proj"):
        apply(build("llama"), "ia3", target_modules=["kproj"], feedforward_modules=[])
    with pytest.raises(PeftMethodError, match="`init_ia3_weights` must be true or false"):
        apply(build("llama"), "ia3", init_ia3_weights="yes")
    model = build("llama")  # without the model's layout there are no defaults
    with pytest.raises(PeftMethodError, match="ia3: no default `target_modules` for this "
                                              "model: give `target_modules`.*or apply the "
                                              "method with the model's `layout`"):
        pm.apply(model, "ia3")
    adapted = pm.apply(model, "ia3", target_modules=["v_proj"], feedforward_modules=[])
    assert len(our_layers(adapted)) == DEPTH
