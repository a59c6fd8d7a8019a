"""UniPELT on its own: every gate is σ(w·x + b) of its component's input (checked by hand),
each component alone with its gate forced open equals the plain method with the same weights
(and forced shut equals no component), training moves every gate, save -> load is exact,
generation agrees with the forward pass, and misfits fail with clear errors.
(The shared contract — identity, frozen base, not mergeable, round trip — is in
test_peft_contract.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import peft_methods as pm
from peft_methods.base import PeftMethodError
from peft_methods.kv_cache import given_cache
from peft_methods.unipelt import GatedAdapterLayer, GatedLoraLinear, pooled_gate
from tiny_models import FAMILIES, apply, build, inputs, labels_for

M = 3  # virtual tokens
OPEN, SHUT = 50.0, -50.0  # gate biases: σ = 1 and σ = 0 in float32


def gates(adapted: pm.AdaptedModel) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in adapted.model.named_modules()
            if n.rsplit(".", 1)[-1] in ("lora_gate", "adapter_gate", "prefix_gate")}


def force_gates(adapted: pm.AdaptedModel, bias: float) -> None:
    """Every gate to the constant σ(bias), whatever its input."""
    with torch.no_grad():
        for gate in gates(adapted).values():
            gate.weight.zero_()
            gate.bias.fill_(bias)


def randomize(adapted: pm.AdaptedModel, seed: int = 3) -> None:
    """Non-zero LoRA B and adapter W_up, so that those branches show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if name.split(".")[-2] in ("lora_B", "adapter_up"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def run(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs(family)).logits


def copy_weights(src: pm.AdaptedModel, dst: pm.AdaptedModel, parts: tuple[str, ...]) -> None:
    """Copy the tensors whose name has one of `parts` to the same path in `dst` (the LoRA and
    adapter tensors sit at the same paths in unipelt and in lora / pfeiffer)."""
    own = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if any(part in name.split(".") for part in parts):
                p.copy_(own[name])


# --------------------------------------------------------------------------------------------
# the gates, by hand


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_gated_lora_matches_hand_formula(family: str) -> None:
    """base(x) + σ(w·x + b) · (α/r) · B A x, per token (Linear and GPT-2's Conv1D)."""
    adapted = apply(build(family), "unipelt", components=["lora"], r=4, lora_alpha=8)
    randomize(adapted)
    name = "bert.encoder.layer.0.attention.self.query" if family == "bert" else \
        "transformer.h.0.attn.c_attn"
    layer = adapted.model.get_submodule(name)
    assert isinstance(layer, GatedLoraLinear)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    w, b = layer.base_layer.weight, layer.base_layer.bias
    base = F.linear(x, w, b) if family == "bert" else x @ w + b  # Conv1D stores W as [in, out]
    gate = torch.sigmoid(x @ layer.lora_gate.weight.T + layer.lora_gate.bias)  # [2, 5, 1]
    assert gate.shape == (2, 5, 1) and 0 < gate.min() and gate.max() < 1
    assert gate.std() > 0  # one gate per token, not one per batch
    update = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * (8 / 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base + gate * update)


def test_gated_adapter_matches_hand_formula() -> None:
    """y + σ(w·y + b) · W_up relu(W_down y), y the FFN output projection's output."""
    adapted = apply(build("llama"), "unipelt", components=["adapter"], bottleneck=4)
    randomize(adapted)
    layer = adapted.model.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, GatedAdapterLayer)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    y = x @ layer.base_layer.weight.T
    gate = torch.sigmoid(y @ layer.adapter_gate.weight.T + layer.adapter_gate.bias)
    branch = torch.relu(y @ layer.adapter_down.weight.T) @ layer.adapter_up.weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y + gate * branch)


