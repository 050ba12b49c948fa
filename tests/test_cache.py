"""The LMDB patch cache: round trips, growth, errors, and DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fpstore.errors import ConfigError, StoreError
from fpstore.slides.cache import CacheCodec, PatchCache

CMU = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def real_patches():
    """Sixteen real 64 px H&E patches cut from CMU-1-Small-Region."""
    pixels = tifffile.imread(CMU)[1800:2056, 600:856]
    return [pixels[y : y + 64, x : x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)]


def _keys(n):
    return [f"CMU-1-Small-Region/{600 + 64 * (i % 4)}_{1800 + 64 * (i // 4)}_64" for i in range(n)]


def test_png_is_lossless_and_meta_comes_back(tmp_path, real_patches):
    keys = _keys(len(real_patches))
    meta = [
        {"slide_id": "CMU-1-Small-Region", "x": np.int64(i), "label": 1} for i in range(len(keys))
    ]
    with PatchCache(tmp_path / "c", readonly=False, codec=CacheCodec("png")) as cache:
        assert cache.put_many(keys, real_patches, meta) == 16
    cache = PatchCache(tmp_path / "c")
    assert len(cache) == 16 and sorted(cache.keys()) == sorted(keys) and keys[3] in cache
    image, got = cache.get(keys[5])
    assert np.array_equal(image, real_patches[5])
    assert got == {"slide_id": "CMU-1-Small-Region", "x": 5, "label": 1}
    with pytest.raises(KeyError, match="not in the cache"):
        cache.get("CMU-1-Small-Region/0_0_64")


def test_jpeg_is_close_and_smaller(tmp_path, real_patches):
    keys = _keys(len(real_patches))
    PatchCache(tmp_path / "j", readonly=False, codec=CacheCodec("jpeg", 90)).put_many(
        keys, real_patches
    )
    PatchCache(tmp_path / "p", readonly=False, codec=CacheCodec("png")).put_many(keys, real_patches)
    jpeg = PatchCache(tmp_path / "j")
    for key, original in zip(keys, real_patches):
        assert np.abs(jpeg.get(key).image.astype(int) - original).mean() < 4
    size = {name: (tmp_path / name / "data.mdb").stat().st_size for name in "jp"}
    assert size["j"] <= size["p"]


def test_map_grows_as_needed(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 48, 48, 3), dtype=np.uint8)  # ~7 KB each as PNG
    keys = [f"s/{i}_0_48" for i in range(300)]
    cache = PatchCache(
        tmp_path / "g", readonly=False, codec=CacheCodec("png"), map_size=256 << 10, batch_size=64
    )
    assert cache.put_many(keys, noise) == 300
    assert cache.map_size > 256 << 10
    cache.close()
    reader = PatchCache(tmp_path / "g")
    assert len(reader) == 300 and np.array_equal(reader.get(keys[-1]).image, noise[-1])


def test_bad_input_is_refused_and_loses_nothing(tmp_path, real_patches):
    with pytest.raises(StoreError, match="no patch cache"):
        PatchCache(tmp_path / "missing")
    writer = PatchCache(tmp_path / "c", readonly=False)
    writer.put_many(_keys(2), real_patches[:2])
    with pytest.raises(StoreError, match=r"\(H, W, 3\) uint8"):
        writer.put_many(["s/bad"], [np.zeros((8, 8), np.float32)])
    with pytest.raises(StoreError, match="1 keys but 2 meta"):
        writer.put_many(["s/x"], real_patches[:1], [{}, {}])
    writer.close()
    with pytest.raises(StoreError, match="cannot take patches"):
        PatchCache(tmp_path / "c", readonly=False, codec=CacheCodec("png")).put_many(
            ["s/y"], real_patches[:1]
        )
    reader = PatchCache(tmp_path / "c")
    assert len(reader) == 2
    with pytest.raises(StoreError, match="read-only"):
        reader.put_many(["s/z"], real_patches[:1])
    with pytest.raises(ConfigError):
        CacheCodec("webp")


class _CacheDataset:
    def __init__(self, cache, keys):
        self.cache, self.keys = cache, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        import torch

        return torch.from_numpy(self.cache.get(self.keys[i]).image.copy())


def test_dataloader_workers_read_a_cache_opened_in_the_parent(tmp_path, real_patches):
    torch = pytest.importorskip("torch")
    keys = _keys(len(real_patches))
    PatchCache(tmp_path / "c", readonly=False, codec=CacheCodec("png")).put_many(keys, real_patches)
    cache = PatchCache(tmp_path / "c")
    cache.get(keys[0])  # the parent's environment is open before the workers fork
    loader = torch.utils.data.DataLoader(
        _CacheDataset(cache, keys), batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    batches = torch.cat(list(loader)).numpy()
    assert np.array_equal(batches, np.stack(real_patches))


def test_pickled_cache_reopens_without_the_parents_handle(tmp_path, real_patches):
    keys = _keys(2)
    PatchCache(tmp_path / "c", readonly=False).put_many(keys, real_patches[:2])
    cache = PatchCache(tmp_path / "c")
    cache.get(keys[0])
    state = pickle.dumps(cache)
    clone = pickle.loads(state)
    assert clone._env is None  # spawn workers start with no environment
    assert np.array_equal(clone.get(keys[1]).image, cache.get(keys[1]).image)
