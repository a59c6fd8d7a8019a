"""Layer-wise PEFT methods PEFT itself lacks: bottleneck adapters (Houlsby, Pfeiffer), BitFit
and diff-tuning — on the tiny models of every family they fit.

Per method: identity at init, placement, a hand-computed formula, merged == unmerged where
mergeable, only the method's tensors (and the modules_to_save) change when training, save →
load round-trips exactly, and misfits are clear errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import peft_methods as pm
from peft_methods.adapter import AdapterLayer
from peft_methods.base import PeftMethodError
from peft_methods.ops import WEIGHTS_NAME
from peft_methods.diff_tuning import DiffLayer
from tiny_models import DEPTH, FAMILIES, HIDDEN, apply, build, inputs, labels_for, logits

ADAPTERS = ("houlsby", "pfeiffer")
BIASED = ("bert", "gpt2")  # the tiny families with bias terms


# --------------------------------------------------------------------------------------------
# helpers


def train(adapted: pm.AdaptedModel, family: str, steps: int = 3) -> None:
    """A few AdamW steps on task loss + the method's extra loss."""
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(family)
    batch["labels"] = labels_for(family, batch)
    for _ in range(steps):
        loss = adapted(**batch).loss
        extra = adapted.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad()


def changed_params(adapted: pm.AdaptedModel, family: str) -> set[str]:
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    train(adapted, family)
    return {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}


def under_saved(adapted: pm.AdaptedModel, name: str) -> bool:
    """Is parameter `name` (of the AdaptedModel) inside one of the modules_to_save?"""
    return any(name.startswith(f"model.{s}.") for s in adapted.modules_to_save)


def randomize(adapted: pm.AdaptedModel, marker: str, scale: float = 0.1, seed: int = 0) -> None:
    """Give every method tensor whose name contains `marker` non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if marker in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def saved_round_trip(adapted: pm.AdaptedModel, family: str, tmp_path: Path) -> pm.AdaptedModel:
    pm.save_adapter(adapted, tmp_path / "ad")
    return pm.load_adapter(build(family), tmp_path / "ad")


# --------------------------------------------------------------------------------------------
# bottleneck adapters


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_identity_at_init(method: str, family: str) -> None:
    base = logits(build(family), family)
    adapted = apply(build(family), method)
    torch.testing.assert_close(logits(adapted, family), base, rtol=0, atol=0)


def adapter_sites(adapted: pm.AdaptedModel) -> list[str]:
    return [n for n, m in adapted.model.named_modules() if isinstance(m, AdapterLayer)]


def test_houlsby_t5_has_cross_attention_adapters() -> None:
    sites = adapter_sites(apply(build("t5"), "houlsby"))
    enc = [s for s in sites if s.startswith("encoder.")]
    dec = [s for s in sites if s.startswith("decoder.")]
    # seed 000: two adapters per encoder layer, three per decoder layer
    assert len(enc) == 2 * DEPTH and len(dec) == 3 * DEPTH
    for i in range(DEPTH):
        assert f"decoder.block.{i}.layer.1.EncDecAttention.o" in dec
        assert f"decoder.block.{i}.layer.0.SelfAttention.o" in dec
        assert f"decoder.block.{i}.layer.2.DenseReluDense.wo" in dec
        assert f"encoder.block.{i}.layer.0.SelfAttention.o" in enc
        assert not any("EncDecAttention" in s for s in enc)


def test_houlsby_bert_tells_attention_and_ffn_outputs_apart() -> None:
    sites = adapter_sites(apply(build("bert"), "houlsby"))
    assert sorted(sites) == sorted(
        [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(DEPTH)]
        + [f"bert.encoder.layer.{i}.output.dense" for i in range(DEPTH)])


@pytest.mark.parametrize("family,ffn", [
    ("bert", "output.dense"), ("gpt2", "mlp.c_proj"), ("llama", "mlp.down_proj"),
    ("t5", "DenseReluDense.wo")])
def test_pfeiffer_one_adapter_per_layer_after_ffn(family: str, ffn: str) -> None:
    sites = adapter_sites(apply(build(family), "pfeiffer"))
    layers = 2 * DEPTH if family == "t5" else DEPTH  # T5: encoder and decoder layers
    assert len(sites) == layers
    assert all(s.endswith(ffn) and "attention" not in s for s in sites)


def test_adapter_matches_hand_formula() -> None:
    """One adapter's output equals y + W_up f(W_down y + b_down) + b_up, y = proj(x)."""
    adapted = apply(build("gpt2"), "houlsby", bottleneck=4, activation="gelu", bias=True)
    layer = adapted.model.get_submodule("transformer.h.0.mlp.c_proj")  # Conv1D inside
    assert isinstance(layer, AdapterLayer)
    randomize(adapted, "adapter_", scale=0.3)
    x = torch.randn(2, 5, 4 * HIDDEN)
    with torch.no_grad():
        conv = layer.base_layer
        y = x @ conv.weight + conv.bias                      # Conv1D: weight [in, out]
        h = torch.nn.functional.gelu(y @ layer.adapter_down.weight.T + layer.adapter_down.bias)
        expected = y + h @ layer.adapter_up.weight.T + layer.adapter_up.bias
        torch.testing.assert_close(layer(x), expected)
    assert layer.adapter_down.weight.shape == (4, HIDDEN)
    assert layer.adapter_up.weight.shape == (HIDDEN, 4)


