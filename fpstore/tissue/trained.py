"""Trained tissue-type classifiers, saved as plain arrays (``.npz`` + JSON metadata).

Methods:
    fingerprint-logreg   multinomial logistic regression on stored fingerprints: one matmul
                         per patch at prediction, the fast path for millions of patches
    fingerprint-knn      k nearest neighbours by cosine similarity of PCA-reduced, centred
                         fingerprints, against at most ``max_reference`` patches per class
    pixel-logreg         logistic regression on the label-free pixel features and their
                         pairwise products: the rules' inputs, with learned boundaries

Models are fitted with scikit-learn and exported to numpy arrays, so that loading one runs no
pickled code and predicting is a few matrix products.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import fpstore
from fpstore.config import TISSUE_TYPES, check_choice, check_range
from fpstore.errors import ConfigError, StoreError, TrainingError
from fpstore.store.io import remove_dead_temporaries, write_atomic
from fpstore.store.models import read_npz
from fpstore.tissue.methods import TRAINED_METHODS, TissueMethod, get_method

_FORMAT = "fpstore-tissue-model-1"


@dataclass(frozen=True)
class TissueTrainConfig:
    """How to fit a trained method. ``C``: inverse L2 strength; ``k``: neighbours."""

    method: str = "fingerprint-logreg"
    C: float = 1.0
    k: int = 15
    pca_dim: int = 32
    max_reference: int = 500  # per class, for fingerprint-knn
    max_per_class: int = 20_000  # training patches per class, a random sample above it
    seed: int = 0

    def __post_init__(self):
        check_choice("TissueTrainConfig", "method", self.method, TRAINED_METHODS)
        check_range("TissueTrainConfig", "C", self.C, 1e-6, 1e6)
        check_range("TissueTrainConfig", "k", self.k, 1, 1000)
        check_range("TissueTrainConfig", "pca_dim", self.pca_dim, 2, 4096)
        check_range("TissueTrainConfig", "max_reference", self.max_reference, 1, 1_000_000)
        check_range("TissueTrainConfig", "max_per_class", self.max_per_class, 1, 100_000_000)

    @property
    def spec(self) -> TissueMethod:
        return get_method(self.method)

    @property
    def source(self) -> str:
        return self.spec.reads


class TissueModel:
    """A fitted classifier: ``predict_proba(X) -> (N, 4)`` in ``TISSUE_TYPES`` order.

    ``meta`` records the method, what it reads (fingerprints of which encoder, or pixels),
    the classes it saw and the training data summary.
    """

    def __init__(self, method: str, arrays: dict[str, np.ndarray], meta: dict):
        self.method = method
        self.arrays = arrays
        self.meta = meta

    @property
    def source(self) -> str:
        return self.meta["source"]

    @property
    def encoder(self) -> dict | None:
        return self.meta.get("encoder")

    @property
    def hash(self) -> str:
        digest = hashlib.sha256(self.method.encode())
        for name in sorted(self.arrays):
            digest.update(name.encode() + np.ascontiguousarray(self.arrays[name]).tobytes())
        return digest.hexdigest()[:16]

    def predict_proba(self, X: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        expected = self.meta["n_features"]
        if X.ndim != 2 or X.shape[1] != expected:
            raise ConfigError(
                f"tissue model {self.method} takes {expected} features per patch, got shape "
                f"{X.shape}; use fingerprints of the encoder it was trained on "
                f"({(self.encoder or {}).get('id', 'pixel features')})"
            )
        out = np.zeros((len(X), len(TISSUE_TYPES)), dtype=np.float32)
        columns = [TISSUE_TYPES.index(c) for c in self.meta["classes"]]
        for start in range(0, len(X), chunk):
            part = X[start : start + chunk]
            probs = _FAMILIES[get_method(self.method).family].predict(self, part)
            out[start : start + chunk, columns] = probs
        return out

    def _linear(self, X: np.ndarray) -> np.ndarray:
        if get_method(self.method).pairwise:
            X = pairwise_expand((X - self.arrays["mu"]) / self.arrays["sd"])
        logits = X @ self.arrays["W"].T + self.arrays["b"]
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def _knn(self, X: np.ndarray) -> np.ndarray:
        query = _unit((X - self.arrays["mean"]) @ self.arrays["components"].T)
        similarity = query @ self.arrays["reference"].T
        k = min(int(self.meta["k"]), similarity.shape[1])
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = self.arrays["reference_labels"][nearest]
        counts = np.stack([(votes == i).sum(axis=1) for i in range(len(self.meta["classes"]))], 1)
        return counts.astype(np.float32) / k

    def save(self, path: Path) -> Path:
        meta = dict(self.meta, method=self.method, format=_FORMAT, hash=self.hash)
        remove_dead_temporaries(Path(path))  # what a killed training left
        return write_atomic(
            Path(path),
            lambda handle: np.savez(handle, meta=np.array(json.dumps(meta)), **self.arrays),
        )

    @classmethod
    def load(cls, path: Path) -> TissueModel:
        path = Path(path)
        if not path.is_file():
            raise StoreError(
                f"no tissue model at {str(path)!r}; train one with `fpstore tissue train`"
            )
        arrays = read_npz(path, "tissue model")
        try:
            meta = json.loads(str(arrays.pop("meta", "{}")))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != _FORMAT:
            raise StoreError(
                f"{str(path)!r} is not an fpstore tissue model of format {_FORMAT!r} "
                f"(found {meta.get('format')!r}); retrain it with `fpstore tissue train`"
            )
        try:  # a missing or reshaped array fails here, in one line, not mid-way through a cohort
            model = cls(meta["method"], arrays, meta)
            model.predict_proba(np.zeros((1, int(meta["n_features"])), np.float32))
        except (KeyError, ValueError, IndexError, TypeError) as error:
            raise StoreError(
                f"tissue model {str(path)!r} is damaged ({type(error).__name__}: "
                f"{' '.join(str(error).split())}); retrain it with `fpstore tissue train`"
            ) from None
        return model

    def describe(self) -> dict:
        return {k: v for k, v in self.meta.items() if k != "format"} | {"hash": self.hash}


def pairwise_expand(Z: np.ndarray) -> np.ndarray:
    """Features and their pairwise products (squares included): degree-2 interactions."""
    i, j = np.triu_indices(Z.shape[1])
    return np.concatenate([Z, Z[:, i] * Z[:, j]], axis=1).astype(np.float32)


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def balanced_sample(y: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Indices with at most ``max_per_class`` of each label (random, sorted)."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(y):
        index = np.flatnonzero(y == label)
        if len(index) > max_per_class:
            index = rng.choice(index, max_per_class, replace=False)
        keep.append(index)
    return np.sort(np.concatenate(keep))


def fit_tissue_model(
    X: np.ndarray, y: np.ndarray, config: TissueTrainConfig, meta: dict | None = None
) -> TissueModel:
    """Fit ``config.method`` on features X (fingerprints or pixel features), labels y.

    ``y`` holds indices into ``TISSUE_TYPES``; classes absent from y get probability 0.
    ``meta`` (encoder, training data summary) is stored with the model.
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise TrainingError(f"need one feature row per label, got X {X.shape} and y {y.shape}")
    if not np.isfinite(X).all():
        raise TrainingError("training features contain NaN or infinite values")
    present = np.unique(y)
    if len(present) < 2:
        raise TrainingError(
            f"a tissue classifier needs at least two classes; the training labels hold only "
            f"{[TISSUE_TYPES[i] for i in present]}"
        )
    keep = balanced_sample(y, config.max_per_class, config.seed)
    X, y = X[keep], y[keep]
    classes = [TISSUE_TYPES[i] for i in present]
    y_local = np.searchsorted(present, y)
    spec = config.spec
    arrays, extra = _FAMILIES[spec.family].fit(X, y_local, config, spec)
    counts = {TISSUE_TYPES[i]: int((y == i).sum()) for i in present}
    info = {
        "source": config.source,
        "classes": classes,
        "n_features": int(X.shape[1]),
        "train_counts": counts,
        "config": asdict(config),
        "fpstore_version": fpstore.__version__,
    }
    return TissueModel(config.method, arrays, {**(meta or {}), **info, **extra})


