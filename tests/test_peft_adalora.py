"""AdaLoRA against Hugging Face PEFT: the same logits from each other's files (before and
after rank pruning), the same rank allocation on identical gradients, the same
orthogonality regulariser."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import peft_methods as pm
from peft_methods.adalora import SVDLinear
from peft_methods.ops import read_adapter_weights
from tiny_models import FAMILIES, apply, build, inputs, labels_for, logits

TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
TO_SAVE = {"bert": ["classifier", "pooler"]}
# a short schedule: 2 warm-up steps, pruning every 2nd step, 3 final steps
SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 3, "deltaT": 2}


def randomize(model: torch.nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or ".classifier." in f".{name}" or ".pooler." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ours(family: str, **options) -> pm.AdaptedModel:
    options = {"modules_to_save": TO_SAVE.get(family), "total_step": 10, "init_r": 4,
               "target_r": 2} | options
    return apply(build(family), "adalora", **options)


def theirs(family: str, **options) -> PeftModel:
    options = {"total_step": 10, "init_r": 4, "target_r": 2} | options
    config = AdaLoraConfig(task_type=TASK[family], modules_to_save=TO_SAVE.get(family),
                           **options)
    return get_peft_model(build(family), config)


def peft_lora_params(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's A/E/B by our names (path relative to the HF model, no adapter name)."""
    return {n.replace(".default", ""): p for n, p in model.base_model.model.named_parameters()
            if "lora_" in n}


