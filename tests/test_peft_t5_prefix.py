"""Prefix tuning's opt-in `encoder_prefix` on T5: the encoder's self-attention in every layer
gets its own m learned keys/values (METHODS.md §3: separate encoder and decoder prefixes),
while the decoder part stays PEFT's.

- a hand computation of one encoder attention layer: softmax([q·P_k ; q·K] + [0 ; bias]) ·
  [P_v ; V], with a padding mask, for eager and sdpa, with and without relative bias;
- the encoder prefixes change the encoder output and are used (values zero vs. not);
- the decoder part equals the plain (PEFT-compatible) decoder prefixes;
- training moves both tables; save -> load is exact; generation works;
- off by default writes the same file as before; misuse fails with PeftMethodError.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration

import peft_methods as pm
from peft_methods.base import PeftMethodError
from peft_methods.encoder_prefix import encoder_prefixes
from peft_methods.prompt_tuning import PromptTable
from tiny_models import VOCAB, apply, build, inputs, labels_for

M = 3
H, DH, D = 4, 8, 32  # tiny T5: heads, head dim, inner width


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def adapt(method: str = "prefix_tuning", seed: int = 0, **options) -> pm.AdaptedModel:
    torch.manual_seed(100 + seed)
    return apply(build("t5"), method, num_virtual_tokens=M, **options)


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def run(model, **extra):
    with torch.no_grad():
        return model.eval()(**inputs("t5"), **extra)


# -------------------------------------------------------------------------------------------
# the attention computation by hand


def hand_attention(attn, x: torch.Tensor, table: torch.Tensor, layer: int,
                   keep: torch.Tensor, bias_from=None) -> torch.Tensor:
    """softmax([q·P_k ; q·K] + [0 ; bias] + mask) · [P_v ; V], then T5's output projection;
    `keep` [b, n] marks the visible (non-padding) tokens; the relative bias is `bias_from`'s
    (T5's encoder stack shares layer 0's with every layer), else `attn`'s own or zero."""
    b, n, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:  # [b, len, H·DH] -> [b, H, len, DH]
        return t.reshape(t.shape[0], -1, H, DH).transpose(1, 2)

    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    pk = heads(table[None, :, 2 * layer * D:(2 * layer + 1) * D])  # [1, H, m, DH]
    pv = heads(table[None, :, (2 * layer + 1) * D:(2 * layer + 2) * D])
    source = bias_from or attn
    bias = source.compute_bias(n, n)[0] if source.has_relative_attention_bias \
        else torch.zeros(H, n, n)
    scores_p = torch.einsum("bhqd,hkd->bhqk", q, pk[0])  # T5 does not scale by sqrt(d)
    scores_t = torch.einsum("bhqd,bhkd->bhqk", q, k) + bias
    scores_t = scores_t.masked_fill(~keep[:, None, None, :].bool(), float("-inf"))
    weights = torch.softmax(torch.cat((scores_p, scores_t), dim=-1), dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", weights[..., :M], pv[0].expand(b, -1, -1, -1)) + \
        torch.einsum("bhqk,bhkd->bhqd", weights[..., M:], v)
    return attn.o(out.transpose(1, 2).reshape(b, n, H * DH))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("layer", [0, 1])  # layer 0 owns T5's relative bias, layer 1 not
def test_one_encoder_layer_by_hand(implementation: str, layer: int) -> None:
    model = build("t5")
    model.config._attn_implementation = implementation
    attn = model.encoder.block[layer].layer[0].SelfAttention
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, D, generator=g)
    table = torch.randn(M, 2 * 2 * D, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # the 4-d mask T5's encoder stack hands its layers: bool (sdpa) or additive (eager)
    visible = keep[:, None, None, :].bool().expand(2, 1, 5, 5)
    mask = visible if implementation == "sdpa" else torch.zeros(2, 1, 5, 5).masked_fill(
        ~visible, torch.finfo(torch.float32).min)
    with torch.no_grad(), encoder_prefixes(model, table):
        out, bias, _ = attn(x, mask=mask)
        expected = hand_attention(attn, x, table, layer, keep)
    torch.testing.assert_close(out, expected)
    assert bias.shape == (1, H, 5, M + 5) and not bias[..., :M].any()  # zero prefix bias
    assert not attn._forward_pre_hooks  # nothing stays registered
    with torch.no_grad():  # and without the context the layer is T5's own again
        plain, _, _ = attn(x, mask=mask)
    assert not torch.allclose(plain, out)


def test_whole_encoder_matches_layerwise_hand_computation() -> None:
    """The encoder stack passes layer 0's [0 ; bias] on to layer 1 and masks the padding."""
    adapted = adapt(prefix_projection=False, encoder_prefix=True)
    perturb(adapted)
    model, batch = adapted.model, inputs("t5")
    table = adapted.extra["encoder_prefix"]().detach()
    keep = batch["attention_mask"]
    with torch.no_grad():
        h = model.encoder.embed_tokens(batch["input_ids"])
        for i, block in enumerate(model.encoder.block):
            sa = block.layer[0]
            h = h + hand_attention(sa.SelfAttention, sa.layer_norm(h), table, i, keep,
                                   bias_from=model.encoder.block[0].layer[0].SelfAttention)
            h = block.layer[-1](h)
        expected = model.encoder.final_layer_norm(h)
    torch.testing.assert_close(run(adapted).encoder_last_hidden_state, expected)


# -------------------------------------------------------------------------------------------
# behaviour


def test_encoder_prefixes_change_the_encoder_output() -> None:
    base = run(build("t5")).encoder_last_hidden_state
    off = run(adapt()).encoder_last_hidden_state
    torch.testing.assert_close(off, base)  # PEFT's layout: the encoder is untouched
    on = run(adapt(encoder_prefix=True)).encoder_last_hidden_state
    assert not torch.allclose(on, base, atol=1e-3)


def test_encoder_prefix_values_are_used() -> None:
    adapted = adapt(prefix_projection=False, encoder_prefix=True)
    weight = adapted.extra["encoder_prefix"].embedding.weight  # [m, L·2·D]
    values = torch.zeros(weight.shape[1], dtype=torch.bool)
    for layer in range(2):
        values[(2 * layer + 1) * D:(2 * layer + 2) * D] = True
    with torch.no_grad():
        weight[:, values] = 0.0
    zero = run(adapted)
    with torch.no_grad():
        weight[:, values] = 1.0
    one = run(adapted)
    assert not torch.allclose(zero.encoder_last_hidden_state, one.encoder_last_hidden_state,
                              atol=1e-3)
    assert not torch.allclose(zero.logits, one.logits, atol=1e-3)


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_decoder_part_equals_the_plain_decoder_prefixes(method: str) -> None:
    """Same seed: the same decoder table as without encoder_prefix (the encoder's is built
    after it); with the same encoder output, the decoder computes the same logits."""
    plain, both = adapt(method), adapt(method, encoder_prefix=True)
    for name, tensor in plain.extra["prompt_encoder"].state_dict().items():
        assert torch.equal(tensor, both.extra["prompt_encoder"].state_dict()[name]), name
    assert torch.equal(pm.adapter_state_dict(plain)["prompt_embeddings"],
                       pm.adapter_state_dict(both)["prompt_embeddings"])
    out = run(both)
    encoder_outputs = (out.encoder_last_hidden_state,)
    torch.testing.assert_close(run(plain, encoder_outputs=encoder_outputs).logits, out.logits)


@pytest.mark.parametrize(("method", "options"), [("prefix_tuning", {}),
                                                 ("prefix_tuning", {"prefix_projection": False}),
                                                 ("p_tuning_v2", {})])
def test_training_moves_both_tables(method: str, options: dict) -> None:
    adapted = adapt(method, encoder_prefix=True, **options)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(n.startswith("extra.encoder_prefix.") for n in trainable)
    assert all(n.startswith(("extra.prompt_encoder.", "extra.encoder_prefix.")) for n in trainable)
    if options.get("prefix_projection", method == "prefix_tuning"):
        assert "extra.encoder_prefix.transform.2.weight" in trainable  # its own MLP
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    batch = inputs("t5") | {"labels": labels_for("t5", inputs("t5"))}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    adapted.train()
    losses = []
    for _ in range(6):
        loss = adapted(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("method", "options"), [("prefix_tuning", {}),
                                                 ("prefix_tuning", {"prefix_projection": False}),
                                                 ("p_tuning_v2", {})])
def test_save_load_round_trip_is_exact(method: str, options: dict, tmp_path: Path) -> None:
    adapted = adapt(method, encoder_prefix=True, **options)
    perturb(adapted)
    pm.save_adapter(adapted, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["encoder_prefix"] is True
    assert config["distill_method"] == method
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings", "encoder_prompt_embeddings"}
    assert tensors["prompt_embeddings"].shape == (M, 2 * 2 * D)
    assert tensors["encoder_prompt_embeddings"].shape == (M, 2 * 2 * D)  # collapsed
    loaded = pm.load_adapter(build("t5"), tmp_path / "a")
    assert loaded.method.name == method and loaded.peft_config.encoder_prefix
    assert isinstance(loaded.extra["encoder_prefix"], PromptTable)
    torch.testing.assert_close(run(loaded).logits, run(adapted).logits, rtol=0, atol=0)
    first, again = pm.adapter_state_dict(adapted), pm.adapter_state_dict(loaded)
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key


def test_off_writes_the_same_file_as_before(tmp_path: Path) -> None:
    pm.save_adapter(adapt(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "encoder_prefix" not in config and "distill_method" not in config
    assert set(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == \
        {"prompt_embeddings"}
    assert not pm.load_adapter(build("t5"), tmp_path / "a").peft_config.encoder_prefix


def test_peft_loads_the_file_but_ignores_the_encoder_part(tmp_path: Path) -> None:
    """PEFT 0.21.2 has no encoder prefixes: it reads our file as its decoder-only layout."""
    adapted = adapt(encoder_prefix=True)
    perturb(adapted)
    pm.save_adapter(adapted, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build("t5"), tmp_path / "a")
    plain_encoder = (run(build("t5")).encoder_last_hidden_state,)
    torch.testing.assert_close(run(theirs).logits,
                               run(adapted, encoder_outputs=plain_encoder).logits)


def test_generation_uses_the_encoder_prefixes() -> None:
    """Greedy generate() equals a step-by-step argmax over our forward (which runs the
    encoder with its prefixes at every step)."""
    adapted = adapt(encoder_prefix=True)
    perturb(adapted)
    batch = inputs("t5")
    with torch.no_grad():
        out = adapted.eval().generate(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"],
                                      max_new_tokens=5, do_sample=False)
        tokens = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(5):
            logits = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             decoder_input_ids=tokens).logits
            tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        beams = adapted.generate(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"], max_new_tokens=4,
                                 num_beams=2, do_sample=False)
    torch.testing.assert_close(out, tokens[:, :out.shape[1]])
    assert beams.shape[0] == 2
    for attention in (b.layer[0].SelfAttention for b in adapted.model.encoder.block):
        assert not attention._forward_pre_hooks


def test_encoder_table_follows_the_encoder_depth() -> None:
    """3 encoder layers, 2 decoder layers: the decoder table has 2 layers, the encoder's 3."""
    config = build("t5").config
    config.num_layers, config.num_decoder_layers = 3, 2
    torch.manual_seed(0)
    adapted = apply(T5ForConditionalGeneration(config).eval(), "p_tuning_v2",
                    num_virtual_tokens=M, num_layers=2, encoder_prefix=True)
    state = pm.adapter_state_dict(adapted)
    assert state["prompt_embeddings"].shape == (M, 2 * 2 * D)
    assert state["encoder_prompt_embeddings"].shape == (M, 3 * 2 * D)
    assert run(adapted).logits.shape == (2, 5, VOCAB)


# -------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_encoder_prefix_needs_an_encoder_decoder_model(family: str, method: str) -> None:
    with pytest.raises(PeftMethodError, match="encoder_prefix needs an encoder–decoder model"):
        apply(build(family), method, encoder_prefix=True)


def test_bad_encoder_prefix_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(PeftMethodError, match="Unsupported `encoder_prefix` 'yes'"):
        apply(build("t5"), "prefix_tuning", encoder_prefix="yes")
    model = build("t5")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(PeftMethodError, match="eager and sdpa"):
        apply(model, "prefix_tuning", encoder_prefix=True)
    pm.save_adapter(adapt(encoder_prefix=True), tmp_path / "a")
    path = str(tmp_path / "a" / "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({"prompt_embeddings": tensors["prompt_embeddings"]}, path)
    with pytest.raises(PeftMethodError, match="no `encoder_prompt_embeddings`"):
        pm.load_adapter(build("t5"), tmp_path / "a")
    save_file({"prompt_embeddings": tensors["prompt_embeddings"],
               "encoder_prompt_embeddings":
                   tensors["encoder_prompt_embeddings"][:, :64].contiguous()}, path)
    with pytest.raises(PeftMethodError, match="encoder_prompt_embeddings has shape"):
        pm.load_adapter(build("t5"), tmp_path / "a")
