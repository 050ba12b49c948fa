"""Extraction helpers the extraction, store-promise and classifier tests share: real slides
(copies of CMU-1-Small-Region), a one-conv encoder, a cohort of them, and the one harness that
runs an extraction in a fresh interpreter (to kill it, or race two)."""

import os
import subprocess
import sys
from pathlib import Path

from fpstore.cohort.cohorts import add_cohort
from fpstore.extract.config import ExtractConfig

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"
SLIDES = [f"S{i}" for i in range(6)]

# A tiny encoder (one strided conv) so that the loop, not the model, is what runs; ``delay``
# slows each batch so that a test can kill or race a run in the middle; with ``gate`` the
# first batch leaves ``<gate>.<pid>`` and waits for the file ``gate``, so that a test can hold
# runs that have all planned their slides and release them together.
TINY = """
import os, pathlib, time, torch
from fpstore.encoders.base import Encoder, Preprocessing, state_dict_hash
from fpstore.encoders.registry import register_encoder, list_encoders

class _Tiny(torch.nn.Module):
    def __init__(self, delay, gate=None):
        super().__init__()
        self.delay = delay
        self.gate = None if gate is None else pathlib.Path(gate)
        self.conv = torch.nn.Conv2d(3, 8, 16, 16)
    def forward(self, x):
        if self.gate is not None:
            self.gate.with_name(f"{self.gate.name}.{os.getpid()}").touch()
            while not self.gate.exists():
                time.sleep(0.05)
            self.gate = None
        if self.delay:
            time.sleep(self.delay)
        return self.conv(x).mean((2, 3))

def tiny(delay=0.0, gate=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = _Tiny(delay, gate)
    return Encoder("tiny", net, 8, Preprocessing(), state_dict_hash(net), "test encoder")

if "tiny" not in list_encoders():
    register_encoder("tiny")(tiny)
"""
exec(TINY)


def config(**kw):
    return ExtractConfig(
        **{
            "encoder": "tiny",
            "patches": 20,
            "device": "cpu",
            "num_workers": 0,
            "batch_size": 8,
            "chunk_size": 8,
            **kw,
        }
    )


def make_store(tmp_path, slides=SLIDES, name="c"):
    """A cohort of real slides, one patient each (three sites), under tmp_path/store."""
    folder = tmp_path / "slides"
    folder.mkdir(exist_ok=True)
    for slide in slides:
        if not (folder / f"{slide}.svs").exists():
            (folder / f"{slide}.svs").symlink_to(CMU)
    labels = tmp_path / f"{name}-labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"P{s},{folder / s}.svs,{'Positive' if i % 2 else 'Negative'},Negative,Negative,"
            f"{'ABC'[i % 3]}\n"
            for i, s in enumerate(slides)
        )
    )
    store = tmp_path / "store"
    add_cohort(store, name, clinical=labels, fmt="csv", force=True)
    return store, labels


def start_extraction(
    tmp_path, store, name, delay=0.15, patches=None, seed=0, force=False, batch_size=16, gate=None
):
    """An extraction in a fresh interpreter; its last stdout line is the summary JSON.
    ``gate``: its encoder waits for this file (see TINY)."""
    options = {"delay": delay, **({} if gate is None else {"gate": str(gate)})}
    return python_script(
        tmp_path / f"{name}.py",
        TINY
        + "\nimport json\nfrom fpstore.extract.config import ExtractConfig\n"
        + "from fpstore.extract.run import extract\n"
        + f"cfg = ExtractConfig(encoder='tiny', encoder_options={options!r}, "
        + f"patches={patches!r}, seed={seed}, force={force}, device='cpu', num_workers=1, "
        + f"batch_size={batch_size}, chunk_size={batch_size})\n"
        + f"s = extract({str(store)!r}, 'c', cfg, progress=False)\n"
        + "print(json.dumps(s.to_dict()))\n"
        + "raise SystemExit(1 if s.failed else 0)\n",
    )


def python_script(path: Path, code: str) -> subprocess.Popen:
    """``code`` written to ``path`` and started in a fresh interpreter that imports this
    tree (stdout and stderr piped, as text)."""
    path.write_text(code)
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
