"""QLoRA: LoRA in full precision on top of a frozen base stored as 4-bit NormalFloat (NF4).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", implemented here in
plain torch (no bitsandbytes):

- **NF4.** 16 code values, the quantiles of N(0, 1) scaled to [-1, 1], with an exact zero:
  8 positive quantiles of `linspace(δ, ½, 9)`, 7 negative of `linspace(δ, ½, 8)`, and 0,
  with δ = 1 − ½(1/30 + 1/32) (bitsandbytes `create_normal_map`, offset 0.9677083).
- **Block-wise absmax.** The weight is flattened into blocks of 64; each block is divided by
  its largest |w| (its *absmax*, one fp32 per block) and every value is replaced by the index
  of the nearest code value. Two 4-bit indices are packed into one uint8 (first one in the
  high nibble, as bitsandbytes).
- **Double quantization** (optional, on by default as in the paper). The fp32 absmax scales
  (0.5 bits/weight) are themselves quantized: their mean is subtracted and the centred values
  are stored as 8-bit codes in blocks of 256 with one fp32 scale per block (≈0.127
  bits/weight). The paper uses bitsandbytes' 8-bit *dynamic float* code for this; here the
  8-bit code is linear (symmetric int8), whose error is far below the NF4 error it scales.
- **Forward.** The weight is dequantized on the fly to the compute dtype and used in a normal
  `F.linear`; only the LoRA matrices train.

Memory per weight: NF4 0.5 B + 4/64 B = 0.5625 B (3.6× smaller than bf16), with double
quantization ≈ 0.516 B (3.9×). `bench/qlora_memory.py` measures it on SmolLM2-135M.

The adapter is saved as plain LoRA (`peft_type` LORA), so PEFT loads it on the
full-precision base; outputs then differ by the quantization error only. The quantized base
itself is never saved. At init the model equals the *quantized* base (B = 0), not the
original one, hence `identity_at_init = False`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    PeftMethodError,
    find_targets,
    linear_dims,
    register,
    replace_module,
)
from peft_methods.lora import LoRA, LoraConfig, resolve_targets

NF4_OFFSET = 0.9677083  # δ = 1 − ½(1/30 + 1/32), as bitsandbytes writes it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, sorted, in [-1, 1] with an exact 0. Shape [16], float32.

    Like bitsandbytes' `create_normal_map(0.9677083, use_extra_value=True)`: the probability
    grid in float32, the normal quantiles (inverse CDF) in float64.
    """
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.max()).float()


def quantize_nf4(weight: torch.Tensor, block_size: int = 64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax NF4 quantization.

    Args:
        weight: any shape, N elements; zero-padded to a whole number of blocks.
        block_size: elements per absmax block (even).

    Returns:
        packed: uint8 [ceil(N / block_size) · block_size / 2], two 4-bit codes per byte
            (element 2i in the high nibble, 2i+1 in the low one).
        absmax: float32 [ceil(N / block_size)], max |w| of each block.
    """
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    # an all-zero block: any scale works; 1 keeps the division finite
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    code = nf4_code().to(flat.device)
    # nearest code value = the bucket between consecutive midpoints
    idx = torch.bucketize(normed.reshape(-1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, numel: int,
                   code: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_nf4`: float32 [numel] (reshape to the weight's shape)."""
    idx = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1).long()
    values = code[idx].view(absmax.numel(), -1) * absmax.float()[:, None]
    return values.reshape(-1)[:numel]


