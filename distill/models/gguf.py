"""GGUF checkpoints -> cached Hugging Face model directories.

A `.gguf` file (llama.cpp's format; the packaged SmolLM2 is one) is read once with
transformers' GGUF support, which dequantizes every tensor to float32 and rebuilds the config
and tokenizer from the file's metadata. That takes ~12 s for SmolLM2-135M, so the result is
saved once as an ordinary HF directory (config.json + model.safetensors + tokenizer files) and
every later load reads that directory (~0.2 s):

    hf_dir = gguf_to_hf("/models/model.gguf")        # converts on first use only
    model = AutoModelForCausalLM.from_pretrained(hf_dir)

Cache layout: `$DISTILL_CACHE` (default `~/.cache/distill`) / `gguf` / `<stem>-<size>-<mtime_ns>`.
The key changes whenever the file is replaced or touched, so a stale conversion is never used
(old folders are left for the user to delete). A conversion is written into a temp folder beside
its target and renamed into place with `os.replace`, so an interrupted conversion leaves at most
a hidden `.tmp-*` folder (removed by the next conversion of the file once an hour old), never a
half-filled cache entry that later loads would trust.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.files import cache_root

GGUF_SUFFIX = ".gguf"
# Written last into a conversion: its presence is what marks a cache entry as complete (the
# rename is atomic already; this also guards against folders created by other means).
_DONE_MARKER = ".distill-gguf-complete"
_STALE_SECONDS = 3600


def cache_dir_for(gguf_path: str | Path) -> Path:
    """The cache folder a GGUF file converts into, keyed by file name, size and mtime."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return cache_root() / "gguf" / f"{stem}-{stat.st_size}-{stat.st_mtime_ns}"


def is_converted(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion."""
    return (out_dir / _DONE_MARKER).is_file() and (out_dir / "config.json").is_file()


def gguf_to_hf(gguf_path: str | Path) -> Path:
    """The cached HF directory of a GGUF file, converting it on first use.

    Args:
        gguf_path: a local `.gguf` file of an architecture transformers can read from GGUF
            (llama, mistral, qwen2, ...).

    Returns:
        A directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load
        without any GGUF support: float32 safetensors weights, no quantization config.

    Raises:
        DistillError: the file is missing, is not a `.gguf`, transformers cannot read it, it
            is an encoder–decoder file (read wrongly by transformers 5.23-5.25), or it leaves
            some of the model's weights unset.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise DistillError(f"GGUF file not found: {gguf_path}")
    if path.suffix.lower() != GGUF_SUFFIX:
        raise DistillError(f"{gguf_path}: not a GGUF file (expected the suffix {GGUF_SUFFIX})")
    out_dir = cache_dir_for(path)
    if is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is an ordinary folder
    try:
        _convert(path.resolve(), tmp)
        (tmp / _DONE_MARKER).write_text(f"{path.resolve()}\n")
        if out_dir.exists() and not is_converted(out_dir):
            # Not made by this code (ours appear complete, by rename): not to be trusted.
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first (the target exists and is
            # not empty): theirs is as good as ours. Anything else is a real error.
            if not is_converted(out_dir):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temp folders of this entry left by killed conversions (a live conversion takes
    seconds to a minute; anything untouched for an hour is dead, and is ~4 bytes per weight)."""
    cutoff = time.time() - _STALE_SECONDS
    for old in out_dir.parent.glob(f".tmp-{out_dir.name}-*"):
        try:
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _convert(path: Path, out_dir: Path) -> None:
    """Dequantize `path` into a plain float32 HF model and save it (with its tokenizer).

    Decoder-only files (llama, mistral, qwen2, qwen3, phi3, gpt2, gemma2, gemma3, ...: the
    architectures transformers reads from GGUF, tests/test_gguf_families.py) load as causal
    LMs. Encoder–decoder files (T5) are refused: transformers 5.23-5.25 rebuild them with a gated
    ReLU feed-forward and scaled decoder outputs whatever the file holds (a flan-T5 file loads
    as another function, silently). A file whose tensors leave some of the model's weights
    unset is refused too, rather than saved with those weights at random init.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        file_config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if file_config.is_encoder_decoder:
            raise DistillError(
                f"{path}: an encoder–decoder GGUF ({file_config.model_type}); transformers "
                f"{transformers.__version__} rebuilds these with the wrong feed-forward "
                f"activation and output scaling, so distill does not read them; give the "
                f"original checkpoint instead")
        loaded, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise DistillError(f"{path}: transformers could not read this GGUF file "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise DistillError(f"{path}: the file has no tensors for {len(missing)} weights of "
                           f"{type(loaded).__name__} ({', '.join(missing[:3])}, ...); "
                           f"transformers would leave them at random init")

    config = loaded.config
    # The GGUF loader records how the file was quantized; the weights are already plain
    # float32, and a saved quantization_config would make from_pretrained look for a
    # quantizer that does not apply. So the config drops it, and the model is rebuilt from
    # the clean config (a fresh class instance carries no loader state either).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config)
    # strict: every tensor of the plain class must come from the file (tied weights appear
    # under both names in the state dict and load into the one shared tensor).
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
