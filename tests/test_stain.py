"""Stain operations: optical density, stain matrices recovered from Beer-Lambert renders with
known stain vectors, normalisation (Macenko, Vahadane, Reinhard) on real H&E, augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fpstore.config import PatchSpec
from fpstore.errors import ConfigError, StainError
from fpstore.slides.grid import patch_grid
from fpstore.slides.slide import open_slide
from fpstore.slides.stain import (
    STAIN_METHODS,
    StainAugment,
    StainAugmentConfig,
    StainNormalizer,
    StainNormConfig,
    apply_stain_params,
    concentrations,
    default_target_path,
    draw_stain_params,
    macenko_matrix,
    optical_density,
    read_rgb,
    rgb_from_od,
    stain_angle,
    tissue_pixels,
    vahadane_matrix,
)
from fpstore.synth import get_preset
from fpstore.synth.api import draw_patient, wsi_scene
from fpstore.synth.render import TileRenderer
from fpstore.synth.sites import SITES

DATA = Path(__file__).parent / "data"
TARGET = DATA / "patches" / "tiatoolbox-target_image.png"
BLANK = DATA / "tiles" / "histolab-no-tissue.png"  # real empty glass


@pytest.fixture(scope="module")
def cmu_patches():
    """16 real tissue patches of the CMU slide (112 um at 224 px) and 2 of its bare glass."""
    with open_slide(DATA / "slides" / "CMU-1-Small-Region.svs") as slide:
        grid = patch_grid(slide, PatchSpec(min_tissue=0.9))
        xy = np.stack([grid.column("x").to_numpy(), grid.column("y").to_numpy()], 1)[:16]
        size = slide.patch_size_px(112.0)
        tissue = slide.read_patches(xy, size, 224)
        glass = slide.read_patches(np.array([[50, 1400], [1900, 100]]), size, 224)
    return tissue, glass


@pytest.fixture(scope="module")
def scene():
    patient = draw_patient(7, "P-1", "tcga", get_preset("small"), signal=True)
    return wsi_scene(7, "s.svs", patient.morph, (2048, 2048))


def render(scene, site_name: str, tx: int = 1, light=(255.0, 255.0, 255.0)):
    """A 512 px Beer-Lambert render of the scene by one site (light at I0 = 255 by default,
    as optical_density assumes), and the site."""
    site = SITES[site_name] if light is None else dataclasses.replace(SITES[site_name], light=light)
    return TileRenderer(scene, site, 1.0, 512).render(tx, 1)[0], site


def lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit Lab of uint8 RGB, the space Reinhard normalisation works in."""
    flat = cv2.cvtColor(rgb.reshape(-1, rgb.shape[-2], 3), cv2.COLOR_RGB2LAB)
    return flat.reshape(rgb.shape).astype(np.float64)


def stains_of(rgb: np.ndarray) -> np.ndarray:
    od = optical_density(rgb)
    return macenko_matrix(od[tissue_pixels(od)])


# --- optical density ------------------------------------------------------------------------


def test_optical_density_of_real_pixels(cmu_patches):
    tissue, glass = cmu_patches
    od = optical_density(tissue)
    assert od.dtype == np.float32 and od.shape == tissue.shape
    assert od.min() >= 0 and od.max() <= np.log(255) + 1e-5
    assert optical_density(np.array([255, 1, 0], np.uint8)).tolist() == pytest.approx(
        [0, np.log(255), np.log(255)]
    )
    # Glass is nearly transparent, tissue absorbs: real values of this Aperio scan.
    assert optical_density(glass).mean() < 0.1 < 0.3 < od.mean() < 1.5
    ones = np.clip(tissue, 1, 255)
    np.testing.assert_array_equal(rgb_from_od(optical_density(ones)), ones)


# --- stain matrices -------------------------------------------------------------------------


@pytest.mark.parametrize("site_name", ["A", "B", "X1"])
def test_known_stain_vectors_are_recovered(scene, site_name):
    rgb, site = render(scene, site_name)
    od = optical_density(rgb)
    pixels = od[tissue_pixels(od)]
    macenko = macenko_matrix(pixels)
    assert stain_angle(macenko[0], site.hematoxylin) < 2.5
    assert stain_angle(macenko[1], site.eosin) < 2.5
    vahadane = vahadane_matrix(pixels)
    assert stain_angle(vahadane[0], site.hematoxylin) < 4.0
    assert stain_angle(vahadane[1], site.eosin) < 7.0
    # With the site's own glass colour (I0 ~ 240, not 255) Macenko is still within 6 degrees.
    rgb, site = render(scene, site_name, light=None)
    m = stains_of(rgb)
    assert stain_angle(m[0], site.hematoxylin) < 6 and stain_angle(m[1], site.eosin) < 6


