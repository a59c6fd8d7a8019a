"""One contract for every registered PEFT method on a tiny model of every family.

For each (method, family): the output is unchanged right after `apply` where the method
promises it; only the method's parameters and the `modules_to_save` change in training; merged
equals unmerged and unmerge restores the base weights (mergeable methods); save -> load onto a
fresh copy of the base round-trips exactly. A method that does not fit a family must say so
with a PeftMethodError (listed in MISFITS, one row per exception).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peft_methods as pm
from peft_methods.base import PeftMethodError
from tiny_models import FAMILIES, apply, build, inputs, labels_for

METHODS = pm.available()
# (method, family) pairs that must be refused with a clear error, and why.
MISFITS: dict[tuple[str, str], str] = {
    ("bitfit", "llama"): "bias",   # Llama layers have no biases
    ("bitfit", "t5"): "bias",      # T5 layers have no biases
}
# Small configs so that the tiny models stay tiny; methods absent here use their defaults.
OPTIONS: dict[str, dict] = {
    "lora": {"r": 4}, "lora_plus": {"r": 4}, "qlora": {"r": 4},
    "adalora": {"init_r": 6, "target_r": 2, "total_step": 10, "tinit": 1, "tfinal": 2},
    "houlsby": {}, "pfeiffer": {},
}
CASES = [(m, f) for m in METHODS for f in FAMILIES]


def options(method: str) -> dict:
    return dict(OPTIONS.get(method, {}))


def forward(model, family: str, with_labels: bool = False):
    batch = inputs(family)
    if with_labels:
        batch["labels"] = labels_for(family, batch)
    return model(**batch)


def apply_or_misfit(method: str, family: str, seed: int = 0) -> pm.AdaptedModel | None:
    base = build(family, seed)
    if (method, family) in MISFITS:
        with pytest.raises(PeftMethodError, match=MISFITS[(method, family)]):
            apply(base, method, **options(method))
        return None
    return apply(base, method, **options(method))


def train_steps(adapted: pm.AdaptedModel, family: str, steps: int = 3) -> None:
    """A few AdamW steps through the same hooks the training loop uses."""
    groups = adapted.optimizer_groups(1e-2, 0.0) or [
        {"params": [p for p in adapted.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(1, steps + 1):
        out = forward(adapted, family, with_labels=True)
        loss = out.loss
        extra = adapted.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        opt.step()
        adapted.on_step(step)
        opt.zero_grad()


@pytest.mark.parametrize(("method", "family"), CASES)
def test_output_unchanged_at_init(method: str, family: str) -> None:
    spec = pm.get_method(method)
    if not spec.identity_at_init:
        pytest.skip(f"{method} does not promise identity at initialisation")
    expected = forward(build(family), family).logits
    adapted = apply_or_misfit(method, family)
    if adapted is None:
        return
    with torch.no_grad():
        got = forward(adapted.eval(), family).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "family"), CASES)
def test_only_method_parameters_change(method: str, family: str) -> None:
    adapted = apply_or_misfit(method, family)
    if adapted is None:
        return
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable, f"{method} trains nothing on {family}"
    report = pm.trainable_report(adapted)
    assert report["trainable_params"] == sum(p.numel() for p in adapted.parameters()
                                             if p.requires_grad)
    adapted.eval()
    train_steps(adapted, family)
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed, f"{method} on {family}: nothing moved in training"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"


@pytest.mark.parametrize(("method", "family"), CASES)
def test_merged_equals_unmerged(method: str, family: str) -> None:
    if not pm.get_method(method).mergeable:
        adapted = apply_or_misfit(method, family)
        if adapted is not None:
            with pytest.raises(PeftMethodError, match="cannot be merged"):
                pm.merge(adapted)
        return
    adapted = apply_or_misfit(method, family)
    if adapted is None:
        return
    adapted.eval()
    train_steps(adapted, family)
    base_weights = {n: p.detach().clone() for n, p in adapted.named_parameters()
                    if not p.requires_grad}
    with torch.no_grad():
        unmerged = forward(adapted, family).logits
        pm.merge(adapted)
        merged = forward(adapted, family).logits
        pm.unmerge(adapted)
        again = forward(adapted, family).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-4, atol=1e-5)
    for n, p in adapted.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "family"), CASES)
def test_save_load_round_trip(method: str, family: str, tmp_path: Path) -> None:
    adapted = apply_or_misfit(method, family)
    if adapted is None:
        return
    adapted.eval()
    train_steps(adapted, family)
    with torch.no_grad():
        expected = forward(adapted, family).logits
    path = pm.save_adapter(adapted, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    loaded = pm.load_adapter(build(family), path).eval()
    assert loaded.method.name == method
    with torch.no_grad():
        got = forward(loaded, family).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_method_module_is_registered() -> None:
    """The methods METHODS.md §3 names are all registered."""
    wanted = {"full", "lora", "lora_plus", "qlora", "adalora", "houlsby", "pfeiffer", "bitfit",
              "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "unipelt",
              "diff_tuning"}
    assert wanted <= set(METHODS), sorted(wanted - set(METHODS))
