"""The public Python API: every advertised name resolves."""

from __future__ import annotations

import distill


def test_every_public_name_resolves() -> None:
    for name in distill.__all__:
        assert callable(getattr(distill, name)) or isinstance(getattr(distill, name), type), name