def test_adapter_width_options() -> None:
    def width(**kw) -> int:
        adapted = apply(build("llama"), "pfeiffer", **kw)
        return adapted.model.get_submodule("model.layers.0.mlp.down_proj").adapter_down \
            .out_features
    assert width() == HIDDEN // 16
    assert width(reduction_factor=4) == HIDDEN // 4
    assert width(bottleneck=3) == 3
    with pytest.raises(PeftMethodError, match="Can't provide both"):
        apply(build("llama"), "pfeiffer", bottleneck=3, reduction_factor=4)
    with pytest.raises(PeftMethodError, match="wider than the hidden size"):
        apply(build("llama"), "pfeiffer", bottleneck=HIDDEN + 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_trains_only_its_params_and_round_trips(method: str, family: str,
                                                        tmp_path: Path) -> None:
    adapted = apply(build(family), method)
    changed = changed_params(adapted, family)
    assert changed and all(("adapter_down" in n or "adapter_up" in n) or under_saved(adapted, n)
                           for n in changed)
    assert any("adapter_down" in n for n in changed)  # W_down learns once W_up is non-zero
    loaded = saved_round_trip(adapted, family, tmp_path)
    torch.testing.assert_close(logits(loaded, family), logits(adapted, family), rtol=0, atol=0)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"houlsby": "HOULSBY_ADAPTER",
                                   "pfeiffer": "PFEIFFER_ADAPTER"}[method]
    assert loaded.method.name == method


def test_adapter_is_not_mergeable() -> None:
    with pytest.raises(PeftMethodError, match="cannot be merged"):
        pm.merge(apply(build("bert"), "houlsby"))


class _OddConfig(PretrainedConfig):
    model_type = "odd"


class _OddModel(PreTrainedModel):
    """An architecture the family table does not know: blocks of `mix` and `ff2` layers."""

    config_class = _OddConfig

    def __init__(self) -> None:
        super().__init__(_OddConfig())
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(8, 8), "ff2": nn.Linear(8, 8)})
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["mix"](x)
            x = x + b["ff2"](torch.relu(x))
        return x


def test_adapter_unknown_architecture_needs_patterns() -> None:
    with pytest.raises(PeftMethodError, match="no default place for the ffn adapters in "
                                              "_OddModel: pass `ffn_modules`"):
        apply(_OddModel(), "pfeiffer")
    with pytest.raises(PeftMethodError, match="attention_modules"):
        apply(_OddModel(), "houlsby", ffn_modules=["ff2"])
    torch.manual_seed(0)
    plain = _OddModel()
    torch.manual_seed(0)
    adapted = apply(_OddModel(), "houlsby", ffn_modules=["ff2"], attention_modules=["mix"])
    assert len(adapter_sites(adapted)) == 4
    x = torch.randn(3, 8)
    torch.testing.assert_close(adapted(x), plain(x), rtol=0, atol=0)


def test_adapter_config_errors() -> None:
    with pytest.raises(PeftMethodError, match="Unsupported `activation` 'sigmoid'.*'relu'"):
        apply(build("bert"), "houlsby", activation="sigmoid")
    with pytest.raises(PeftMethodError, match="positive integer"):
        apply(build("bert"), "houlsby", reduction_factor=0)
    with pytest.raises(PeftMethodError, match="match no module.*close names: c_proj"):
        apply(build("gpt2"), "pfeiffer", ffn_modules=["c_prj"])
    # a name list matches by suffix, so `output.dense` selects the attention output too
    with pytest.raises(PeftMethodError, match="matches both"):
        apply(build("bert"), "houlsby", ffn_modules=["output.dense"])
    with pytest.raises(PeftMethodError, match="unknown option 'attention_modules'"):
        apply(build("bert"), "pfeiffer", attention_modules=["dense"])


# --------------------------------------------------------------------------------------------
# BitFit


