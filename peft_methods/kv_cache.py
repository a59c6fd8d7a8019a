"""Where a model takes its KV cache: `cache` from transformers 5.24 on, `past_key_values` before.

transformers 5.24 renamed the cache argument of every model and attention `forward` (and the
key `prepare_inputs_for_generation` returns) from `past_key_values` to `cache`; the old name is
still accepted through a deprecation shim, but signatures show only the new one. The methods
that carry their state in the cache (prefix tuning, P-tuning v2, UniPELT's prefix, T5 encoder
prefixes) ask here for the name instead of spelling it, so they work on both sides of the rename.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

# The newer name first: a signature that has it is 5.24+.
CACHE_NAMES = ("cache", "past_key_values")
# How error messages name the argument, whichever transformers is installed.
SPELLED = "`cache` (`past_key_values` before transformers 5.24)"


def cache_arg(module: nn.Module | None) -> str | None:
    """The name of the KV-cache parameter of `module.forward`, or None if it takes none."""
    if module is None:
        return None
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def given_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache among a call's keyword arguments, under either name (None if there is none)."""
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
