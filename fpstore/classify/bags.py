"""Bags of patches per patient: the numpy core every classifier and the CV harness use.

A ``Bags`` holds all patches of all patients in one ``(N, dim)`` float32 matrix, sorted by
patient, with ``bag_index`` (N,) pointing into ``patient_ids`` (P,). Keeping one matrix and an
index (rather than a list of per-patient arrays) lets the MIL head train on segment means
with one ``index_add_`` per batch, and subsetting is one fancy-index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fpstore.config import TISSUE_TYPES
from fpstore.errors import ClassifyError, ConfigError


def parse_pool(pool: str) -> tuple[str, ...] | None:
    """'all' -> None (every patch); 'epithelium+stroma' -> ('epithelium', 'stroma')."""
    if pool == "all":
        return None
    types = tuple(t.strip() for t in pool.split("+"))
    valid = [t for t in TISSUE_TYPES if t != "background"]
    bad = [t for t in types if t not in valid]
    if bad or not types:
        raise ConfigError(
            f"pool {pool!r}: unknown tissue type {bad[0] if bad else ''!r}; use 'all' or "
            f"types joined by '+' from: {', '.join(valid)}"
        )
    return types


@dataclass
class Bags:
    """Patches grouped by patient.

    patient_ids: (P,) unique patient ids; features: (N, dim) float32; bag_index: (N,) int64
    into patient_ids, non-decreasing; tissue, patch_ids, slide_ids: optional (N,) per patch;
    sites: optional (P,) per patient.
    """

    patient_ids: np.ndarray
    features: np.ndarray
    bag_index: np.ndarray
    tissue: np.ndarray | None = None
    patch_ids: np.ndarray | None = None
    slide_ids: np.ndarray | None = None
    sites: np.ndarray | None = None

    def __post_init__(self):
        self.patient_ids = np.asarray(self.patient_ids).astype(str)
        self.bag_index = np.asarray(self.bag_index, dtype=np.int64)
        self.features = np.asarray(self.features, dtype=np.float32)
        n = len(self.bag_index)
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ClassifyError(
                f"bags: features shape {self.features.shape} does not match {n} patches"
            )
        if n and (self.bag_index.min() < 0 or self.bag_index.max() >= len(self.patient_ids)):
            raise ClassifyError("bags: bag_index points outside patient_ids")
        if np.any(np.diff(self.bag_index) < 0):
            raise ClassifyError("bags: patches must be sorted by patient (use Bags.from_patches)")
        if len(np.unique(self.patient_ids)) != len(self.patient_ids):
            raise ClassifyError("bags: patient_ids must be unique")
        for name in ("tissue", "patch_ids", "slide_ids"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value).astype(str)
                if len(value) != n:
                    raise ClassifyError(f"bags: {name} has {len(value)} rows, expected {n}")
                setattr(self, name, value)
        if self.sites is not None:
            self.sites = np.asarray(self.sites).astype(str)
            if len(self.sites) != len(self.patient_ids):
                raise ClassifyError("bags: sites must have one entry per patient")

    @classmethod
    def from_patches(
        cls,
        patient_of_patch,
        features,
        tissue=None,
        patch_ids=None,
        slide_ids=None,
        site_of_patch=None,
    ) -> Bags:
        """Build bags from per-patch columns in any order (sorted here, stably)."""
        patient_of_patch = np.asarray(patient_of_patch).astype(str)
        patient_ids, bag_index = _factorize(patient_of_patch)
        # Patches read patient by patient are in order already: no copy of the matrix then.
        order = (
            None
            if np.all(bag_index[1:] >= bag_index[:-1])
            else np.argsort(bag_index, kind="stable")
        )

        def take(column):
            if column is None:
                return None
            return np.asarray(column) if order is None else np.asarray(column)[order]

        sites = None
        if site_of_patch is not None:
            site_of_patch = np.asarray(site_of_patch).astype(str)
            first = np.zeros(len(patient_ids), dtype=np.int64)
            # The first patch of each patient carries its site (a patient has one site).
            first[bag_index[::-1]] = np.arange(len(bag_index))[::-1]
            sites = site_of_patch[first]
        return cls(
            patient_ids=patient_ids,
            features=take(np.asarray(features, dtype=np.float32)),
            bag_index=take(bag_index),
            tissue=take(tissue),
            patch_ids=take(patch_ids),
            slide_ids=take(slide_ids),
            sites=sites,
        )

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def n_patches(self) -> np.ndarray:
        """(P,) patches per patient."""
        return np.bincount(self.bag_index, minlength=self.n_patients)

    def patient_means(self, patch_values: np.ndarray) -> np.ndarray:
        """(P,) mean of ``patch_values`` (N,) over each patient's patches (0 for none)."""
        sums = np.bincount(self.bag_index, weights=patch_values, minlength=self.n_patients)
        return sums / np.maximum(self.n_patches(), 1)

    def subset(self, patients) -> Bags:
        """The bags of ``patients`` (indices into patient_ids, or a boolean mask), in that order."""
        patients = np.asarray(patients)
        if patients.dtype == bool:
            patients = np.flatnonzero(patients)
        counts = self.n_patches()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        c = counts[patients]
        # Row r of the new bags is row (start of its patient) + (its rank inside the patient).
        offsets = starts[patients] - np.concatenate([[0], np.cumsum(c)[:-1]])
        rows = np.repeat(offsets, c) + np.arange(c.sum())
        new_index = np.repeat(np.arange(len(patients)), c)
        return self._take(
            rows,
            new_index,
            self.patient_ids[patients],
            None if self.sites is None else self.sites[patients],
        )

    def sample(self, n: int | None, seed: int = 0) -> Bags:
        """At most ``n`` patches per patient (None: all), drawn the way extraction draws them.

        A patient's patches are taken in slide-id order (each slide's rows as stored, the
        grid's raster order) and chosen by ``fpstore.slides.grid.sample_rows`` seeded by
        (seed, patient id): a patient's draw does not depend on the other patients, and on an
        all-patch store it picks the patches ``extract --patches n --seed seed`` extracts.
        """
        from fpstore.slides.grid import sample_rows

        if n is None:
            return self
        if n < 1:
            raise ConfigError(f"patches per patient {n!r}: give a positive number, or all")
        counts = self.n_patches()
        starts = np.concatenate([[0], np.cumsum(counts)])
        keep = np.ones(len(self.bag_index), dtype=bool)
        for p in np.flatnonzero(counts > n):
            rows = np.arange(starts[p], starts[p + 1])
            if self.slide_ids is not None:
                rows = rows[np.argsort(self.slide_ids[rows], kind="stable")]
            keep[rows] = False
            keep[rows[sample_rows(len(rows), n, seed, str(self.patient_ids[p]))]] = True
        rows = np.flatnonzero(keep)
        return self._take(rows, self.bag_index[rows], self.patient_ids, self.sites)

    def pool(self, pool: str) -> Bags:
        """Only the patches of the pooled tissue types; patients left with none are dropped."""
        types = parse_pool(pool)
        if types is None:
            return self
        if self.tissue is None:
            raise ClassifyError(
                f"pool {pool!r} needs tissue types per patch; run `fpstore tissue predict` "
                "for this cohort or use --pool all"
            )
        keep = np.isin(self.tissue, types)
        kept_patients = np.unique(self.bag_index[keep])
        remap = np.full(self.n_patients, -1, dtype=np.int64)
        remap[kept_patients] = np.arange(len(kept_patients))
        rows = np.flatnonzero(keep)
        return self._take(
            rows,
            remap[self.bag_index[rows]],
            self.patient_ids[kept_patients],
            None if self.sites is None else self.sites[kept_patients],
        )

    def _take(self, rows, bag_index, patient_ids, sites) -> Bags:
        def take(column):
            return None if column is None else column[rows]

        return Bags(
            patient_ids=patient_ids,
            features=self.features[rows],
            bag_index=bag_index,
            tissue=take(self.tissue),
            patch_ids=take(self.patch_ids),
            slide_ids=take(self.slide_ids),
            sites=sites,
        )

    def mean_features(self) -> np.ndarray:
        """(P, dim) mean fingerprint per patient."""
        sums = _segment_sum(self.features, self.bag_index, self.n_patients)
        return (sums / np.maximum(self.n_patches(), 1)[:, None]).astype(np.float32)

    def mean_per_tissue(self, types: tuple[str, ...]) -> np.ndarray:
        """(P, len(types) * (dim + 1)): per type the mean fingerprint and the patch fraction.

        A patient without patches of a type gets zeros for that mean and fraction 0, so a
        model can tell 'absent' from 'present with an average look'.
        """
        if self.tissue is None:
            raise ClassifyError(
                "mean per tissue type needs tissue types; run `fpstore tissue predict`"
            )
        total = np.maximum(self.n_patches(), 1)
        blocks = []
        for t in types:
            mask = self.tissue == t
            sums = _segment_sum(self.features[mask], self.bag_index[mask], self.n_patients)
            count = np.bincount(self.bag_index[mask], minlength=self.n_patients)
            blocks.append(sums / np.maximum(count, 1)[:, None])
            blocks.append((count / total)[:, None])
        return np.hstack(blocks).astype(np.float32)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, fast when equal values come in runs (a
    patient's patches are read file by file): one comparison per row, np.unique over the runs."""
    if len(values) == 0:
        return np.unique(values, return_inverse=True)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    runs, inverse = np.unique(values[starts], return_inverse=True)
    return runs, np.repeat(inverse, np.diff(np.r_[starts, len(values)]))


def _segment_sum(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Row sums of ``values`` grouped by ``index`` (0..n-1), as one sparse matrix product
    (np.add.at is ~100x slower on a (N, 512) matrix)."""
    from scipy.sparse import csr_matrix

    pool = csr_matrix(
        (np.ones(len(index), np.float32), (index, np.arange(len(index)))), shape=(n, len(index))
    )
    return np.asarray(pool @ values, dtype=np.float64)


def align_labels(bags: Bags, patient_ids, status) -> tuple[Bags, np.ndarray, dict]:
    """Keep the patients that have both patches and a 0/1 label; count the rest.

    ``status`` may hold None/NaN for a missing label. Returns (bags, y in {0,1}, counts) with
    counts: labelled, missing_label (patients with patches but no usable label),
    no_patches (labelled patients without patches).
    """
    patient_ids = np.asarray(patient_ids).astype(str)
    status = np.array([np.nan if s is None else float(s) for s in status], dtype=np.float64)
    bad = ~np.isnan(status) & ~np.isin(status, (0.0, 1.0))
    if bad.any():
        raise ClassifyError(
            f"label status must be 1, 0 or missing; patient {patient_ids[bad][0]!r} has "
            f"{status[bad][0]!r}"
        )
    known = dict(zip(patient_ids[~np.isnan(status)], status[~np.isnan(status)].astype(np.int8)))
    have = np.array([p in known for p in bags.patient_ids], dtype=bool)
    with_patches = set(bags.patient_ids.tolist())
    counts = {
        "labelled": int(have.sum()),
        "missing_label": int((~have).sum()),
        "no_patches": int(sum(1 for p in known if p not in with_patches)),
    }
    kept = bags.subset(have)
    y = np.array([known[p] for p in kept.patient_ids], dtype=np.int8)
    return kept, y, counts


class PatchMeanScores:
    """decision_function, predict_proba and predict for a method that scores patches
    (``patch_scores``): a patient's score is the mean of its patches', between ``score_low``
    (-1: tanh, 0: probability) and 1; the class boundary is halfway."""

    score_low: float
    patch_scores: Callable[[Bags], np.ndarray]  # the method's own

    def decision_function(self, bags: Bags) -> np.ndarray:
        """(P,) patient score: the mean of its patches' scores."""
        return bags.patient_means(self.patch_scores(bags))

    def predict_proba(self, bags: Bags) -> np.ndarray:
        p = (self.decision_function(bags) - self.score_low) / (1 - self.score_low)
        return np.column_stack([1 - p, p])

    def predict(self, bags: Bags) -> np.ndarray:
        return (self.decision_function(bags) > (self.score_low + 1) / 2).astype(np.int8)