def test_concentrations_invert_the_mixture():
    matrix = np.array(SITES["A"].hematoxylin + SITES["A"].eosin, np.float32).reshape(2, 3)
    conc = np.array([[0.5, 0.1], [0.0, 1.2], [1.5, 0.7]], np.float32)
    np.testing.assert_allclose(concentrations(conc @ matrix, matrix), conc, atol=1e-5)


# --- normalisation --------------------------------------------------------------------------


def test_default_target_is_tiatoolbox_installed_image_and_digest_is_stable():
    assert default_target_path().read_bytes() == TARGET.read_bytes()
    norm = StainNormalizer()
    assert norm.describe() == {
        "stain_norm": {
            "method": "macenko",
            "per": "slide",
            "min_od": 0.15,
            "percentile": 99.0,
            "min_tissue_px": 1000,
        },
        "target_sha256": "921530927c3a8758617e2bf68209c9083a6e8144846d73a62f0749554cf53337",
    }
    assert norm.digest == "a19f79dd13a63ab9"
    assert StainNormalizer(StainNormConfig(target=str(TARGET))).digest == norm.digest
    others = {StainNormalizer(StainNormConfig(method)).digest for method in STAIN_METHODS}
    others.add(StainNormalizer(StainNormConfig(per="patch")).digest)
    others.add(StainNormalizer(target=read_rgb(TARGET)[:500, :500]).digest)
    assert len(others) == 5


@pytest.mark.parametrize("method", STAIN_METHODS)
def test_normalising_the_target_to_itself_is_near_identity(method):
    target = read_rgb(TARGET)
    norm = StainNormalizer(StainNormConfig(method))
    out = norm.transform(target, norm.fit_source(target))
    diff = np.abs(out.astype(int) - target)
    # Macenko and Vahadane keep only the two stains (the residual OD is dropped).
    assert diff.mean() < (0.5 if method == "reinhard" else 2.5), diff.mean()


@pytest.mark.parametrize("method", STAIN_METHODS)
def test_site_b_is_moved_to_site_a(scene, method):
    a, site_a = render(scene, "A")
    b1, _ = render(scene, "B", tx=1)
    b2, _ = render(scene, "B", tx=2)
    norm = StainNormalizer(StainNormConfig(method), target=a)
    sample = np.stack([b1, b2])
    out = norm.transform(sample, norm.fit_source(sample))
    if method == "reinhard":  # Lab statistics of the tissue, not stain vectors, are matched
        tissue = tissue_pixels(optical_density(sample))
        moved, was = lab(out)[tissue], lab(sample)[tissue]
        assert np.abs(was.mean(axis=0) - norm.target_.mean).max() > 3
        np.testing.assert_allclose(moved.mean(axis=0), norm.target_.mean, atol=1.0)
        np.testing.assert_allclose(moved.std(axis=0), norm.target_.std, rtol=0.1)
        return
    before, after = stains_of(b1), stains_of(out[0])
    for row, truth in ((0, site_a.hematoxylin), (1, site_a.eosin)):
        assert stain_angle(before[row], truth) > 8
        assert stain_angle(after[row], truth) < 3


def test_blank_target_is_refused():
    with pytest.raises(ConfigError, match="choose an image with H&E tissue"):
        StainNormalizer(target=read_rgb(BLANK))
    with pytest.raises(ConfigError, match="cannot read the stain target"):
        StainNormalizer(StainNormConfig(target=str(DATA / "missing.png")))


