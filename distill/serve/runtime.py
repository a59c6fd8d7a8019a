"""Loading an exported artifact as a model the task's scoring and timing can call.

`load(fmt, folder)` returns an `nn.Module` whose `forward(input_ids=, attention_mask=)`
returns an object with `.logits` (a float32 tensor), like a Hugging Face model's output:
for `bf16` the Hugging Face model itself (bfloat16 weights, bfloat16 compute), for the ONNX
formats an ONNX Runtime session on the CPU with as many threads as torch uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from distill.serve.formats import ONNX_FILE


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind the Hugging Face call convention (CPU)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The same cores as the PyTorch models it is compared with, not ORT's own default.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        # Where `model_device` looks (the first parameter): the inputs stay on the CPU.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        feeds = {"input_ids": input_ids.cpu().numpy(),
                 "attention_mask": attention_mask.cpu().numpy()}
        (logits,) = self.session.run(["logits"], feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def load(fmt: str, folder: Path, load_hf: Callable[[Path], nn.Module]) -> nn.Module:
    """The artifact in `folder` (written by `formats.write`) ready to run, in eval mode.

    `load_hf(folder)` loads a Hugging Face folder as the task's model (for `bf16`)."""
    if fmt == "bf16":
        return load_hf(folder).eval()
    return OnnxModel(Path(folder) / ONNX_FILE).eval()
