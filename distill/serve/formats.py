"""Writing a model in a serving format: one self-contained folder per artifact.

Every folder holds the model's `config.json` and tokenizer files beside its weights, so a
server needs nothing else; it is written to a temporary folder that takes its place only
when complete (`distill.files.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.files import atomic_directory
from distill.models.loading import save_model

FORMATS = ("bf16", "onnx", "onnx-int8")
# What the ONNX formats import (the `serve` extra of pyproject.toml).
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_FILE = "model.onnx"
# ONNX keeps a graph in one protobuf of at most 2 GB; larger weights go beside it.
_PROTOBUF_LIMIT = 2**31 - 2**26


def missing_packages(fmt: str) -> list[str]:
    """The packages `fmt` needs that are not installed."""
    import importlib.util

    if not fmt.startswith("onnx"):
        return []
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


class LogitsOnly(nn.Module):
    """`model` as a function of (input_ids [B, n], attention_mask [B, n]) -> logits, the
    graph an ONNX file holds (no cache, no other outputs)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        # Decoders would also return their key/value cache: a server of logits wants none.
        self.options = ({"use_cache": False}
                        if "use_cache" in inspect.signature(model.forward).parameters else {})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          **self.options).logits


def write(fmt: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path,
          example: dict[str, Tensor]) -> Path:
    """Write `model` (float32, eval mode; left unchanged) as `fmt` into the folder `out`.

    Args:
        fmt: one of `FORMATS`.
        example: input_ids / attention_mask [B, n] the ONNX export traces (its batch and
            sequence sizes stay free in the graph).
    """
    if fmt not in FORMATS:
        raise DistillError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "bf16":
        return save_model(copy.deepcopy(model).to(torch.bfloat16), tokenizer, out)
    with atomic_directory(out) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _export_onnx(model, example, tmp / ONNX_FILE)
        if fmt == "onnx-int8":
            _quantize_int8(tmp / ONNX_FILE)
    return out


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from `logger` ("" = the root logger) meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _export_onnx(model: PreTrainedModel, example: dict[str, Tensor], path: Path) -> None:
    """`torch.onnx.export` (the dynamo exporter) with free batch and sequence sizes."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    # The exporter's notes on its own internals (e.g. that torchvision's ops are skipped).
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            LogitsOnly(model).eval(), (), kwargs=dict(example), dynamo=True,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes=shapes, external_data=size >= _PROTOBUF_LIMIT, verbose=False)
    assert program is not None
    program.save(str(path), external_data=size >= _PROTOBUF_LIMIT)


def _quantize_int8(path: Path) -> None:
    """Replace the ONNX file at `path` by ONNX Runtime's dynamic int8 quantization of it:
    matrix weights stored as int8 with a scale, activations quantized per call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if any(path.parent.glob(f"{path.name}.*")):  # weights beside the graph: over 2 GB
        raise DistillError("onnx-int8: a model whose float32 graph keeps its weights in an "
                           "external file (over 2 GB) is not supported; export onnx or bf16")
    source = path.with_name("fp32-" + path.name)
    model = onnx.load(str(path))
    # The exporter records the shapes it traced for intermediate values; the quantizer's
    # shape inference then finds the traced batch size where the graph says it is free.
    del model.graph.value_info[:]
    onnx.save(model, str(source))
    path.unlink()
    with _quiet(""):  # its advice to pre-process, logged on the root logger at each call
        # One scale per output channel: on a MiniLM student cut to 3 layers and MLPs of 768
        # one scale per matrix lost 0.7 points of test accuracy, per channel none, at the
        # same speed (Rotten Tomatoes, 1,280 examples).
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8,
                         per_channel=True)
    source.unlink()  # the float graph (external weights were refused above)
