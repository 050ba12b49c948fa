"""Recognition and similarity maps: glass stays grey, tissue is scored as the matching game scores it."""

import numpy as np
import pytest
import torch

from fpstore.encoders.fingerprint_net import FingerprintNet, to_input
from fpstore.fingerprint.maps import (
    glass_patches,
    paint,
    patch_grid,
    recognition_map,
    similarity_map,
)

PRE = {"mean": [0.7, 0.5, 0.7], "std": [0.2, 0.2, 0.2], "patch_um": 32.0, "out_px": 32, "mpp": 0.5}


def _half_tissue(h=128, w=128, seed=0):
    """Pink noisy tissue on the left half, white glass on the right half."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 245, np.uint8)
    image[:, : w // 2] = rng.integers(90, 200, (h, w // 2, 3), dtype=np.uint8)
    return image


def test_paint_leaves_out_nan_patches():
    corners = [(0, 0), (0, 2)]
    out = paint((4, 6), corners, 4, np.array([1.0, np.nan]))
    assert np.all(out[:, :4] == 1.0)  # the overlap takes the one real value
    assert np.all(np.isnan(out[:, 4:]))  # covered only by the NaN patch


def test_glass_patches_are_the_ones_on_white():
    image = _half_tissue()
    corners = patch_grid(128, 128, 64, overlap=0.0)
    assert glass_patches(image, corners, 64).tolist() == [False, True, False, True]


def test_maps_grey_out_glass_and_use_the_game_fingerprint():
    torch.manual_seed(0)
    model = FingerprintNet(3, "resnet18").eval()
    meta = {"preprocessing": PRE, "data": {"class_patients": ["P", "P", "Q"]}}
    image = _half_tissue()
    probs = recognition_map(model, meta, image, "P", mpp=0.5)
    assert probs.shape == (128, 128)
    assert np.isnan(probs[:, -8:]).all() and not np.isnan(probs[:, :56]).any()
    assert np.nanmin(probs) >= 0 and np.nanmax(probs) <= 1

    reference = _half_tissue(seed=1)
    sims = similarity_map(model, meta, reference, image, mpp=0.5, overlap=0.0)
    assert np.isnan(sims[:, 64:]).all() and not np.isnan(sims[:, :64]).any()

    # A patch's value is its cosine with the reference half's fingerprint as the matching game
    # makes it: the normalised mean of its tissue patches' normalised fingerprints (glass left out).
    def fingerprints(img, corners):
        crops = torch.from_numpy(np.stack([img[y : y + 64, x : x + 64] for y, x in corners]))
        with torch.no_grad():
            return torch.nn.functional.normalize(
                model.features(to_input(crops, PRE["mean"], PRE["std"], 32)), dim=1
            )

    half = torch.nn.functional.normalize(fingerprints(reference, [(0, 0), (64, 0)]).mean(0), dim=0)
    assert sims[0, 0] == pytest.approx(float(fingerprints(image, [(0, 0)])[0] @ half), abs=1e-4)