def test_pooled_gate_mean_over_real_tokens_or_first_real_token() -> None:
    g = torch.tensor([[0.2, 0.4, 0.9], [0.1, 0.3, 0.5]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pooled_gate(g, mask, "mean"), torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(pooled_gate(g, mask, "first"), torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(pooled_gate(g, None, "mean"), g.mean(dim=1))
    with pytest.raises(PeftMethodError, match="attention mask of shape"):
        pooled_gate(g, mask[:, :2], "mean")


@pytest.mark.parametrize(("family", "attention", "pool"), [
    ("bert", "bert.encoder.layer.1.attention.self", "mean"),
    ("gpt2", "transformer.h.1.attn", "first"),
    ("t5", "decoder.block.1.layer.0.SelfAttention", "first"),
])
def test_prefix_gate_scales_the_cached_prefix_by_hand(family: str, attention: str,
                                                      pool: str) -> None:
    """The prefix keys and values the attention reads = the raw ones × pool_t σ(w·x_t + b), x
    the attention's input, pooled over the real tokens (mean) or the first one (LMs)."""
    adapted = apply(build(family), "unipelt", components=["prefix"], num_virtual_tokens=M)
    module = adapted.model.get_submodule(attention)
    seen: dict[str, torch.Tensor] = {}

    def record(when: str):
        def hook(mod, args, kwargs):
            cache = given_cache(kwargs)
            layer = getattr(cache, "self_attention_cache", cache).layers[mod.layer_idx]
            seen[when + "k"], seen[when + "v"] = layer.keys.clone(), layer.values.clone()
            seen["x"] = args[0] if args else kwargs["hidden_states"]
        return hook

    module.register_forward_pre_hook(record("raw"), with_kwargs=True, prepend=True)
    module.register_forward_pre_hook(record("gated"), with_kwargs=True)
    batch = inputs(family)
    with torch.no_grad():
        adapted.eval()(**batch)
        per_token = torch.sigmoid(seen["x"] @ module.prefix_gate.weight.T
                                  + module.prefix_gate.bias).squeeze(-1)  # [b, n]
    if pool == "mean":  # bert: over the unpadded tokens of the (right-padded) batch
        real = batch["attention_mask"].float()
        expected = (per_token * real).sum(1) / real.sum(1)
    else:
        expected = per_token[:, 0]
    assert 0 < expected.min() and expected.max() < 1
    assert seen["rawk"].shape[2] == M
    scale = expected.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["gatedk"], seen["rawk"] * scale)
    torch.testing.assert_close(seen["gatedv"], seen["rawv"] * scale)


# --------------------------------------------------------------------------------------------
# components on and off


@pytest.mark.parametrize("family", FAMILIES)
def test_without_prefix_the_model_is_unchanged_at_init(family: str) -> None:
    adapted = apply(build(family), "unipelt", components=["lora", "adapter"])
    torch.testing.assert_close(run(adapted, family), run(build(family), family),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_alone_with_open_gate_is_plain_lora(family: str) -> None:
    ours = apply(build(family), "unipelt", components=["lora"], r=4, lora_alpha=8)
    randomize(ours)
    plain = apply(build(family), "lora", r=4, lora_alpha=8)
    copy_weights(ours, plain, ("lora_A", "lora_B"))
    force_gates(ours, OPEN)
    torch.testing.assert_close(run(ours, family), run(plain, family))
    force_gates(ours, SHUT)
    torch.testing.assert_close(run(ours, family), run(build(family), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_alone_with_open_gate_is_pfeiffer(family: str) -> None:
    ours = apply(build(family), "unipelt", components=["adapter"], bottleneck=4)
    randomize(ours)
    plain = apply(build(family), "pfeiffer", bottleneck=4)
    copy_weights(ours, plain, ("adapter_down", "adapter_up"))
    force_gates(ours, OPEN)
    torch.testing.assert_close(run(ours, family), run(plain, family))
    force_gates(ours, SHUT)
    torch.testing.assert_close(run(ours, family), run(build(family), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_alone_with_open_gate_is_prefix_tuning(family: str) -> None:
    """Gate 1: prefix tuning with the same prefix encoder; gate 0: all-zero prefixes."""
    ours = apply(build(family), "unipelt", components=["prefix"], num_virtual_tokens=M)
    plain = apply(build(family), "prefix_tuning", num_virtual_tokens=M)
    plain.extra["prompt_encoder"].load_state_dict(ours.extra["prompt_encoder"].state_dict())
    force_gates(ours, OPEN)
    torch.testing.assert_close(run(ours, family), run(plain, family))
    zero = apply(build(family), "p_tuning_v2", num_virtual_tokens=M, init_weights="zero")
    force_gates(ours, SHUT)
    torch.testing.assert_close(run(ours, family), run(zero, family))


def test_components_choose_what_is_injected() -> None:
    adapted = apply(build("gpt2"), "unipelt", components=["adapter", "lora"])
    assert adapted.peft_config.components == ["lora", "adapter"]  # canonical order
    assert "prompt_encoder" not in adapted.extra
    kinds = {n.rsplit(".", 1)[-1] for n in gates(adapted)}
    assert kinds == {"lora_gate", "adapter_gate"}
    full = apply(build("gpt2"), "unipelt")
    assert {n.rsplit(".", 1)[-1] for n in gates(full)} == {"lora_gate", "adapter_gate",
                                                           "prefix_gate"}
    assert len([n for n in gates(full) if n.endswith("prefix_gate")]) == 2  # one per layer


# --------------------------------------------------------------------------------------------
# training, saving, generation


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_training_moves_every_gate_and_component_only(family: str) -> None:
    adapted = apply(build(family), "unipelt", num_virtual_tokens=M)
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    for _ in range(3):  # step 1 moves B / W_up; from step 2 their gates get gradient too
        batch = inputs(family)
        adapted(**batch, labels=labels_for(family, batch)).loss.backward()
        assert adapted.extra_loss() is None
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in adapted.named_parameters() if n in before
             and not torch.equal(p, before[n])}
    for part in ("lora_A", "lora_B", "lora_gate", "adapter_down", "adapter_up", "adapter_gate",
                 "prefix_gate", "prompt_encoder"):
        assert any(part in n.split(".") for n in moved), f"{part} did not train"
    assert all(torch.equal(p, frozen[n]) for n, p in adapted.named_parameters() if n in frozen)


def test_save_load_all_linear_nests_lora_inside_the_adapter(tmp_path: Path) -> None:
    """"all-linear" also targets the FFN output that carries the adapter: LoRA goes inside it
    (at `<path>.base_layer`); the file names the untouched paths and reloads exactly."""
    adapted = apply(build("bert"), "unipelt", target_modules="all-linear",
                    num_virtual_tokens=M)
    randomize(adapted)
    expected = run(adapted, "bert")
    nested = "bert.encoder.layer.0.output.dense"
    assert isinstance(adapted.model.get_submodule(nested), GatedAdapterLayer)
    assert isinstance(adapted.model.get_submodule(nested + ".base_layer"), GatedLoraLinear)
    path = pm.save_adapter(adapted, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNIPELT" and nested in config["target_modules"]
    keys = load_file(str(path / "adapter_model.safetensors"))
    assert f"base_model.model.{nested}.base_layer.lora_gate.weight" in keys
    assert f"base_model.model.{nested}.adapter_gate.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.prefix_gate.bias" in keys
    assert keys["prompt_embeddings"].shape == (M, 2 * 2 * 32)  # [m, L·2·d]
    assert all(k.startswith("base_model.model.") for k in keys if k != "prompt_embeddings")
    loaded = pm.load_adapter(build("bert"), path)
    torch.testing.assert_close(run(loaded, "bert"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("components", [["lora"], ["prefix", "adapter"]])
def test_save_load_subsets(components: list[str], tmp_path: Path) -> None:
    adapted = apply(build("llama"), "unipelt", components=components, num_virtual_tokens=M)
    randomize(adapted)
    expected = run(adapted, "llama")
    loaded = pm.load_adapter(build("llama"), pm.save_adapter(adapted, tmp_path / "a"))
    assert loaded.peft_config.components == components
    torch.testing.assert_close(run(loaded, "llama"), expected, rtol=0, atol=0)


def test_generation_with_all_components_agrees_with_forward() -> None:
    """Greedy generation (the prefix gated once, at prefill, from the first token) gives, at
    each step, the logits of a full forward pass over the generated text."""
    adapted = apply(build("gpt2"), "unipelt", num_virtual_tokens=M).eval()
    randomize(adapted)
    ids = inputs("gpt2")["input_ids"]
    out = adapted.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=4, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    n, seq = ids.shape[1], out.sequences
    assert seq.shape == (2, n + 4)
    with torch.no_grad():
        logits = adapted(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits[:, n - 1:-1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pool", "causal"), [(None, True), ("mean", False)])
def test_default_prefix_gate_of_an_lm_does_not_see_later_tokens(pool: str | None,
                                                                causal: bool) -> None:
    """With "first" (the LM default) the logits at position k do not depend on tokens after k;
    "mean" lets them leak through the gate (why it is not the default for LMs)."""
    adapted = apply(build("llama"), "unipelt", num_virtual_tokens=M,
                    prefix_gate_pool=pool).eval()
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        full = adapted(input_ids=ids).logits[:, 3]
        cut = adapted(input_ids=ids[:, :4]).logits[:, 3]
    assert torch.allclose(full, cut, rtol=1e-5, atol=1e-6) == causal


def test_generation_t5() -> None:
    adapted = apply(build("t5"), "unipelt", num_virtual_tokens=M).eval()
    batch = inputs("t5")
    out = adapted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 4


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(("options", "message"), [
    ({"components": ["lora", "bitfit"]}, ("Unsupported `components` 'bitfit'. Supported values "
                                          "are 'lora', 'prefix', 'adapter'")),
    ({"components": []}, "Unsupported `components` \\[\\]"),
    ({"components": "lora"}, "Unsupported `components` 'lora'"),
    ({"prefix_gate_pool": "max"}, ("Unsupported `prefix_gate_pool` 'max'. Supported values are "
                                   "'mean', 'first'")),
    ({"r": 0}, "Unsupported `r` 0"),
    ({"activation": "sigmoid"}, "Unsupported `activation` 'sigmoid'"),
    ({"bottleneck": 4, "reduction_factor": 8}, "Can't provide both `bottleneck`"),
    ({"num_virtual_tokens": 0}, "Unsupported `num_virtual_tokens` 0"),
    ({"gate": True}, "unknown option 'gate'"),
])
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(PeftMethodError, match=message):
        apply(build("gpt2"), "unipelt", **options)


def test_misfits_and_misuse_are_clear_errors() -> None:
    with pytest.raises(PeftMethodError, match="target_modules \\['qeury'\\] match no module"):
        apply(build("bert"), "unipelt", target_modules=["qeury"])
    with pytest.raises(PeftMethodError, match="unipelt cannot be merged"):
        pm.merge(apply(build("gpt2"), "unipelt", components=["lora"]))
    with pytest.raises(PeftMethodError, match="KV cache; do not pass your own"):
        apply(build("gpt2"), "unipelt")(**inputs("gpt2"), past_key_values=object())


def test_prefix_sites_come_from_the_layout_or_the_config() -> None:
    """Without a layout the prefix-reading attention must be named (`prefix_modules`); the
    layout finds it on any family distill understands (OPT here, which had no table row)."""
    from transformers import OPTConfig, OPTForCausalLM

    def opt() -> OPTForCausalLM:
        torch.manual_seed(0)
        return OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, ffn_dim=64,
                                        word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(PeftMethodError, match="unipelt: no default `prefix_modules` for this "
                                              "model.*apply the method with the model's"):
        pm.apply(opt(), "unipelt", components=["prefix"])
    ids = torch.tensor([[5, 6, 7]])
    for adapted in (apply(opt(), "unipelt", components=["prefix"]),
                    pm.apply(opt(), "unipelt", components=["prefix"],
                             prefix_modules=["self_attn"])):
        assert adapted.peft_config.prefix_modules == ["self_attn"]
        assert adapted(input_ids=ids).logits.shape == (1, 3, 100)
    adapted = pm.apply(opt(), "unipelt", components=["lora"], target_modules=["q_proj"])
    assert adapted(input_ids=ids).logits.shape == (1, 3, 100)
