"""Every benchmark runs on the current code (benchmarks/smoke.py, ``make bench-smoke``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.py"


def _smoke():
    spec = importlib.util.spec_from_file_location("bench_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_has_a_smoke_run():
    smoke = _smoke()
    assert smoke.unlisted() == []
    assert all((SMOKE.parent / name).is_file() for name in smoke.SMOKE)


@pytest.mark.slow
def test_every_benchmark_runs_at_its_smallest_size():
    done = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
