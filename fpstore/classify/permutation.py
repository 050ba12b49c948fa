"""A permutation test of the whole cross-validation: is the CV AUC more than the protocol's noise?

A bootstrap CI over patients treats the pooled test scores as fixed. It does not see that
each fold's model was trained on the other patients, which in small cohorts pushes a no-signal
AUC below 0.5 (leaving a negative out makes its site look more positive in training: Parker et
al., BMC Bioinformatics 2007), nor that a marker whose prevalence differs between sites can be
"predicted" by features that recognise the site. Rerunning the same protocol on shuffled labels
gives the AUC's distribution when the features carry no marker. Labels are shuffled within
each site where every patient has one, so each site keeps its prevalence: the p-value then
asks whether the fingerprints predict the marker beyond what the site tells.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from fpstore.classify.bags import Bags
from fpstore.classify.settings import CVProtocol
from fpstore.errors import ClassifyError


def shuffle_within(
    y: np.ndarray, strata: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """``y`` permuted inside each stratum (all of ``y`` at once when ``strata`` is None)."""
    y = np.asarray(y)
    if strata is None:
        return rng.permutation(y)
    out = y.copy()
    for stratum in np.unique(strata):
        idx = np.flatnonzero(strata == stratum)
        out[idx] = y[rng.permutation(idx)]
    return out


def _strata(bags: Bags) -> np.ndarray | None:
    if bags.sites is None:
        return None
    sites = np.asarray(bags.sites).astype(str)
    return None if np.isin(sites, ("", "None")).any() else sites


def permutation_test(
    bags: Bags, y, observed_auc: float, estimator, protocol: CVProtocol, progress: bool = True
) -> dict:
    """Null distribution of the CV AUC under ``protocol.permutations`` label shuffles and the
    one-sided p-value.

    Each permutation reruns the protocol end to end (new label-stratified groups for the
    shuffled labels, the same seed), so the null carries every source of optimism or
    pessimism the real run has. A shuffle whose groups cannot hold both classes is skipped
    and counted.
    """
    from fpstore.classify.protocol import cross_validate

    n_permutations = protocol.permutations
    if n_permutations < 1:
        raise ClassifyError(f"--permutations {n_permutations}: give at least 1 (e.g. 200)")
    # Fresh groups per shuffle; the null's AUCs need no CI of their own.
    shuffled_protocol = replace(protocol, groups=None, n_boot=100)
    y = np.asarray(y)
    strata = _strata(bags)
    rng = np.random.default_rng([protocol.seed, 7919])
    aucs, skipped = [], 0
    name = estimator.describe()["method"]
    for _ in tqdm(
        range(n_permutations), desc=f"{name} permutations", file=sys.stderr, disable=not progress
    ):
        shuffled = shuffle_within(y, strata, rng)
        try:
            result = cross_validate(bags, shuffled, estimator, shuffled_protocol, progress=False)
        except ClassifyError:
            skipped += 1
            continue
        aucs.append(result.metrics["auc"])
    if not aucs:
        raise ClassifyError(
            f"all {n_permutations} label shuffles left a fold with one class; "
            "lower --folds or use --split patient"
        )
    null = np.asarray(aucs)
    return {
        "n_permutations": len(null),
        "skipped": skipped,
        "shuffled_within": "site" if strata is not None else "cohort",
        "observed_auc": float(observed_auc),
        "null_mean": float(null.mean()),
        "null_sd": float(null.std()),
        "null_q025": float(np.quantile(null, 0.025)),
        "null_q975": float(np.quantile(null, 0.975)),
        # (1 + #null >= observed) / (1 + n): never 0, exact under exchangeability.
        "p_value": float((1 + np.sum(null >= observed_auc)) / (1 + len(null))),
        "null_aucs": null.round(4).tolist(),
    }