def our_lora_params(model: pm.AdaptedModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.model.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------------------------
# oracle: files both ways


@pytest.mark.parametrize("family", FAMILIES)
def test_ours_saved_loads_in_peft(family: str, tmp_path) -> None:
    model = ours(family)
    randomize(model)
    pm.save_adapter(model.eval(), tmp_path / "a")
    peft_model = PeftModel.from_pretrained(build(family), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_model, family), logits(model, family))
    assert logits(model, family).sub(logits(build(family), family)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_saved_loads_in_ours(family: str, tmp_path) -> None:
    peft_model = theirs(family)
    randomize(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "p")
    model = pm.load_adapter(build(family), tmp_path / "p")
    assert model.method.name == "adalora"
    assert set(our_lora_params(model)) == set(peft_lora_params(peft_model))
    torch.testing.assert_close(logits(model, family), logits(peft_model, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family: str) -> None:
    torch.testing.assert_close(logits(ours(family), family), logits(build(family), family))


# --------------------------------------------------------------------------------------------
# rank allocation on identical gradients


def run_schedule(family: str, steps: int) -> tuple[pm.AdaptedModel, PeftModel, list[int]]:
    """Ours and PEFT's AdaLoRA with the same weights, fed the same gradients and the same
    parameter updates for `steps` steps; returns both and our kept rank after each step."""
    peft_model = theirs(family, **SCHEDULE)
    randomize(peft_model)
    model = ours(family, **SCHEDULE)
    mine, other = our_lora_params(model), peft_lora_params(peft_model)
    assert set(mine) == set(other)
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(other[n])
    for name in model.modules_to_save:  # the head and pooler PEFT trains (a wrapped copy)
        wrapper = peft_model.base_model.model.get_submodule(name)
        model.model.get_submodule(name).load_state_dict(
            wrapper.modules_to_save["default"].state_dict())
    kept = []
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(100 + step)
        for n in sorted(mine):
            grad = torch.randn(mine[n].shape, generator=g)
            update = torch.randn(mine[n].shape, generator=g) * 0.01  # an "optimizer step"
            for p in (mine[n], other[n]):
                with torch.no_grad():
                    p.add_(update)
                p.grad = grad.clone()
        peft_model.base_model.update_and_allocate(step)
        model.on_step(step)
        kept.append(sum(model.method.budget(model).values()))
        for n in mine:
            torch.testing.assert_close(mine[n], other[n], rtol=0, atol=0, msg=f"step {step} {n}")
    return model, peft_model, kept


def test_allocator_matches_peft_on_identical_gradients() -> None:
    model, peft_model, kept = run_schedule("llama", SCHEDULE["total_step"] + 2)
    pattern = {k.replace(".default", ""): v
               for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert model.peft_config.rank_pattern == pattern
    layers = len(model.method.layers(model))  # 4 (q, v in 2 blocks)
    # budget: init_r·n during warm-up, shrinking, then target_r·n for the final steps
    assert kept[:2] == [4 * layers] * 2
    assert all(a >= b for a, b in itertools.pairwise(kept))
    assert kept[-1] == 2 * layers and kept[4] < 4 * layers
    # the pruned triplets are exactly the zeros of E
    zeros = sum(int((layer.lora_E == 0).sum()) for layer in model.method.layers(model).values())
    assert zeros == 4 * layers - kept[-1]


def test_budget_schedule_matches_peft() -> None:
    model, peft_model = ours("bert", **SCHEDULE), theirs("bert", **SCHEDULE)
    for step in range(SCHEDULE["total_step"] + 3):
        assert model.rank_allocator.budget_schedule(step) == \
            peft_model.base_model.rankallocator.budget_schedule(step), step


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_pruned_adapter_round_trips_with_peft(family: str, tmp_path) -> None:
    """After pruning both save cut tensors plus `rank_pattern`; each loads the other's."""
    model, peft_model, _ = run_schedule(family, SCHEDULE["total_step"] - SCHEDULE["tfinal"])
    model.eval(), peft_model.eval()
    pm.save_adapter(model, tmp_path / "a")
    peft_model.save_pretrained(tmp_path / "p")
    saved = read_adapter_weights(tmp_path / "a")
    ranks = [v.shape[0] for k, v in saved.items() if k.endswith(".lora_E")]
    assert sum(ranks) == SCHEDULE["target_r"] * len(ranks)  # the final budget, spread
    assert all(saved[k.replace("lora_E", "lora_B")].shape[1] == saved[k].shape[0]
               for k in saved if k.endswith(".lora_E"))
    assert pm.read_adapter_config(tmp_path / "a")["rank_pattern"] == \
        pm.read_adapter_config(tmp_path / "p")["rank_pattern"]
    expected = logits(model, family)
    torch.testing.assert_close(logits(peft_model, family), expected)
    peft_loaded = PeftModel.from_pretrained(build(family), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_loaded, family), expected)
    our_loaded = pm.load_adapter(build(family), tmp_path / "p")
    torch.testing.assert_close(logits(our_loaded, family), expected)
    layers = our_loaded.method.layers(our_loaded).values()
    assert sorted(m.r for m in layers) == sorted(ranks)
    assert all(m.ranknum == 4 for m in layers)  # cut, but scaled as trained (init_r)


# --------------------------------------------------------------------------------------------
# regulariser, merge, training contract


def test_orthogonal_regulariser_matches_peft() -> None:
    peft_model = theirs("llama", orth_reg_weight=0.3)
    randomize(peft_model)
    model = ours("llama", orth_reg_weight=0.3)
    with torch.no_grad():
        mine = our_lora_params(model)
        for n, p in peft_lora_params(peft_model).items():
            mine[n].copy_(p)
    batch = inputs("llama")
    labels = labels_for("llama", batch)
    with torch.no_grad():
        with_reg = peft_model(**batch, labels=labels).loss
        without = peft_model.base_model.model(**batch, labels=labels).loss
    extra = model.extra_loss()
    torch.testing.assert_close(extra, with_reg - without)
    extra.backward()
    assert all(p.grad is not None for n, p in mine.items() if "lora_E" not in n)
    assert ours("llama", orth_reg_weight=0).extra_loss() is None


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_merge_equals_unmerged_and_unmerge_restores(family: str) -> None:
    model = ours(family)
    randomize(model, scale=0.1)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    unmerged = logits(model, family)
    pm.merge(model)
    torch.testing.assert_close(logits(model, family), unmerged, rtol=1e-4, atol=1e-4)
    pm.unmerge(model)
    for n, p in model.model.named_parameters():
        torch.testing.assert_close(p, before[n])


def test_only_adapter_and_saved_modules_train() -> None:
    model = ours("bert")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = inputs("bert")
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels_for("bert", batch))
    (loss + model.extra_loss()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.on_step(1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n or ".classifier." in n or ".pooler." in n
                           for n in changed)
    assert sum(isinstance(m, SVDLinear) for m in model.modules()) == 4


@pytest.mark.parametrize("options, message", [
    ({"total_step": None}, "needs `total_step`"),
    ({"target_r": 8, "init_r": 4}, "Unsupported `target_r` 8"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "leave no pruning phase"),
    ({"beta1": 1.0}, "Unsupported `beta1` 1.0"),
    ({"orth_reg_weight": -1}, "Unsupported `orth_reg_weight`"),
    ({"target_modules": ["querry"]}, "close names: .*query"),
])
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(pm.PeftMethodError, match=message.replace("`", ".")):
        ours("bert", **options)
