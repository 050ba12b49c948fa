"""Every benchmark at its smallest size, so that a change to the store or the library
cannot silently break one (``make bench-smoke``; tests/test_bench_smoke.py runs it).

Each script runs as a fresh process in a scratch folder with the arguments below; the
figures are not checked, only that each script runs to the end. gpu_check.sh runs only
where CUDA is present. Exits non-zero naming the scripts that failed, with their last lines.

    python benchmarks/smoke.py                 # all
    python benchmarks/smoke.py bench_stain bench_tma   # some
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script -> its smallest run; "{tmp}" is the scratch folder, "{synth}" / "{store}" the small
# synthetic set and a store holding its tcga cohort (built once, for the training sources)
SMOKE: dict[str, list[str]] = {
    "bench_abmil.py": ["--patients", "40", "--patches", "10", "--dim", "32"],
    "bench_foundation.py": ["--batch", "2", "--repeat", "1", "--threads", "1"],
    "bench_patch_batch.py": ["--batch", "4", "--px", "64", "--rounds", "1", "--repeats", "1"],
    "bench_tissue_rules.py": ["--batch", "8", "--repeat", "1"],
    "check_nvjpeg.py": ["--device", "cpu"],
    "bench_cpu_model.py": ["--batch", "2", "--rounds", "1", "--no-compile", "--calibrate", "8"],
    "bench_classify.py": ["--patients", "40", "--patches", "10", "--dim", "64", "--threads", "1"],
    "bench_duckdb.py": ["--n", "2000", "--skip-sql-mean"],
    "bench_embed.py": ["--n", "300", "--clusters", "4", "--methods", "tsne,sklearn"],
    "bench_extract.py": ["--quick", "--seconds", "1", "--out", "{tmp}/extract"],
    "bench_first_patch.py": ["--slides", "2", "--distinct", "1", "--rounds", "1"],
    "bench_pen.py": ["--repeat", "1"],
    "bench_predict.py": ["--patients", "12", "--patches", "20", "--train-patches", "10"],
    "bench_read.py": ["--reps", "1", "1", "--n", "20"],
    "bench_scaling.py": ["--quick"],
    "bench_sources.py": [
        "--tma",
        "{synth}/tma",
        "--store",
        "{store}",
        "--cohort",
        "tcga",
        "--crop-px",
        "400",
        "--arch",
        "resnet18",
        "--px",
        "112",
        "--out-px",
        "64",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
    ],  # fmt: skip
    "bench_stain.py": ["--repeat", "1", "--tiatoolbox-patches", "1"],
    "bench_storage.py": ["--n", "500"],
    "bench_synth.py": ["--slide-size", "2048x1536"],
    "bench_tissue.py": ["--slides", "2", "--per-slide", "200", "--dir", "{tmp}"],
    "bench_tma.py": ["--reps", "1"],
    "bench_train.py": [
        "--device",
        "cpu",
        "--arch",
        "resnet18",
        "--px",
        "64",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--cores",
        "4",
        "--half",
        "256x128",  # multiples of 8 (the blocky cache texture)
    ],  # fmt: skip
    "make_tiled_slide.py": ["{tmp}/tiled.svs", "--reps", "1", "1"],
}
HELPERS = {"smoke.py", "_cohort.py"}  # imported by the benchmarks, not benchmarks themselves


def unlisted() -> list[str]:
    """Benchmark scripts without a smoke run (a new script must be added to SMOKE)."""
    scripts = {p.name for p in HERE.glob("*.py")} - HELPERS
    return sorted(scripts - set(SMOKE))


def prepare_sources(tmp: Path) -> dict[str, str]:
    """The small synthetic set and a store with its tcga cohort (bench_sources' inputs)."""
    from fpstore.cohort.cohorts import add_cohort
    from fpstore.synth.api import synthesize

    synth, store = tmp / "synth", tmp / "store"
    synthesize("small", synth, seed=0, progress=False)
    tcga = synth / "tcga"
    add_cohort(
        store,
        "tcga",
        slides=str(tcga / "slides"),
        clinical=tcga / "nationwidechildrens.org_clinical_patient_brca.txt",
    )
    return {"synth": str(synth), "store": str(store)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="script names (default: every benchmark)")
    args = parser.parse_args(argv)
    missing = unlisted()
    if missing:
        print(f"benchmarks without a smoke run: {', '.join(missing)}; add them to SMOKE")
        return 2
    names = [n if n.endswith(".py") else f"{n}.py" for n in args.only] or list(SMOKE)
    unknown = [n for n in names if n not in SMOKE]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(SMOKE)}")
        return 2
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as scratch:
        tmp = Path(scratch)
        fill = {"tmp": str(tmp)}
        if "bench_sources.py" in names:
            fill |= prepare_sources(tmp)
        gpu = not args.only and _has_cuda()
        jobs = [("gpu_check.sh", ["bash", str(HERE / "gpu_check.sh")])] if gpu else []
        jobs += [
            (name, [sys.executable, str(HERE / name), *(a.format(**fill) for a in SMOKE[name])])
            for name in names
        ]
        for name, command in jobs:
            start = time.perf_counter()
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            print(f"{'ok' if done.returncode == 0 else 'FAILED':6s} {name:24s} {seconds:7.1f} s")
            if done.returncode != 0:
                tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
                failed.append(name)
                print("\n".join(f"       | {line}" for line in tail))
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}")
        return 1
    print(f"all {len(jobs)} benchmark(s) ran")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
