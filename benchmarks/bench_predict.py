"""Train once, predict anywhere: `predict` with a saved model beside `classify`'s cost.

Claims (issue 17): predict on 1,000 patients x all patches from a stored extraction takes
seconds on 2 cores; scoring a new slide end to end is extraction plus milliseconds.

    python benchmarks/bench_predict.py                          # 1,000 x 1,000 (2 GB on disk)
    python benchmarks/bench_predict.py --patients 100 --patches 200   # a quick smoke run

Not timed: a temporary store with cohort 'train' (P patients x 120 fingerprints, the paper's
protocol) and cohort 'big' (P patients x K fingerprints, an all-patch extraction), 512-d,
ReLU-like, ER planted in 20% of the patches, written as extraction writes them (one zstd
Parquet file per slide). Then, timed on the same machine:

    classify     `fpstore classify` on 'train': MIL 5-fold CV, the final model, the site probe,
                 the bootstrap CI, the run and the model written (what one model costs)
    read         reading the fingerprints of 'big' into numpy: what any scoring must do
    predict      `fpstore predict` of the saved model on 'big', every patch: read, check the
                 encoder settings, score, AUC + CI + DeLong vs the other runs, write the run
    new slide    `predict --slides` on a real slide (CMU-1-Small-Region) with a model trained
                 on random-ResNet34 fingerprints: the whole command against its extraction
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 512
CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def write_cohort_store(store: Path, cohort: str, patients: int, patches: int, seed: int):
    """Cohort tables and one fingerprint file per patient (a slide each), as extraction does."""
    from fpstore.store.cohorts import write_cohort
    from fpstore.store.fingerprints import fingerprint_table, patch_keys_table, write_fingerprints
    from fpstore.store.schema import LABELS, SLIDES, file_metadata

    rng = np.random.default_rng(seed)
    y = (rng.random(patients) < 0.7).astype(np.int8)
    ids = [f"{cohort}-{i:05d}" for i in range(patients)]
    sites = [f"S{i % 8}" for i in range(patients)]
    slides = pa.table(
        {
            "slide_id": [f"{p}-DX1" for p in ids],
            "patient_id": ids,
            "path": [f"/nowhere/{p}.svs" for p in ids],
            "site": sites,
            "mpp_override": [None] * patients,
        },
        schema=SLIDES,
    )
    labels = pa.table(
        {
            "patient_id": ids,
            "marker": ["ER"] * patients,
            "status": y,
            "raw_value": ["x"] * patients,
            "site": sites,
        },
        schema=LABELS,
    )
    write_cohort(store, cohort, slides, labels, {"name": cohort})
    meta = dict(
        encoder="bench",
        encoder_hash="bench-hash",
        weights_hash="bench-weights",
        dim=str(DIM),
        precision="fp32",
        patches=str(patches) if cohort == "train" else "all",
        seed="0",
        min_tissue="0.5",
    )
    side = int(np.ceil(np.sqrt(patches)))
    x, yy = np.divmod(np.arange(patches), side)
    for i, p in enumerate(ids):
        vectors = np.maximum(rng.normal(size=(patches, DIM)).astype(np.float32), 0)
        carrier = rng.random(patches) < 0.2
        vectors[carrier, :16] += np.float32(0.15 if y[i] else -0.15)
        keys = patch_keys_table(
            p, f"{p}-DX1", sites[i], x * 448, yy * 448, 448.0, 0.25, 112.0, 224, np.ones(patches)
        )
        table = fingerprint_table(keys, vectors, DIM)
        write_fingerprints(
            store, "bench", cohort, f"{p}-DX1", table, file_metadata("fingerprints", **meta)
        )


def timed(label: str, fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:8.2f} s")
    return out, seconds


def new_slide(root: Path) -> None:
    """A model on random-ResNet34 fingerprints of 6 copies of the CMU slide, then one new
    slide scored end to end."""
    from fpstore.classify.pipeline import ClassifyConfig, classify
    from fpstore.classify.predict import PredictConfig, predict
    from fpstore.cohort.cohorts import add_cohort
    from fpstore.encoders.registry import create_encoder
    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract

    root = Path(tempfile.mkdtemp(prefix="new-slide-", dir=root))
    store, scans, new = root / "store", root / "scans", root / "new"
    scans.mkdir()
    new.mkdir()
    for i in range(6):
        (scans / f"T{i}.svs").symlink_to(CMU)
    (new / "N1.svs").symlink_to(CMU)
    labels = root / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"T{i},{scans / f'T{i}.svs'},{'Positive' if i % 2 else 'Negative'},,,A\n"
            for i in range(6)
        )
    )
    add_cohort(store, "train", clinical=labels, fmt="csv")
    extract(store, "train", ExtractConfig(encoder="random-resnet34", patches=16), progress=False)
    cfg = ClassifyConfig(marker="ER", cohort="train", method="logreg", folds=3, site_probe=False)
    model = classify(store, cfg, progress=False)["model"]["model_id"]
    print("a new slide, scored by a model on random-ResNet34 fingerprints (16 patches):")
    _, build = timed("build the encoder (part of extraction)", create_encoder, "random-resnet34")
    doc, total = timed(
        "predict --slides (register, extract, score)",
        predict,
        store,
        PredictConfig(model=model, slides=(str(new / "N1.svs"),)),
        False,
    )
    # The encoder is built once, before extraction (its hash checked against the card's):
    # count that build as extraction's, which builds it when run alone.
    extraction = doc["extraction"]["seconds"] + build
    print(
        f"  extraction {extraction:.2f} s ({doc['extraction']['patches']} patches, encoder "
        f"build included); the rest {(total - extraction) * 1000:.0f} ms; "
        f"predict / extraction = {total / extraction:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=1000, help="per patient in 'big'")
    parser.add_argument("--train-patches", type=int, default=120)
    parser.add_argument("--skip-slide", action="store_true", help="skip the new-slide part")
    parser.add_argument(
        "--keep", type=Path, help="build the store here and keep it (reused when there)"
    )
    args = parser.parse_args()

    import torch  # imported before timing: the first import costs seconds

    from fpstore.classify.pipeline import ClassifyConfig, classify
    from fpstore.classify.predict import PredictConfig, predict
    from fpstore.store import open as open_store

    torch.set_num_threads(2)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    store = root / "store"
    try:
        start = time.perf_counter()
        if not (store / "cohorts" / "big").is_dir():
            write_cohort_store(store, "train", args.patients, args.train_patches, seed=0)
            write_cohort_store(store, "big", args.patients, args.patches, seed=1)
        n_big = args.patients * args.patches
        print(
            f"store: train {args.patients} x {args.train_patches}, big {args.patients} x "
            f"{args.patches} = {n_big:,} fingerprints of {DIM} floats, ready in "
            f"{time.perf_counter() - start:.0f} s (not timed)"
        )
        doc, t_classify = timed(
            "classify (MIL, 5-fold CV + final model)",
            classify,
            store,
            ClassifyConfig(marker="ER", cohort="train", encoder="bench"),
            progress=False,
        )

        def read():
            with open_store(store) as fs:
                return fs.fingerprints("bench", "big").vectors.shape

        _, t_read = timed("read big's fingerprints (the floor)", read)
        out, t_predict = timed(
            "predict (final model, every patch)",
            predict,
            store,
            PredictConfig(model=doc["model"]["model_id"], cohort="big", patches="all"),
            False,
        )
        m = out["predict"]["metrics"]
        print(
            f"  scored {out['data']['patients']} patients, {out['data']['patches']:,} patches "
            f"({n_big / t_predict:,.0f} patches/s), AUC {m['auc']:.3f} "
            f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        )
        print(
            f"predict / read = {t_predict / t_read:.2f}; predict / classify = "
            f"{t_predict / t_classify:.2f} (classify: {args.patients} x {args.train_patches}, "
            f"predict: {args.patients} x {args.patches})"
        )
        if not args.skip_slide:
            new_slide(root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
