"""Tissue masks remembered in the store: keyed by the slide file and the mask settings."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import fpstore.slides.mask_cache as mask_cache
from fpstore.slides.mask_cache import remembered_mask, settings_digest, slide_digest
from fpstore.slides.tissue_mask import TissueMaskSpec

CMU = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture
def slide(tmp_path):
    copy = tmp_path / "slide.svs"
    shutil.copy(CMU, copy)
    return copy


def test_a_remembered_mask_is_the_computed_one_and_is_not_computed_again(
    slide, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    info, mask = remembered_mask(slide, None, store)
    files = list((store / "cache" / "tissue-masks").rglob("*.npz"))
    assert len(files) == 1 and mask.mask.any() and not mask.mask.all()
    monkeypatch.setattr(mask_cache, "tissue_mask", lambda *a: pytest.fail("computed again"))
    info2, mask2 = remembered_mask(slide, None, store)
    assert info2 == info and mask2.downsample == mask.downsample
    np.testing.assert_array_equal(mask2.mask, mask.mask)


def test_the_key_follows_the_file_its_mpp_and_the_mask_settings(slide, tmp_path):
    key = slide_digest(slide, None)
    assert slide_digest(slide, 0.25) != key  # another mpp: another mask scale
    os.utime(slide, ns=(0, 10**9))  # the file changed (or was replaced)
    assert slide_digest(slide, None) != key
    assert slide_digest(tmp_path / "missing.svs", None) is None
    assert settings_digest(TissueMaskSpec(min_saturation=12)) != settings_digest(TissueMaskSpec())


def test_an_unreadable_remembered_mask_is_computed_again_and_replaced(slide, tmp_path):
    store = tmp_path / "store"
    _, mask = remembered_mask(slide, None, store)
    (path,) = (store / "cache" / "tissue-masks").rglob("*.npz")
    path.write_bytes(b"half a file")
    _, again = remembered_mask(slide, None, store)
    np.testing.assert_array_equal(again.mask, mask.mask)
    assert path.stat().st_size > 100
