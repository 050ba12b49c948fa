"""Shared fixtures.

``synth_small``: the ``small`` synthetic set (what ``fpstore synth --preset small --seed 0``
writes; layout in docs/ARCHITECTURE.md), made once per test session. Read what it holds
from ``synth_small / "manifest.json"`` and ``synth_small / "truth" / "truth.json"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    from fpstore.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "small"
    synthesize("small", out, seed=0, progress=False)
    return out
