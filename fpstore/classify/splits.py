"""The paper's cross-validation protocol: 5 patient groups; train on 3, early-stop on 1, test on 1.

Splits are by patient (never by patch), stratified by label; with ``split="site"`` the groups
are whole sites (TCGA tissue-source sites), so that recognising a site cannot help a model on
its test group. A split depends only on the sorted patient ids, labels, sites and the seed, so
every method, encoder and pool of a comparison sees the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fpstore.config import SPLITS, check_choice, check_range
from fpstore.errors import ClassifyError


@dataclass(frozen=True)
class Fold:
    """Patient indices of one fold's roles; the three are disjoint."""

    index: int
    train: np.ndarray
    es: np.ndarray
    test: np.ndarray


def stratified_groups(y, n_groups: int = 5, seed: int = 0) -> np.ndarray:
    """Assign each patient to one of ``n_groups`` groups with the label ratio of the whole."""
    y = np.asarray(y)
    check_range("split", "n_groups", n_groups, 3, 50)
    for label in (0, 1):
        if (y == label).sum() < n_groups:
            raise ClassifyError(
                f"{(y == label).sum()} patients with label {label}: need at least {n_groups} "
                f"(one per group) for {n_groups}-fold cross-validation; lower --folds"
            )
    rng = np.random.default_rng(seed)
    # Deal each class's shuffled patients round-robin, continuing the count across classes so
    # group sizes differ by at most one; then shuffle which group gets the extras.
    order = np.concatenate([rng.permutation(np.flatnonzero(y == label)) for label in (0, 1)])
    groups = np.empty(len(y), dtype=np.int64)
    groups[order] = rng.permutation(n_groups)[np.arange(len(y)) % n_groups]
    return groups


def site_groups(y, sites, n_groups: int = 5, seed: int = 0, attempts: int = 200) -> np.ndarray:
    """Assign whole sites to groups, balancing patient counts; every group needs both classes."""
    y = np.asarray(y)
    sites = np.asarray(sites).astype(object)
    missing = np.array([s is None or s == "" or s == "None" for s in sites])
    if missing.any():
        raise ClassifyError(
            f"--split site: {int(missing.sum())} labelled patients have no site; "
            "add a site column to the cohort (cohort add --site-column) or use --split patient"
        )
    sites = sites.astype(str)
    names, site_of = np.unique(sites, return_inverse=True)
    if len(names) < n_groups:
        raise ClassifyError(
            f"--split site needs at least {n_groups} sites with labelled patients, found "
            f"{len(names)} ({', '.join(names)}); lower --folds or use --split patient"
        )
    size = np.bincount(site_of)
    rng = np.random.default_rng(seed)
    for attempt in range(attempts):
        # First try: largest site first into the emptiest group (balanced sizes); then
        # seeded random site orders until every group has both classes.
        order = np.argsort(-size, kind="stable") if attempt == 0 else rng.permutation(len(names))
        group_of_site = np.empty(len(names), dtype=np.int64)
        load = np.zeros(n_groups, dtype=np.int64)
        tie_break = rng.permutation(n_groups)
        for s in order:
            g = min(range(n_groups), key=lambda k: (load[k], tie_break[k]))
            group_of_site[s] = g
            load[g] += size[s]
        groups = group_of_site[site_of]
        if all(len(np.unique(y[groups == g])) == 2 for g in range(n_groups)):
            return groups
    raise ClassifyError(
        f"--split site: no assignment of the {len(names)} sites to {n_groups} groups gives every "
        "group both classes; lower --folds or use --split patient"
    )


def make_groups(y, split: str = "patient", sites=None, n_groups: int = 5, seed: int = 0):
    check_choice("split", "split", split, SPLITS)
    if split == "site":
        if sites is None:
            raise ClassifyError("--split site needs sites per patient; the cohort has none")
        return site_groups(y, sites, n_groups, seed)
    return stratified_groups(y, n_groups, seed)


def cv_folds(groups) -> list[Fold]:
    """Fold k tests group k, early-stops on group k+1 (mod n), trains on the other groups."""
    groups = np.asarray(groups)
    n = int(groups.max()) + 1
    folds = []
    for k in range(n):
        es = (k + 1) % n
        folds.append(
            Fold(
                index=k,
                train=np.flatnonzero((groups != k) & (groups != es)),
                es=np.flatnonzero(groups == es),
                test=np.flatnonzero(groups == k),
            )
        )
    return folds


def final_fold(groups) -> Fold:
    """The final model for external validation: train on all groups but one, early-stop on it."""
    groups = np.asarray(groups)
    return Fold(
        index=-1,
        train=np.flatnonzero(groups != 0),
        es=np.flatnonzero(groups == 0),
        test=np.zeros(0, dtype=np.int64),
    )
