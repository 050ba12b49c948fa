"""Baselines on per-patient pooled fingerprints: logistic regression and XGBoost.

Pooling "mean" averages a patient's patch fingerprints; "tissue-mean" concatenates the mean
fingerprint and the patch fraction of each tissue type (epithelium, stroma, fat, or the types
of the pool). Both use the early-stopping group the way the MIL head does: logistic regression
picks its regularisation there, XGBoost stops adding trees there, so no method sees more data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from fpstore.classify.bags import Bags
from fpstore.classify.metrics import auc
from fpstore.config import TISSUE_TYPES, check_choice, check_range
from fpstore.errors import ClassifyError

POOLINGS = ("mean", "tissue-mean")
_TYPES = tuple(t for t in TISSUE_TYPES if t != "background")


def tissue_types_of(bags: Bags, pooling: str) -> tuple[str, ...]:
    """The tissue types a model pools by: those present in its training bags."""
    if pooling == "mean":
        return ()
    present = tuple(t for t in _TYPES if bags.tissue is not None and (bags.tissue == t).any())
    return present or _TYPES


def pooled_features(bags: Bags, pooling: str, types: tuple[str, ...] = ()) -> np.ndarray:
    """(P, features) per patient for the pooled baselines; ``types``: those of the training
    bags (a test patient's features line up with the model's whatever types it has)."""
    if pooling == "mean":
        return bags.mean_features()
    return bags.mean_per_tissue(tuple(types) or tissue_types_of(bags, pooling))


def _check_fit(bags: Bags, y) -> np.ndarray:
    y = np.asarray(y)
    if len(y) != bags.n_patients:
        raise ClassifyError(f"{len(y)} labels for {bags.n_patients} bags")
    if len(np.unique(y)) != 2:
        raise ClassifyError("training patients must include both classes")
    return y


@dataclass(frozen=True)
class LogRegConfig:
    pooling: str = "mean"
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    seed: int = 0

    def __post_init__(self):
        check_choice("LogRegConfig", "pooling", self.pooling, POOLINGS)
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ClassifyError(f"LogRegConfig.c_grid={self.c_grid!r}: need positive values")


class PooledLogReg(ClassifierMixin, BaseEstimator):
    """Standardised L2 logistic regression on pooled fingerprints; C chosen on the es group."""

    config_class = LogRegConfig

    def __init__(self, config: LogRegConfig | None = None):
        self.config = config

    @property
    def settings(self) -> LogRegConfig:
        return self.config or LogRegConfig()

    def fit(self, bags: Bags, y, eval_set: tuple[Bags, np.ndarray] | None = None):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        cfg = self.settings
        y = _check_fit(bags, y)
        self.types_ = tissue_types_of(bags, cfg.pooling)
        x = pooled_features(bags, cfg.pooling, self.types_)
        grid = cfg.c_grid if eval_set is not None else (float(np.median(cfg.c_grid)),)
        es_y = None if eval_set is None else np.asarray(eval_set[1])
        es_x = None if eval_set is None else pooled_features(eval_set[0], cfg.pooling, self.types_)

        def fitted(c):
            model = make_pipeline(
                StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=cfg.seed)
            ).fit(x, y)
            score = 0.0
            if es_y is not None and len(np.unique(es_y)) == 2:
                score = auc(es_y, model.decision_function(es_x))
            return score, c, model

        # The first C with the best score (LogRegConfig keeps the grid non-empty).
        self.es_score_, self.c_, self.model_ = max(map(fitted, grid), key=lambda b: b[0])
        self.classes_ = np.array([0, 1])
        return self

    def _pooled(self, bags: Bags) -> np.ndarray:
        return pooled_features(bags, self.settings.pooling, self.types_)

    def decision_function(self, bags: Bags) -> np.ndarray:
        return self.model_.decision_function(self._pooled(bags))

    def predict_proba(self, bags: Bags) -> np.ndarray:
        return self.model_.predict_proba(self._pooled(bags))

    def predict(self, bags: Bags) -> np.ndarray:
        return self.model_.predict(self._pooled(bags))

    def patch_scores(self, bags: Bags) -> np.ndarray | None:
        """With mean pooling the model is linear, so a patch's score is the same function of
        its own fingerprint, and a patient's score is the mean of its patches' scores."""
        if self.settings.pooling != "mean":
            return None
        return self.model_.decision_function(bags.features).astype(np.float32)

    def describe(self) -> dict:
        return {"method": "logreg", **asdict(self.settings), "chosen_C": getattr(self, "c_", None)}

    def get_state(self) -> dict[str, np.ndarray]:
        """The scaler's and the regression's fitted arrays: the whole model, no pickle."""
        scaler, regression = self.model_.steps[0][1], self.model_.steps[1][1]
        return {
            "mean": scaler.mean_,
            "scale": scaler.scale_,
            "var": scaler.var_,
            "coef": regression.coef_,
            "intercept": regression.intercept_,
            "c": np.array(self.c_),
            "types": np.array(self.types_, dtype=str),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> PooledLogReg:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = state["mean"], state["scale"], state["var"]
        scaler.n_features_in_ = len(state["mean"])
        self.c_ = float(state["c"])
        regression = LogisticRegression(C=self.c_, max_iter=2000, random_state=self.settings.seed)
        regression.coef_, regression.intercept_ = state["coef"], state["intercept"]
        regression.classes_ = np.array([0, 1])
        regression.n_features_in_ = state["coef"].shape[1]
        self.model_ = make_pipeline(scaler, regression)
        self.types_ = tuple(str(t) for t in state["types"])
        self.classes_ = np.array([0, 1])
        return self


@dataclass(frozen=True)
class XGBConfig:
    pooling: str = "mean"
    n_estimators: int = 400
    max_depth: int = 3
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    early_stopping_rounds: int = 30
    threads: int = 1  # a few hundred patients: more threads only add synchronisation
    seed: int = 0

    def __post_init__(self):
        check_choice("XGBConfig", "pooling", self.pooling, POOLINGS)
        check_range("XGBConfig", "n_estimators", self.n_estimators, 1, 100_000)
        check_range("XGBConfig", "max_depth", self.max_depth, 1, 20)
        check_range("XGBConfig", "learning_rate", self.learning_rate, 1e-5, 1.0)
        check_range("XGBConfig", "subsample", self.subsample, 0.05, 1.0)
        check_range("XGBConfig", "colsample_bytree", self.colsample_bytree, 0.05, 1.0)
        check_range("XGBConfig", "threads", self.threads, 1, 256)


class PooledXGBoost(ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees on pooled fingerprints; trees added until the es AUC stalls."""

    config_class = XGBConfig

    def __init__(self, config: XGBConfig | None = None):
        self.config = config

    @property
    def settings(self) -> XGBConfig:
        return self.config or XGBConfig()

    def fit(self, bags: Bags, y, eval_set: tuple[Bags, np.ndarray] | None = None):
        from xgboost import XGBClassifier

        cfg = self.settings
        y = _check_fit(bags, y)
        self.types_ = tissue_types_of(bags, cfg.pooling)
        x = pooled_features(bags, cfg.pooling, self.types_)
        es = None
        if eval_set is not None and len(np.unique(eval_set[1])) == 2:
            es = [(pooled_features(eval_set[0], cfg.pooling, self.types_), np.asarray(eval_set[1]))]
        self.model_ = XGBClassifier(
            n_estimators=cfg.n_estimators,
            max_depth=cfg.max_depth,
            learning_rate=cfg.learning_rate,
            subsample=cfg.subsample,
            colsample_bytree=cfg.colsample_bytree,
            n_jobs=cfg.threads,
            random_state=cfg.seed,
            tree_method="hist",
            eval_metric="auc",
            early_stopping_rounds=cfg.early_stopping_rounds if es else None,
        ).fit(x, y, eval_set=es, verbose=False)
        self.best_iteration_ = getattr(self.model_, "best_iteration", cfg.n_estimators - 1)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, bags: Bags) -> np.ndarray:
        return self.model_.predict_proba(pooled_features(bags, self.settings.pooling, self.types_))

    def decision_function(self, bags: Bags) -> np.ndarray:
        return self.predict_proba(bags)[:, 1]

    def predict(self, bags: Bags) -> np.ndarray:
        return (self.decision_function(bags) > 0.5).astype(np.int8)

    def patch_scores(self, bags: Bags) -> None:
        """Trees on a pooled vector give no meaningful per-patch score."""
        return None

    def describe(self) -> dict:
        return {
            "method": "xgboost",
            **asdict(self.settings),
            "best_iteration": getattr(self, "best_iteration_", None),
        }

    def get_state(self) -> dict[str, np.ndarray]:
        """The booster in XGBoost's own UBJSON format (readable by later XGBoost versions),
        as bytes in an array, and the pooled tissue types."""
        raw = self.model_.get_booster().save_raw(raw_format="ubj")
        return {
            "booster": np.frombuffer(bytes(raw), np.uint8),
            "best_iteration": np.array(self.best_iteration_),
            "types": np.array(self.types_, dtype=str),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> PooledXGBoost:
        from xgboost import XGBClassifier

        self.model_ = XGBClassifier(n_jobs=self.settings.threads)
        self.model_.load_model(bytearray(np.asarray(state["booster"], np.uint8).tobytes()))
        self.best_iteration_ = int(state["best_iteration"])
        self.types_ = tuple(str(t) for t in state["types"])
        self.classes_ = np.array([0, 1])
        return self
