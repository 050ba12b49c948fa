"""Type every stored patch of a cohort and write the ``tissue`` table.

``predict_tissue(store, cohort, method)`` writes ``store/tissue/cohort=<c>/<slide_id>.parquet``
(schema TISSUE) per slide. Methods:

    rules                label-free: pixel features + documented thresholds (re-reads pixels)
    pixel-logreg         a trained model on the same pixel features (re-reads pixels)
    fingerprint-logreg   a trained model on the stored fingerprints: no pixels, the fast path
    fingerprint-knn      the same with nearest neighbours

Trained methods read their model from ``--model PATH`` or, by default,
``store/models/tissue/<method>.npz`` (where ``fpstore tissue train`` saves it).
One slide that fails is reported and skipped; the others are written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from fpstore.config import TISSUE_TYPES
from fpstore.errors import ConfigError, FpstoreError, StoreError
from fpstore.store.fingerprints import resolve_encoder
from fpstore.store.layout import StoreLayout
from fpstore.tissue.data import (
    SlidePatches,
    cohort_slides,
    read_slide_patches,
    slide_pixel_features,
    stored_slide_files,
)
from fpstore.tissue.methods import get_method
from fpstore.tissue.rules import RuleThresholds, rule_probabilities
from fpstore.tissue.trained import TissueModel


@dataclass
class SlideTissue:
    """One slide's result: its patch keys and (N, 4) probabilities, or the error."""

    slide_id: str
    keys: pa.Table | None = None
    probabilities: np.ndarray | None = None
    error: str | None = None


@dataclass
class TissueSummary:
    cohort: str
    method: str
    encoder: str
    model: str | None  # the trained model's hash
    n_slides: int = 0
    n_patches: int = 0
    counts: dict = field(default_factory=lambda: {name: 0 for name in TISSUE_TYPES})
    failed: list = field(default_factory=list)  # [{"slide_id", "error"}]
    seconds: float = 0.0
    out: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__, patches_per_second=self.n_patches / max(self.seconds, 1e-9))


class TissueTyper:
    """A method ready to type patches: the rules with thresholds, or a loaded model."""

    def __init__(
        self,
        store: Path,
        method: str = "rules",
        model: Path | None = None,
        thresholds: RuleThresholds = RuleThresholds(),
    ):
        self.spec = get_method(method)
        self.method = method
        self.thresholds = thresholds
        self.model = None
        if self.spec.trained:
            self.model = TissueModel.load(model or StoreLayout.of(store).tissue_model_file(method))
            if self.model.method != method:
                raise ConfigError(
                    f"--model {str(model)!r} is a {self.model.method} model, not {method}; "
                    f"pass --method {self.model.method} or another --model"
                )

    @property
    def reads_pixels(self) -> bool:
        return self.spec.reads == "pixels"

    @property
    def model_hash(self) -> str | None:
        return self.model.hash if self.model else None

    def from_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities from pixel features (``fpstore.tissue.features``)."""
        if self.model is None:
            return rule_probabilities(features, self.thresholds)
        return self.model.predict_proba(features)

    def check_encoder(self, encoder: str, metadata: dict) -> None:
        """Refuse fingerprints of another encoder than the model was trained on."""
        if self.reads_pixels:
            return
        trained = self.model.encoder or {}
        stored_hash = metadata.get("encoder_hash")
        if trained.get("id") != encoder or (
            trained.get("hash") and stored_hash and trained["hash"] != stored_hash
        ):
            raise StoreError(
                f"the {self.method} model was trained on fingerprints of encoder "
                f"{trained.get('id')!r} (hash {trained.get('hash')}), the stored ones are "
                f"{encoder!r} (hash {stored_hash}); retrain with `fpstore tissue train "
                f"--encoder {encoder}` or pass --encoder {trained.get('id')}"
            )


def iter_tissue(
    store: Path,
    cohort: str,
    typer: TissueTyper,
    encoder: str | None = None,
    batch: int = 64,
    progress: bool = True,
) -> Iterator[SlideTissue]:
    """Type each stored slide of ``cohort``; failures come back as ``SlideTissue.error``."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    encoder, files = stored_slide_files(store, cohort, encoder)
    locations = cohort_slides(store, cohort) if typer.reads_pixels else {}
    # The products here are skinny (4 classes, or a few thousand neighbours): BLAS threads
    # only contend with the reader and writer threads, one each is fastest.
    with (
        threadpool_limits(1, user_api="blas"),
        tqdm(
            total=len(files), unit="slide", desc=f"tissue {typer.method}", disable=not progress
        ) as bar,
    ):
        for slide in _read_ahead(files, with_fingerprints=not typer.reads_pixels):
            if isinstance(slide, SlideTissue):  # unreadable file
                yield slide
            else:
                yield _type_slide(slide, typer, encoder, locations, batch)
            bar.update()


def _read_ahead(files: list[Path], with_fingerprints: bool):
    """Read the next slide's file on a thread while this one is typed (pyarrow frees the GIL)."""

    def read(path):
        try:
            return read_slide_patches(path, with_fingerprints)
        except FpstoreError as error:
            return SlideTissue(path.stem, error=str(error))

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(read, p) for p in files[:2]]
        for i in range(len(files)):
            result = pending[i].result()
            pending[i] = None  # let the slide's arrays go once typed
            if i + 2 < len(files):
                pending.append(pool.submit(read, files[i + 2]))
            yield result