def test_per_slide_and_per_patch_modes(cmu_patches):
    tissue, glass = cmu_patches
    batch = np.concatenate([tissue, glass])
    per_slide = StainNormalizer()
    source = per_slide.fit_source(tissue)
    out = per_slide.transform(batch, source)
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.abs(out[:16].astype(int) - tissue).mean() > 5  # CMU is far from the target
    # The same transform for every patch of the slide: a patch alone gets the same pixels.
    np.testing.assert_array_equal(per_slide.transform(tissue[3], source), out[3])
    with pytest.raises(ConfigError, match="fit_source"):
        per_slide.transform(batch)
    with pytest.raises(StainError, match="sample has"):
        per_slide.fit_source(glass)
    per_patch = StainNormalizer(StainNormConfig(per="patch"))
    alone = per_patch.transform(batch)
    np.testing.assert_array_equal(alone[16:], glass)  # too little tissue: kept as it is
    assert np.abs(alone[:16].astype(int) - tissue).mean() > 5
    with pytest.raises(ConfigError, match="drop source"):
        per_patch.transform(batch, source)
    with pytest.raises(ConfigError, match="uint8"):
        per_slide.transform(batch.astype(np.float32), source)


# --- augmentation ---------------------------------------------------------------------------


def test_augmentation_with_zero_sigmas_is_the_identity(cmu_patches):
    tissue, glass = cmu_patches
    batch = np.concatenate([tissue, glass])
    out = StainAugment(StainAugmentConfig(scale=0.0, shift=0.0))(batch)
    assert np.abs(out.astype(int) - batch).max() <= 1


def test_augmentation_scales_and_shifts_concentrations_within_bounds(cmu_patches):
    tissue, _ = cmu_patches
    cfg = StainAugmentConfig(scale=0.3, shift=0.0)
    params = draw_stain_params(len(tissue), cfg, torch.Generator().manual_seed(3))
    alpha = params["alpha"].numpy()
    assert ((alpha >= 0.7) & (alpha <= 1.3)).all() and alpha.std() > 0.05
    x = torch.from_numpy(tissue).permute(0, 3, 1, 2).float() / 255
    out = apply_stain_params(x, params, cfg).permute(0, 2, 3, 1).numpy()
    matrix = np.asarray(cfg.matrix, np.float32)
    od_in = optical_density(tissue)
    od_out = -np.log(np.clip(out, 1 / 255, 1))
    # Fully stained pixels, none saturated before or after.
    full = od_in.sum(axis=-1) >= cfg.stained_od[1]
    full &= (tissue > 0).all(axis=-1) & (od_out.max(axis=-1) < np.log(255) - 0.1)
    for i in range(len(tissue)):
        c_in = concentrations(od_in[i][full[i]], matrix)
        c_out = concentrations(od_out[i][full[i]], matrix)
        ratio = np.nanmedian(c_out / np.where(np.abs(c_in) > 0.2, c_in, np.nan), axis=0)
        np.testing.assert_allclose(ratio, alpha[i], atol=0.02)
    shifted = StainAugmentConfig(scale=0.0, shift=0.1)
    params = draw_stain_params(len(tissue), shifted, torch.Generator().manual_seed(4))
    out = apply_stain_params(x, params, shifted).permute(0, 2, 3, 1).numpy()
    od_out = -np.log(np.clip(out, 1 / 255, 1))
    beta = params["beta"].numpy()
    assert (np.abs(beta) <= 0.1).all()
    for i in range(len(tissue)):
        dense = od_in[i].sum(axis=-1) >= shifted.stained_od[1]  # shifted in full
        delta = np.median(concentrations(od_out[i][dense] - od_in[i][dense], matrix), axis=0)
        np.testing.assert_allclose(delta, beta[i], atol=0.01)


def test_augmentation_is_seeded_and_keeps_the_input_type(cmu_patches):
    tissue, glass = cmu_patches
    a = StainAugment(seed=5)(tissue)
    b = StainAugment(seed=5)(tissue)
    c = StainAugment(seed=6)(tissue)
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == tissue.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1
    as_tensor = StainAugment(seed=5)(torch.from_numpy(tissue))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.uint8
    np.testing.assert_array_equal(as_tensor.numpy(), a)
    # Glass stays glass: the shift follows how stained a pixel is.
    moved = StainAugment(StainAugmentConfig(shift=0.2, vector=0.05), seed=1)(glass)
    assert np.abs(moved.astype(int) - glass).mean() < 2
    with pytest.raises(ConfigError, match="uint8"):
        StainAugment()(tissue.astype(np.float32))
    with pytest.raises(ConfigError, match="scale"):
        StainAugmentConfig(scale=1.5)
