"""Site-leakage probe: how well do a patient's pooled fingerprints predict its site?

Networks trained to tell patients apart may learn the stain and scanner of each site; if the
site also predicts a marker (sites differ in case mix), a marker classifier can win by
recognising the site. The probe cross-validates a multinomial logistic regression from the
mean fingerprint to the site and reports accuracy and balanced accuracy beside their chance
levels, and the macro one-vs-rest AUC. High values are a warning to read `--split site`
results, not a failure.
"""

from __future__ import annotations

import numpy as np

from fpstore.classify.bags import Bags


def site_probe(bags: Bags, n_folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated site prediction from mean fingerprints (sites with < n_folds patients dropped)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if bags.sites is None:
        return {"skipped": "the cohort has no site per patient"}
    sites = bags.sites
    known = ~np.isin(sites, ("", "None"))
    names, counts = np.unique(sites[known], return_counts=True)
    kept_names = names[counts >= n_folds]
    keep = known & np.isin(sites, kept_names)
    result: dict[str, object] = {
        "n_sites": int(len(kept_names)),
        "n_patients": int(keep.sum()),
        "dropped_patients": int((~keep).sum()),
    }
    if len(kept_names) < 2:
        result["skipped"] = f"fewer than 2 sites with at least {n_folds} patients"
        return result
    x = bags.mean_features()[keep]
    target = sites[keep]
    steps = [StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)]
    if x.shape[1] >= len(x):
        # Wider than there are patients (a 1536- or 2560-D foundation model): the L2-penalised
        # fit lies in the span of the centred training rows, so rotating onto that span (PCA
        # keeping every component) gives the same model in a few dozen dimensions instead
        # of thousands (minutes -> seconds on 2 cores).
        from sklearn.decomposition import PCA

        steps.insert(1, PCA(svd_solver="full"))
    model = make_pipeline(*steps)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, target, cv=folds, method="predict_proba")
    classes = np.unique(target)
    predicted = classes[proba.argmax(axis=1)]
    share = np.unique(target, return_counts=True)[1] / len(target)
    if len(classes) == 2:
        macro_auc = roc_auc_score(target == classes[1], proba[:, 1])
    else:
        macro_auc = roc_auc_score(target, proba, multi_class="ovr", average="macro", labels=classes)
    result.update(
        {
            "accuracy": float((predicted == target).mean()),
            "chance_accuracy": float(share.max()),
            "balanced_accuracy": float(balanced_accuracy_score(target, predicted)),
            "chance_balanced_accuracy": float(1 / len(classes)),
            "macro_auc": float(macro_auc),
        }
    )
    return result
