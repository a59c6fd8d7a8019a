"""QLoRA: our NF4 quantization (code book, packing, error, memory) and the LoRA adapter on
top, whose saved files PEFT loads on the full-precision base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

import peft_methods as pm
from peft_methods.qlora import (NF4Linear, dequantize_nf4, dequantize_scales_8bit, nf4_code,
                                quantize_nf4, quantize_scales_8bit, quantized_layers)
from tiny_models import FAMILIES, apply, build, inputs, labels_for, logits

# The NF4 data type as published: bitsandbytes `functional.py` (the `get_4bit_type("nf4")`
# table, produced by `create_normal_map(offset=0.9677083)`), also listed in the QLoRA paper's
# appendix (Dettmers et al. 2023, "NormalFloat 4-bit data type").
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
TO_SAVE = {"bert": ["classifier", "pooler"]}


def randomize_lora(model: torch.nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or ".classifier." in f".{name}" or ".pooler." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def linear(out_features: int, in_features: int, seed: int = 0, std: float = 0.02
           ) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    torch.nn.init.normal_(layer.weight, std=std)
    return layer


def fake_quantized(family: str, **qopts) -> torch.nn.Module:
    """The full-precision model with every all-linear weight replaced by its NF4 round trip
    (what the quantized base computes, without the quantized storage)."""
    model = build(family)
    adapted = apply(build(family), "qlora", modules_to_save=TO_SAVE.get(family), **qopts)
    modules = dict(model.named_modules())
    for path, q in quantized_layers(adapted.model).items():
        path = path.removesuffix(".base_layer")
        w = q.dequantize(torch.float32)
        with torch.no_grad():
            modules[path].weight.copy_(w.T if q.fan_in_fan_out else w)
    return model


# --------------------------------------------------------------------------------------------
# NF4 itself


def test_nf4_code_matches_bitsandbytes() -> None:
    code = nf4_code()
    assert code.shape == (16,) and code[7] == 0 and code[0] == -1 and code[-1] == 1
    torch.testing.assert_close(code, torch.tensor(BITSANDBYTES_NF4), rtol=0, atol=1e-7)


def test_packing_two_codes_per_byte_high_nibble_first() -> None:
    code = nf4_code()
    idx = torch.tensor([15, 0, 7, 8, 3, 12] + [7] * 58)  # one block of 64
    packed, absmax = quantize_nf4(code[idx] * 2.5, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == 32
    assert absmax.tolist() == [2.5]
    assert packed[:3].tolist() == [(15 << 4) | 0, (7 << 4) | 8, (3 << 4) | 12]
    # exact code values times the absmax come back exactly
    torch.testing.assert_close(dequantize_nf4(packed, absmax, 64, code), code[idx] * 2.5)


def test_round_trip_error_bound_and_padding() -> None:
    torch.manual_seed(0)
    w = torch.randn(3 * 64 + 10) * 0.05  # not a whole number of blocks: zero-padded
    packed, absmax = quantize_nf4(w, block_size=64)
    assert packed.numel() == 4 * 32 and absmax.numel() == 4
    back = dequantize_nf4(packed, absmax, w.numel(), nf4_code())
    # nearest-value rounding: error ≤ half the widest gap of the code book, times the absmax
    code = nf4_code()
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    block_absmax = torch.repeat_interleave(absmax, 64)[:w.numel()]
    assert ((back - w).abs() <= half_gap * block_absmax + 1e-7).all()
    assert ((back - w).norm() / w.norm()).item() < 0.12  # ~0.09 for Gaussian weights


def test_double_quantization_of_scales() -> None:
    torch.manual_seed(0)
    absmax = torch.rand(1000) * 0.1 + 0.05
    codes, scales, offset = quantize_scales_8bit(absmax, block_size=256)
    assert codes.dtype == torch.int8 and scales.numel() == 4 and offset.numel() == 1
    back = dequantize_scales_8bit(codes, scales, offset, block_size=256)
    # symmetric 8-bit: error ≤ half a step = (max |centred| of the block) / 254
    step = torch.repeat_interleave(scales, 256)[:1000] / 254
    assert ((back - absmax).abs() <= step + 1e-7).all()


@pytest.mark.parametrize("double_quant, ratio", [(False, 3.5), (True, 3.8)])
def test_memory_ratio_versus_bf16(double_quant: bool, ratio: float) -> None:
    layer = linear(256, 256)
    q = NF4Linear(layer, double_quant=double_quant)
    bf16_bytes = layer.weight.numel() * 2
    assert q.quantized_bytes() * ratio <= bf16_bytes
    assert not any(b.is_floating_point() and b.numel() >= layer.weight.numel()
                   for b in q.buffers())  # no full-size float copy kept
    err = (q.dequantize() - layer.weight).norm() / layer.weight.norm()
    assert err.item() < 0.12


def test_nf4_linear_forward_matches_dequantized_weight_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = linear(48, 40)
    q = NF4Linear(layer, double_quant=True)
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), layer.bias))
    conv = Conv1D(48, 40)  # weight [in=40, out=48]
    torch.nn.init.normal_(conv.weight, std=0.02)
    qc = NF4Linear(conv, double_quant=False)
    assert qc.fan_in_fan_out and qc.dequantize().shape == (48, 40)
    torch.testing.assert_close(qc(x), conv(x), rtol=0, atol=0.1 * conv(x).abs().max().item())
    # bf16 compute: output keeps the input's dtype
    qb = NF4Linear(layer, compute_dtype=torch.bfloat16)
    assert qb(x).dtype == torch.float32


def test_casting_the_model_keeps_quantization_state_fp32() -> None:
    layer = linear(64, 64)
    q = NF4Linear(layer, double_quant=True)
    expected = q(torch.randn(2, 64))
    q.to(torch.bfloat16)
    assert {b.dtype for n, b in q.named_buffers() if n != "qweight"} <= {torch.float32,
                                                                         torch.int8}
    assert q.qweight.logical_numel == 64 * 64  # the tag survives the buffer replacement
    torch.testing.assert_close(q.dequantize(), NF4Linear(layer).dequantize())
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert expected.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# the method


@pytest.mark.parametrize("family", FAMILIES)
def test_base_is_quantized_and_counted(family: str) -> None:
    fp = build(family)
    model = apply(build(family), "qlora", r=4, modules_to_save=TO_SAVE.get(family))
    layers = quantized_layers(model.model)
    assert layers and all(q.qweight.dtype == torch.uint8 for q in layers.values())
    # every linear layer except the output layer / head / saved modules is quantized
    kept = [n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)
            and not n.endswith(("lora_A", "lora_B"))]
    assert all(n.split(".")[0] in ("lm_head", "classifier") or ".pooler." in f".{n}."
               for n in kept), kept
    report = pm.trainable_report(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    saved = sum(p.numel() for n, p in model.named_parameters()
                if p.requires_grad and "lora_" not in n)
    assert report["total_params"] == sum(p.numel() for p in fp.parameters()) + lora
    assert report["trainable_params"] == lora + saved


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_relative_to_quantized_base(family: str) -> None:
    """B = 0 at init: the model computes exactly what the NF4-rounded base computes."""
    assert not pm.get_method("qlora").identity_at_init
    model = apply(build(family), "qlora", modules_to_save=TO_SAVE.get(family))
    torch.testing.assert_close(logits(model, family), logits(fake_quantized(family), family),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_in_peft_on_full_precision_base(family: str, tmp_path) -> None:
    model = apply(build(family), "qlora", r=4, modules_to_save=TO_SAVE.get(family))
    randomize_lora(model, scale=0.05)  # changes the logits by 10-500 %, like a trained adapter
    model.eval()
    pm.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["distill_method"] == "qlora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT names the quantization keys it does not know
        on_fp = PeftModel.from_pretrained(build(family), tmp_path / "a").eval()
        on_nf4 = PeftModel.from_pretrained(fake_quantized(family), tmp_path / "a").eval()
    ours = logits(model, family)
    # on the NF4-rounded base PEFT computes what we compute ...
    torch.testing.assert_close(logits(on_nf4, family), ours, rtol=1e-4, atol=1e-4)

    # ... and on the original base it differs by the quantization error only: about as much
    # as the two bases differ without an adapter (relative to the logits' spread; measured
    # 0.002 (bert) to 0.15 (t5) on these 32-wide random models, where errors do not average
    # out as in real ones: see bench/qlora_memory.py)
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / (b - b.mean()).norm()).item()

    base_err = rel(logits(fake_quantized(family), family), logits(build(family), family))
    adapter_err = rel(ours, logits(on_fp, family))
    assert 0 < adapter_err <= 1.5 * base_err + 0.01 and adapter_err < 0.2, \
        (adapter_err, base_err)
    # our loader re-quantizes the fresh base and gets our logits back
    again = pm.load_adapter(build(family), tmp_path / "a")
    assert again.method.name == "qlora" and quantized_layers(again.model)
    torch.testing.assert_close(logits(again, family), ours)


def test_only_lora_trains_and_gradients_reach_it() -> None:
    model = apply(build("llama"), "qlora", r=4)
    model.train()
    batch = inputs("llama")
    out = model(**batch, labels=labels_for("llama", batch))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_B" in n)


def test_targets_only_quantization_and_options() -> None:
    model = apply(build("llama"), "qlora", target_modules=["q_proj"], quantize="targets",
                  double_quant=False, compute_dtype=None)
    layers = quantized_layers(model.model)
    assert layers and all(n.endswith("q_proj.base_layer") for n in layers)
    assert all(hasattr(q, "absmax") and not q.double_quant for q in layers.values())


def test_not_mergeable() -> None:
    model = apply(build("llama"), "qlora")
    with pytest.raises(pm.PeftMethodError, match="cannot be merged"):
        pm.merge(model)


@pytest.mark.parametrize("options, message", [
    ({"quantize": "everything"}, "Unsupported `quantize` 'everything'. Supported values"),
    ({"quant_block_size": 63}, "Unsupported `quant_block_size` 63"),
    ({"compute_dtype": "int8"}, "Unsupported `compute_dtype` 'int8'"),
    ({"double_quant": "yes"}, "Unsupported `double_quant`"),
])
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(pm.PeftMethodError, match=message.replace("`", ".")):
        apply(build("llama"), "qlora", **options)
