"""Synthetic bags with a planted, morphology-like signal for the classifier tests.

Each patient has ``n_patches`` patches of dimension ``dim``, typed epithelium / stroma / fat
(50 / 35 / 15 %). With ``signal``, a patient's epithelium patches are shifted along one fixed
direction by +shift (positive) or -shift (negative): the marker is visible in epithelium only,
as in the paper. Without it, labels are drawn independently of the features (negative control).
Sites (``n_sites``) add a per-site offset along another direction when ``site_effect`` > 0.
"""

from __future__ import annotations

import numpy as np

from fpstore.classify.bags import Bags

TYPES = np.array(["epithelium", "stroma", "fat"])


def make_bags(
    n_patients=100,
    n_patches=20,
    dim=32,
    signal=True,
    shift=1.0,
    seed=0,
    n_sites=0,
    site_effect=0.0,
    positive_rate=0.6,
):
    rng = np.random.default_rng(seed)
    y = (rng.random(n_patients) < positive_rate).astype(np.int8)
    index = np.repeat(np.arange(n_patients), n_patches)
    tissue = TYPES[rng.choice(3, size=len(index), p=[0.5, 0.35, 0.15])]
    x = rng.normal(size=(len(index), dim)).astype(np.float32)
    marker_dir, site_dir = np.eye(dim, dtype=np.float32)[:2]
    if signal:
        sign = np.where(y[index] == 1, 1.0, -1.0) * (tissue == "epithelium")
        x += (shift * sign)[:, None].astype(np.float32) * marker_dir
    sites = None
    if n_sites:
        site_of = rng.integers(0, n_sites, n_patients)
        sites = np.array([f"S{s}" for s in site_of])
        x += (site_effect * site_of[index])[:, None].astype(np.float32) * site_dir
    ids = np.array([f"P{i:04d}" for i in range(n_patients)])
    bags = Bags(
        patient_ids=ids,
        features=x,
        bag_index=index,
        tissue=tissue,
        patch_ids=np.array([f"{p}-slide/{k}_0_224" for p, k in zip(ids[index], range(len(index)))]),
        slide_ids=np.array([f"{p}-slide" for p in ids[index]]),
        sites=sites,
    )
    return bags, y