def bias_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("family", BIASED)
def test_bitfit_trains_exactly_the_biases(family: str, tmp_path: Path) -> None:
    base = logits(build(family), family)
    adapted = apply(build(family), "bitfit")
    torch.testing.assert_close(logits(adapted, family), base, rtol=0, atol=0)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    expected = {f"model.{n}" for n in bias_names(adapted.model)}
    assert {n for n in trainable if not under_saved(adapted, n)} == \
        {n for n in expected if not under_saved(adapted, n)}
    changed = changed_params(adapted, family)
    assert changed and all(n.endswith(".bias") or under_saved(adapted, n) for n in changed)
    assert any("ln_1.bias" in n or "LayerNorm.bias" in n for n in changed)  # LayerNorm β
    loaded = saved_round_trip(adapted, family, tmp_path)
    torch.testing.assert_close(logits(loaded, family), logits(adapted, family), rtol=0, atol=0)


def test_bitfit_subset_and_save_layout(tmp_path: Path) -> None:
    adapted = apply(build("bert"), "bitfit", bias_patterns=["query", "value"])
    own = {n for n, p in adapted.named_parameters()
           if p.requires_grad and not under_saved(adapted, n)}
    assert own == {f"model.bert.encoder.layer.{i}.attention.self.{k}.bias"
                   for i in range(DEPTH) for k in ("query", "value")}
    train(adapted, "bert")
    pm.save_adapter(adapted, tmp_path / "ad")
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "ad" / WEIGHTS_NAME)))
    saved = {f"base_model.model.{s}." for s in adapted.modules_to_save}
    assert {k for k in keys if not any(k.startswith(s) for s in saved)} == \
        {"base_model.model." + n[len("model."):] for n in own}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT"
    loaded = pm.load_adapter(build("bert"), tmp_path / "ad")
    torch.testing.assert_close(logits(loaded, "bert"), logits(adapted, "bert"), rtol=0, atol=0)


