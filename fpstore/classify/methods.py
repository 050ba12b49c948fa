"""The classifier registry: one name per method, one factory, the same fit/score API for all.

Every estimator has ``fit(bags, y, eval_set=(bags_es, y_es))``, ``decision_function(bags)``
(a patient score, higher = positive), ``patch_scores(bags)`` (per patch, or None where a
method has none) and ``describe()`` (its full config, saved with a run).
"""

from __future__ import annotations

from fpstore.errors import unknown_name

METHODS = ("mil", "logreg", "logreg-tissue", "xgboost", "xgboost-tissue", "patch-cnn")
# Methods that read fingerprints; patch-cnn reads images from the patch cache instead.
FEATURE_METHODS = METHODS[:-1]


def create_classifier(method: str, seed: int = 0, images=None, **overrides):
    """A fresh, unfitted estimator for ``method``; ``overrides`` set its config fields
    (threads included: each method has its own sensible default)."""
    if method == "mil":
        from fpstore.classify.mil import MILConfig, MILHead

        return MILHead(MILConfig(seed=seed, **overrides))
    if method in ("logreg", "logreg-tissue"):
        from fpstore.classify.baselines import LogRegConfig, PooledLogReg

        pooling = "tissue-mean" if method.endswith("-tissue") else "mean"
        return PooledLogReg(LogRegConfig(pooling=pooling, seed=seed, **overrides))
    if method in ("xgboost", "xgboost-tissue"):
        from fpstore.classify.baselines import PooledXGBoost, XGBConfig

        pooling = "tissue-mean" if method.endswith("-tissue") else "mean"
        return PooledXGBoost(XGBConfig(pooling=pooling, seed=seed, **overrides))
    if method == "patch-cnn":
        from fpstore.classify.patchcnn import PatchCNN, PatchCNNConfig

        return PatchCNN(PatchCNNConfig(seed=seed, **overrides), images=images)
    raise unknown_name("method", method, METHODS)