def quantize_scales_8bit(absmax: torch.Tensor, block_size: int = 256
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: the absmax scales as 8-bit codes around their mean.

    Args:
        absmax: float32 [M], positive.
    Returns:
        codes: int8 [M]; scales: float32 [ceil(M / block_size)]; offset: float32 [1].
    """
    offset = absmax.mean().reshape(1)
    centred = absmax - offset
    pad = (-centred.numel()) % block_size
    blocks = F.pad(centred, (0, pad)).view(-1, block_size)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:absmax.numel()], scales, offset


def dequantize_scales_8bit(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
                           block_size: int = 256) -> torch.Tensor:
    """Inverse of `quantize_scales_8bit`: float32 [M]."""
    pad = (-codes.numel()) % block_size
    blocks = F.pad(codes.float(), (0, pad)).view(-1, block_size)
    values = blocks / 127 * scales.float()[:, None] + offset.float()
    return values.reshape(-1)[:codes.numel()]


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized in `forward`.

    Buffers: `qweight` uint8 [N/2] (tagged with `logical_numel` = out·in, so
    `trainable_report` counts the weight's elements), and either `absmax` float32 [N/64] or,
    with double quantization, `absmax_codes` int8 [N/64], `absmax_scales` float32
    [N/64/256], `absmax_offset` float32 [1]. The bias (if any) stays a frozen parameter.

    Shapes: x [..., in] -> [..., out]. A GPT-2 Conv1D (weight [in, out]) is stored transposed,
    as [out, in]; `fan_in_fan_out` remembers where it came from.
    """

    def __init__(self, base: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                 dq_block_size: int = 256, compute_dtype: torch.dtype | None = torch.float32
                 ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_dims(base)
        self.fan_in_fan_out = type(base).__name__ == "Conv1D"
        self.block_size, self.dq_block_size = block_size, dq_block_size
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        weight = base.weight.detach()
        weight = weight.T if self.fan_in_fan_out else weight  # [out, in]
        packed, absmax = quantize_nf4(weight, block_size)
        self.register_buffer("qweight", packed)
        if double_quant:
            codes, scales, offset = quantize_scales_8bit(absmax, dq_block_size)
            self.register_buffer("absmax_codes", codes)
            self.register_buffer("absmax_scales", scales)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)
        # the code book is a constant, not state: not saved in state_dict
        self.register_buffer("code", nf4_code().to(weight.device), persistent=False)
        self.bias = base.bias  # full precision; frozen like every base parameter
        self._tag()

    def _tag(self) -> None:
        self.qweight.logical_numel = self.in_features * self.out_features

    def _apply(self, fn, recurse: bool = True):  # torch's signature
        # `.to(torch.bfloat16)` / `.half()` on the model would also cast the fp32 scales and
        # code book and lose precision (bitsandbytes keeps them fp32 too): move them, never
        # cast them. And `.to()` replaces the buffer tensors, losing the `logical_numel` tag.
        keep = {k: b for k, b in self._buffers.items()
                if b is not None and b.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for k, old in keep.items():
            self._buffers[k] = old.to(self._buffers[k].device)
        self._tag()
        return out

    def scales(self) -> torch.Tensor:
        """The per-block absmax, float32 [N/64] (dequantized first with double quant)."""
        if self.double_quant:
            return dequantize_scales_8bit(self.absmax_codes, self.absmax_scales,
                                          self.absmax_offset, self.dq_block_size)
        return self.absmax.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, [out, in], in `dtype` (default the compute dtype)."""
        w = dequantize_nf4(self.qweight, self.scales(), self.in_features * self.out_features,
                           self.code)
        return w.view(self.out_features, self.in_features).to(dtype or self.compute_dtype
                                                              or torch.float32)

    # HF code reads `layer.weight` (T5 checks its dtype); this materialises it
    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        w = self.dequantize(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), w, bias).to(x.dtype)

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight (codes, scales, code book), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nf4 block={self.block_size}, double_quant={self.double_quant}")


# --------------------------------------------------------------------------------------------
# config and method


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA options (defaulting to every linear layer, as in the QLoRA paper) plus the
    quantization of the frozen base."""

    # Which linear layers LoRA adapts; default all linear layers (the paper's choice).
    target_modules: list[str] | str | None = "all-linear"
    # Which frozen layers are stored in NF4: "all-linear" (every linear layer except the
    # output layer / task head and modules_to_save) or "targets" (only the LoRA targets).
    quantize: str = "all-linear"
    # Elements per absmax block (the paper's 64); even.
    quant_block_size: int = 64
    # Quantize the absmax scales too (8-bit, blocks of `double_quant_block_size`).
    double_quant: bool = True
    # Absmax values per second-level block (the paper's 256).
    double_quant_block_size: int = 256
    # dtype the weight is dequantized to and the matmul runs in: "float32", "bfloat16",
    # "float16", or None = the input's dtype.
    compute_dtype: str | None = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize not in ("all-linear", "targets"):
            raise PeftMethodError(f"Unsupported `quantize` {self.quantize!r}. Supported "
                                  f"values are 'all-linear', 'targets'")
        for key in ("quant_block_size", "double_quant_block_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 \
                    or value % 2:
                raise PeftMethodError(f"Unsupported `{key}` {value!r}. Supported values are "
                                      f"positive even integers (64 and 256 in the paper)")
        if not isinstance(self.double_quant, bool):
            raise PeftMethodError(f"Unsupported `double_quant` {self.double_quant!r}. "
                                  f"Supported values are true, false")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise PeftMethodError(f"Unsupported `compute_dtype` {self.compute_dtype!r}. "
                                  f"Supported values are {', '.join(map(repr, DTYPES))}, null")


@register
class QLoRA(LoRA):
    """LoRA on an NF4-quantized frozen base. Not mergeable (the base has no full-precision
    weight to merge into); saved as plain LoRA plus the quantization options."""

    name = "qlora"
    config_cls = QLoraConfig
    mergeable = False
    identity_at_init = False  # equal to the quantized base at init, see the module docstring

    def inject(self, adapted: AdaptedModel) -> None:
        config: QLoraConfig = adapted.peft_config
        model = adapted.model
        targets = resolve_targets(adapted, config.target_modules, method=self.name)
        if config.quantize == "targets":
            quantized = targets
        else:
            saved = adapted.modules_to_save
            inside = [n for n, _ in model.named_modules()
                      if any(n == s or n.startswith(s + ".") for s in saved)]
            quantized = find_targets(model, "all-linear", method=self.name, exclude=inside)
        dtype = DTYPES[config.compute_dtype] if config.compute_dtype else None
        for name in quantized:
            replace_module(model, name, NF4Linear(
                model.get_submodule(name), block_size=config.quant_block_size,
                double_quant=config.double_quant, dq_block_size=config.double_quant_block_size,
                compute_dtype=dtype))
        for name in targets:
            replace_module(model, name, self.make_layer(model.get_submodule(name), config))


def quantized_layers(model: nn.Module) -> dict[str, NF4Linear]:
    """The NF4 layers of a model, by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