def _logreg(
    X: np.ndarray, y: np.ndarray, config: TissueTrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Standardise + multinomial logistic regression, folded into one (W, b)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=config.C, max_iter=1000, class_weight="balanced")
    model.fit(scaler.transform(X), y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) is softmax over (0, z)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    W = coef / scale
    b = intercept - W @ scaler.mean_
    return W.astype(np.float32), b.astype(np.float32)


def _fit_linear(X, y, config, spec: TissueMethod):
    if not spec.pairwise:
        W, b = _logreg(X, y, config)
        return {"W": W, "b": b}, {}
    mu = X.mean(axis=0)
    sd = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    W, b = _logreg(pairwise_expand((X - mu) / sd), y, config)
    return {"W": W, "b": b, "mu": mu.astype(np.float32), "sd": sd.astype(np.float32)}, {}


def _fit_knn(X, y, config, spec: TissueMethod):
    mean = X.mean(axis=0)
    centred = X - mean
    dim = min(config.pca_dim, *centred.shape)
    # PCA from the (dim x dim) covariance: cheaper than an SVD of N x dim when N >> dim.
    _, vectors = np.linalg.eigh(centred.T.astype(np.float64) @ centred)
    components = vectors[:, ::-1][:, :dim].T.astype(np.float32)
    keep = balanced_sample(y, config.max_reference, config.seed)
    reference = _unit(centred[keep] @ components.T).astype(np.float32)
    arrays = {
        "mean": mean.astype(np.float32),
        "components": components,
        "reference": reference,
        "reference_labels": y[keep].astype(np.int8),
    }
    return arrays, {"k": config.k}


@dataclass(frozen=True)
class _Family:
    """How a model family is fitted (-> arrays, extra metadata) and applied (-> probabilities)."""

    fit: Callable[[np.ndarray, np.ndarray, TissueTrainConfig, TissueMethod], tuple[dict, dict]]
    predict: Callable[[TissueModel, np.ndarray], np.ndarray]


# Keyed by ``TissueMethod.family`` (fpstore.tissue.methods): a new method names its family.
_FAMILIES = {
    "linear": _Family(_fit_linear, TissueModel._linear),
    "knn": _Family(_fit_knn, TissueModel._knn),
}