def _type_slide(
    slide: SlidePatches, typer: TissueTyper, encoder: str, locations: dict, batch: int
) -> SlideTissue:
    try:
        if typer.reads_pixels:
            probabilities = _pixel_probabilities(slide, typer, locations, batch)
        else:
            typer.check_encoder(encoder, slide.metadata)
            probabilities = typer.model.predict_proba(slide.fingerprints)
    except FpstoreError as error:
        return SlideTissue(slide.slide_id, error=str(error))
    return SlideTissue(slide.slide_id, slide.keys, probabilities)


def _pixel_probabilities(
    slide: SlidePatches, typer: TissueTyper, locations: dict, batch: int
) -> np.ndarray:
    from fpstore.cohort.cohorts import open_cohort_slide

    if slide.slide_id not in locations:
        raise StoreError(
            f"slide {slide.slide_id!r} has stored patches but is not in the cohort's slides "
            "table, so its pixels cannot be read; re-add the cohort or use a fingerprint method"
        )
    if slide.keys.num_rows == 0:
        return np.zeros((0, len(TISSUE_TYPES)), dtype=np.float32)
    handle = open_cohort_slide(locations[slide.slide_id])
    try:
        features, _ = slide_pixel_features(handle, slide.keys, batch)
    finally:
        handle.close()
    return typer.from_features(features)


def tissue_table(result: SlideTissue, method: str) -> pa.Table:
    """A slide's TISSUE rows from its probabilities (type = the most probable)."""
    from fpstore.store.schema import TISSUE

    probs = result.probabilities
    n = len(probs)
    return pa.table(
        {
            "slide_id": pa.repeat(pa.scalar(result.slide_id, pa.string()), n),
            "patch_id": result.keys.column("patch_id"),
            "tissue_type": pa.array(TISSUE_TYPES).take(pa.array(probs.argmax(axis=1))),
            **{
                f"p_{name}": pa.array(probs[:, i], pa.float32())
                for i, name in enumerate(TISSUE_TYPES)
            },
            "method": pa.repeat(pa.scalar(method, pa.string()), n),
        },
        schema=TISSUE,
    )


def typing_record(store: Path, cohort: str) -> dict:
    """How the stored tissue types of ``cohort`` were made, for a run that pools by them:
    the method(s) and patches per method, and what precision of epithelium to expect."""
    from fpstore.store.tissue import read_tissue_types

    table = read_tissue_types(store, cohort, columns=("method",))
    if table is None:
        return {"cohort": cohort, "methods": {}}
    names, counts = np.unique(
        table.column("method").to_numpy(zero_copy_only=False), return_counts=True
    )
    methods = {}
    for name, count in zip(names.tolist(), counts.tolist()):
        spec = get_method(name)
        methods[name] = {
            "patches": int(count),
            "expected_epithelium_precision": spec.expected_epithelium_precision,
            "basis": spec.basis
            or "a trained model: its precision is that of its own validation, not measured here",
        }
    return {"cohort": cohort, "methods": methods}


def predict_tissue(
    store: Path,
    cohort: str,
    method: str = "rules",
    model: Path | None = None,
    encoder: str | None = None,
    thresholds: RuleThresholds = RuleThresholds(),
    batch: int = 64,
    progress: bool = True,
) -> TissueSummary:
    """Type every stored patch of ``cohort`` with ``method``; write the tissue table."""
    from fpstore.store.io import remove_dead_temporaries_in
    from fpstore.store.schema import file_metadata
    from fpstore.store.tissue import write_tissue

    start = time.perf_counter()
    typer = TissueTyper(store, method, model, thresholds)
    encoder = resolve_encoder(store, cohort, encoder)
    out = StoreLayout.of(store).tissue_dir(cohort)
    remove_dead_temporaries_in(out)  # what a killed run left
    summary = TissueSummary(cohort, method, encoder, typer.model_hash, out=str(out))
    metadata = file_metadata(
        "tissue",
        cohort=cohort,
        method=method,
        encoder=encoder,
        model_hash=typer.model_hash or "",
        thresholds="" if typer.model else json.dumps(thresholds.to_dict()),
    )

    def write(result: SlideTissue):
        table = tissue_table(result, method)
        write_tissue(store, cohort, result.slide_id, table, metadata)
        return table

    # Each file is fsynced twice (file and folder): overlap those waits on a few threads.
    with ThreadPoolExecutor(max_workers=4) as writers:
        pending = []
        for result in iter_tissue(store, cohort, typer, encoder, batch, progress):
            if result.error:
                summary.failed.append({"slide_id": result.slide_id, "error": result.error})
            else:
                pending.append((result.slide_id, writers.submit(write, result)))
        for slide_id, future in pending:
            try:
                table = future.result()
            except (FpstoreError, OSError) as error:
                summary.failed.append({"slide_id": slide_id, "error": str(error)})
                continue
            summary.n_slides += 1
            summary.n_patches += table.num_rows
            types, counts = np.unique(
                table.column("tissue_type").to_numpy(zero_copy_only=False), return_counts=True
            )
            for name, count in zip(types, counts):
                summary.counts[str(name)] += int(count)
    summary.seconds = time.perf_counter() - start
    return summary