def test_bitfit_merge_is_a_no_op() -> None:
    adapted = apply(build("gpt2"), "bitfit")
    train(adapted, "gpt2")
    before = logits(adapted, "gpt2")
    pm.merge(adapted)
    torch.testing.assert_close(logits(adapted, "gpt2"), before, rtol=0, atol=0)
    pm.unmerge(adapted)
    torch.testing.assert_close(logits(adapted, "gpt2"), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bitfit_refuses_bias_free_models(family: str) -> None:
    with pytest.raises(PeftMethodError, match="has no bias terms"):
        apply(build(family), "bitfit")


def test_bitfit_config_errors() -> None:
    with pytest.raises(PeftMethodError, match="match no module with a bias.*close names: "
                                              "query"):
        apply(build("bert"), "bitfit", bias_patterns=["querry"])
    with pytest.raises(PeftMethodError, match="`bias_patterns` must be"):
        apply(build("bert"), "bitfit", bias_patterns=[])


# --------------------------------------------------------------------------------------------
# diff-tuning


def diffs(adapted: pm.AdaptedModel) -> list[torch.Tensor]:
    return [p for n, p in adapted.named_parameters() if "diff_" in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_diff_identity_merge_training_round_trip(family: str, tmp_path: Path) -> None:
    base = logits(build(family), family)
    adapted = apply(build(family), "diff_tuning", penalty=1e-3)
    torch.testing.assert_close(logits(adapted, family), base, rtol=0, atol=0)
    changed = changed_params(adapted, family)
    assert changed and all("diff_" in n or under_saved(adapted, n) for n in changed)
    randomize(adapted, "diff_", scale=0.05)
    weights = {n: p.detach().clone() for n, p in adapted.model.named_parameters()
               if "base_layer" in n}
    unmerged = logits(adapted, family)
    assert not torch.allclose(unmerged, base)
    pm.merge(adapted)
    torch.testing.assert_close(logits(adapted, family), unmerged, rtol=1e-5, atol=1e-5)
    pm.unmerge(adapted)  # (W + Δ) − Δ may differ from W in the last bit
    torch.testing.assert_close(logits(adapted, family), unmerged, rtol=1e-6, atol=1e-6)
    for n, p in adapted.model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    loaded = saved_round_trip(adapted, family, tmp_path)  # dense format (the default)
    torch.testing.assert_close(logits(loaded, family), logits(adapted, family), rtol=0, atol=0)


def test_diff_targets_and_bias_option() -> None:
    adapted = apply(build("bert"), "diff_tuning", target_modules=["query"], diff_bias=False)
    layers = [n for n, m in adapted.model.named_modules() if isinstance(m, DiffLayer)]
    assert layers == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(DEPTH)]
    assert all(adapted.model.get_submodule(n).diff_bias is None for n in layers)
    # all-linear leaves out the task head (and the modules_to_save)
    adapted = apply(build("bert"), "diff_tuning")
    layers = {n for n, m in adapted.model.named_modules() if isinstance(m, DiffLayer)}
    assert "classifier" not in layers and "bert.pooler.dense" not in layers
    assert len(layers) == 6 * DEPTH


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_diff_penalty_matches_hand_formula(norm: str) -> None:
    lam = 0.01
    adapted = apply(build("gpt2"), "diff_tuning", penalty=lam, norm=norm)
    extra = adapted.extra_loss()
    extra.backward()  # at Δ = 0: a finite (zero) subgradient, also for the L2 norm
    assert float(extra.detach()) == 0.0
    assert all(torch.isfinite(d.grad).all() for d in diffs(adapted))
    randomize(adapted, "diff_", scale=0.02)
    flat = torch.cat([d.detach().flatten() for d in diffs(adapted)])
    expected = lam * (flat.abs().sum() if norm == "l1" else math.sqrt(float((flat ** 2).sum())))
    torch.testing.assert_close(adapted.extra_loss().detach(), torch.as_tensor(
        float(expected)), rtol=1e-5, atol=0)
    # After a training forward: from the parts each layer recorded while it ran (what FSDP
    # needs), equal to the formula, and its gradient is the formula's.
    adapted(**inputs("gpt2"))
    recorded = adapted.extra_loss()
    torch.testing.assert_close(recorded.detach(), torch.as_tensor(float(expected)),
                               rtol=1e-5, atol=0)
    assert all(m.penalty_part is None for m in adapted.modules() if hasattr(m, "penalty_part"))
    recorded.backward()
    got = [d.grad.clone() for d in diffs(adapted)]
    adapted.zero_grad()
    adapted.extra_loss().backward()  # no forward since: from the parameters
    for a, b in zip(got, (d.grad for d in diffs(adapted))):
        torch.testing.assert_close(a, b)
    assert apply(build("gpt2"), "diff_tuning", penalty=0).extra_loss() is None


def test_diff_sparse_save_is_smaller_and_loads_identically(tmp_path: Path) -> None:
    adapted = apply(build("llama"), "diff_tuning", save_format="sparse")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in diffs(adapted):  # ~2% non-zero entries, as an L1 penalty leaves
            mask = torch.rand(d.shape, generator=g) < 0.02
            d.copy_(torch.randn(d.shape, generator=g) * mask)
    pm.save_adapter(adapted, tmp_path / "sparse")
    adapted.peft_config.save_format = "dense"
    pm.save_adapter(adapted, tmp_path / "dense")
    size = {f: (tmp_path / f / WEIGHTS_NAME).stat().st_size for f in ("sparse", "dense")}
    assert size["sparse"] < size["dense"] / 5
    want = logits(adapted, "llama")
    for folder in ("sparse", "dense"):
        loaded = pm.load_adapter(build("llama"), tmp_path / folder)
        torch.testing.assert_close(logits(loaded, "llama"), want, rtol=0, atol=0)
        for a, b in zip(diffs(loaded), diffs(adapted)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_diff_sparse_threshold_drops_small_entries(tmp_path: Path) -> None:
    adapted = apply(build("gpt2"), "diff_tuning", target_modules=["c_fc"],
                    save_format="sparse", sparse_threshold=0.05)
    randomize(adapted, "diff_", scale=0.05)
    pm.save_adapter(adapted, tmp_path / "ad")
    loaded = pm.load_adapter(build("gpt2"), tmp_path / "ad")
    for a, b in zip(diffs(loaded), diffs(adapted)):
        expected = torch.where(b.abs() > 0.05, b, torch.zeros_like(b))
        torch.testing.assert_close(a, expected, rtol=0, atol=0)


def test_diff_config_errors() -> None:
    with pytest.raises(PeftMethodError, match="Unsupported `norm` 'l3'. Supported values are "
                                              "'l1', 'l2'"):
        apply(build("bert"), "diff_tuning", norm="l3")
    with pytest.raises(PeftMethodError, match="Unsupported `save_format` 'csv'"):
        apply(build("bert"), "diff_tuning", save_format="csv")
    with pytest.raises(PeftMethodError, match="`penalty` must be a number >= 0"):
        apply(build("bert"), "diff_tuning", penalty=-1.0)
    with pytest.raises(PeftMethodError, match="match no module.*close names: .*query"):
        apply(build("bert"), "diff_tuning", target_modules=["querry"])
