"""Per-patch stain normalisation of a batch at once (fpstore.slides.stain_batch), in both of
its forms (the CPU's OpenCV and numpy kernels, and the torch steps other devices run, here on
the CPU), against the per-patch numpy estimate it replaced, on real H&E: patches of the CMU
slide and crops of a real TMA's cores; the exact percentiles of both against numpy's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fpstore.config import PatchSpec
from fpstore.errors import StainError
from fpstore.extract.config import ExtractConfig
from fpstore.slides.grid import patch_grid
from fpstore.slides.slide import open_slide
from fpstore.slides.stain import (
    STAIN_METHODS,
    StainNormalizer,
    StainNormConfig,
    optical_density,
    read_rgb,
    tissue_pixels,
)
from fpstore.slides.stain_batch import _normalise, _percentiles, _quantile

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def real_patches():
    """12 CMU tissue patches (112 um at 224 px), 4 crops of 224 px of a real H&E TMA with
    cores in them, and one patch of the CMU slide's bare glass."""
    with open_slide(DATA / "slides" / "CMU-1-Small-Region.svs") as slide:
        grid = patch_grid(slide, PatchSpec(min_tissue=0.5))
        xy = np.stack([grid.column("x").to_numpy(), grid.column("y").to_numpy()], 1)
        size = slide.patch_size_px(112.0)
        cmu = slide.read_patches(xy[:: max(1, len(xy) // 12)][:12], size, 224)
        glass = slide.read_patches(np.array([[50, 1400]]), size, 224)
    tma = read_rgb(DATA / "tma" / "tma_he_histoprep_tma_spots.jpeg")
    crops = [
        tma[y : y + 224, x : x + 224]
        for y in range(0, tma.shape[0] - 224, 224)
        for x in range(0, tma.shape[1] - 224, 224)
    ]
    stained = [c for c in crops if tissue_pixels(optical_density(c)).sum() >= 3_000]
    assert len(stained) >= 4
    return np.concatenate([cmu, np.stack(stained[:4]), glass])


@pytest.fixture(scope="module")
def encoder():
    return ExtractConfig(encoder="random-resnet34", encoder_options={"seed": 0}).build_encoder()


def _one_by_one(method: str, patches: np.ndarray) -> np.ndarray:
    """The per-patch numpy path the batch replaced: each patch's stains fitted on itself."""
    norm = StainNormalizer(StainNormConfig(method))
    out = []
    for patch in patches:
        try:
            out.append(norm.transform(patch, norm.fit_source(patch)))
        except StainError:
            out.append(patch)  # too little tissue: kept
    return np.stack(out)


def _torch_form(norm: StainNormalizer, patches: np.ndarray) -> np.ndarray:
    """The torch steps a GPU runs, here on the CPU, 8 patches at a time (as on a GPU)."""
    batch = torch.from_numpy(patches)
    return torch.cat([_normalise(part, norm) for part in batch.split(8)]).numpy()


@pytest.mark.parametrize("form", ["cpu", "torch"])
@pytest.mark.parametrize("method", STAIN_METHODS)
def test_batch_matches_the_per_patch_estimate_on_real_patches(real_patches, encoder, method, form):
    expected = _one_by_one(method, real_patches)
    norm = StainNormalizer(StainNormConfig(method, per="patch"))
    got = norm.transform(real_patches) if form == "cpu" else _torch_form(norm, real_patches)
    diff = np.abs(got.astype(int) - expected)
    # float32 where numpy used float64: at most one 8-bit level, on a few pixels
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(got[-1], real_patches[-1])  # glass: kept
    assert np.abs(got[:-1].astype(int) - real_patches[:-1]).mean() > 3  # they did move
    # and what the demo's random-weight control makes of them is the same
    with torch.inference_mode():
        a = encoder.encode(torch.from_numpy(expected[[0, 6, 12]]))
        b = encoder.encode(torch.from_numpy(got[[0, 6, 12]]))
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9999


def test_batch_on_a_torch_tensor_and_in_chunks_gives_the_same_pixels(real_patches):
    norm = StainNormalizer(StainNormConfig("macenko", per="patch"))
    whole = norm.transform_tensor(torch.from_numpy(real_patches))
    alone = [norm.transform_tensor(torch.from_numpy(p[None]))[0] for p in real_patches[[0, 13]]]
    assert whole.dtype == torch.uint8 and whole.shape == real_patches.shape
    # a patch's pixels depend on itself only, whichever patches share its batch
    np.testing.assert_array_equal(whole[0].numpy(), alone[0].numpy())
    np.testing.assert_array_equal(whole[13].numpy(), alone[1].numpy())


@pytest.mark.parametrize("q", [0.0, 0.01, 0.37, 0.5, 0.99, 1.0])
def test_percentiles_are_numpys(q):
    gen = np.random.default_rng(3)
    values = gen.normal(size=(5, 4_000)).astype(np.float32)
    mask = gen.random((5, 4_000)) < np.array([[0.001], [0.1], [0.5], [0.9], [1.0]])
    mask[0, :3] = True  # at least three values in the sparsest row
    # the last row: every 8th value far above the rest, so the threshold drawn from every
    # 8th value keeps too few and that row falls back to all of its values
    values[4, ::8] += 100.0
    got = _quantile(torch.from_numpy(values), torch.from_numpy(mask), q).numpy()
    expected = [np.percentile(v[m], 100 * q) for v, m in zip(values, mask)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_batch_with_the_fitting_subsample_matches_the_per_patch_estimate(real_patches, monkeypatch):
    # _estimate fits on an even subsample of the tissue pixels once they number twice
    # FIT_PIXELS (patches over ~630 px); a smaller FIT_PIXELS exercises it on 224 px patches
    import fpstore.slides.colour
    import fpstore.slides.stain

    monkeypatch.setattr(fpstore.slides.colour, "FIT_PIXELS", 4_000)
    monkeypatch.setattr(fpstore.slides.stain, "FIT_PIXELS", 4_000)
    patches = real_patches[[0, 5, 12, 16]]  # CMU, CMU, TMA, glass
    for method in ("macenko", "vahadane"):
        expected = _one_by_one(method, patches)
        norm = StainNormalizer(StainNormConfig(method, per="patch"))
        for got in (norm.transform(patches), _torch_form(norm, patches)):
            diff = np.abs(got.astype(int) - expected)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("n", [50, 3_000, 40_000])
def test_cpu_percentiles_are_numpys(n):
    gen = np.random.default_rng(n)
    values = gen.normal(size=n).astype(np.float32)
    qs = (0.0, 0.01, 0.37, 0.5, 0.99, 1.0)
    expected = np.percentile(values, [100 * q for q in qs])
    np.testing.assert_allclose(_percentiles(values, qs), expected, rtol=1e-6, atol=1e-6)
    # through an increasing function, applied to the two values each percentile needs
    expected = np.percentile(np.arctan(values.astype(np.float64)), [1.0, 99.0])
    np.testing.assert_allclose(_percentiles(values, (0.01, 0.99), np.arctan), expected, rtol=1e-6)
    # every 32nd value far out on both sides: the tails cut from the subsample hold too few
    # values, and the whole array is partitioned instead
    values[::32] += np.where(np.arange(len(values[::32])) % 2, 100.0, -100.0).astype(np.float32)
    expected = np.percentile(values, [100 * q for q in qs])
    np.testing.assert_allclose(_percentiles(values, qs), expected, rtol=1e-6, atol=1e-6)
