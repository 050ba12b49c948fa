"""Core halves for training and matching: the in-memory ``CoreSet``, its on-disk cache,
and the random-crop stream the trainer reads.

A CoreSet holds, per physical core of one section, its left and right halves
(uint8 [n, H, W, 3]) with the core's identity: ``key`` (the class: "<array>:<core_index>",
the same physical core in every serial section), patient, section and site. A cache folder
stores one CoreSet as .npy files (read back memory-mapped, so random crops need no decoding)
plus ``cores.json``:

    left.npy right.npy            uint8 [n, H, W, 3]
    tissue_left.npy ...           bool [n, H/16, W/16]: where crops may be taken
    restyled/<name>/left.npy      uint8 [n, k, H, W, 3]: k restyled copies of each left half
    cores.json                    items, mpp, size, source files
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fpstore.errors import ConfigError, TrainingError
from fpstore.store.io import staged_folder, write_npy_atomic

TISSUE_STRIDE = 16  # px of the coarse tissue grid; crops start on it, plus random jitter
MIN_TISSUE = 0.5  # crops keep at least this fraction of tissue (cores are round)
REGIONS = 2  # the set-level objective's two regions of a class (SetStream)
SET_CROPS = 2  # crops per region
CACHE_VERSION = 1


def tissue_grid(halves: np.ndarray, stride: int = TISSUE_STRIDE) -> np.ndarray:
    """Coarse tissue masks [n, H//stride, W//stride] of uint8 images [n, H, W, 3]:
    a cell is tissue when its darkest channel averages below 220 (glass is near white)."""
    n, h, w, _ = halves.shape
    gh, gw = h // stride, w // stride
    out = np.zeros((n, gh, gw), bool)
    for i in range(n):
        darkest = halves[i, : gh * stride, : gw * stride].min(axis=2).astype(np.float32)
        cells = darkest.reshape(gh, stride, gw, stride).mean(axis=(1, 3))
        out[i] = cells < 220
    return out


@dataclass
class CoreSet:
    left: np.ndarray
    right: np.ndarray
    key: np.ndarray  # class identity of the physical core, e.g. "train:17"
    patient_id: np.ndarray
    section: np.ndarray
    site: np.ndarray
    core_index: np.ndarray
    mpp: float = 0.5
    tissue_left: np.ndarray | None = None
    tissue_right: np.ndarray | None = None
    restyled: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n, k, H, W, 3]

    def __post_init__(self):
        n = len(self.left)
        for name in ("right", "key", "patient_id", "section", "site", "core_index"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"CoreSet.{name} has {len(getattr(self, name))} items, left has {n}"
                )
        if self.left.ndim != 4 or self.left.shape[-1] != 3 or self.left.dtype != np.uint8:
            raise ConfigError(
                f"CoreSet.left must be uint8 [n, H, W, 3], got {self.left.dtype} {self.left.shape}"
            )
        if self.tissue_left is None:
            self.tissue_left = tissue_grid(self.left)
        if self.tissue_right is None:
            self.tissue_right = tissue_grid(self.right)

    def __len__(self) -> int:
        return len(self.left)

    @property
    def half_shape(self) -> tuple[int, int]:
        return self.left.shape[1], self.left.shape[2]

    def items(self) -> list[dict]:
        return [
            {
                "key": str(k),
                "patient_id": str(p),
                "section": str(s),
                "site": str(t),
                "core_index": int(c),
            }
            for k, p, s, t, c in zip(
                self.key, self.patient_id, self.section, self.site, self.core_index
            )
        ]

    def select(self, mask) -> CoreSet:
        """The items where ``mask`` (bool or indices) holds; arrays are copied into memory."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, int)
        return CoreSet(
            left=np.asarray(self.left[idx]),
            right=np.asarray(self.right[idx]),
            key=self.key[idx],
            patient_id=self.patient_id[idx],
            section=self.section[idx],
            site=self.site[idx],
            core_index=self.core_index[idx],
            mpp=self.mpp,
            tissue_left=self.tissue_left[idx],
            tissue_right=self.tissue_right[idx],
            restyled={k: np.asarray(v[idx]) for k, v in self.restyled.items()},
        )

    @staticmethod
    def concat(parts: list[CoreSet]) -> CoreSet:
        if not parts:
            raise TrainingError("no cores to combine")
        shapes = {p.half_shape for p in parts}
        if len(shapes) > 1:
            raise ConfigError(
                f"core sets have different half sizes {sorted(shapes)}; prepare them with one --size"
            )
        names = set.intersection(*(set(p.restyled) for p in parts))
        cat = np.concatenate
        return CoreSet(
            left=cat([p.left for p in parts]),
            right=cat([p.right for p in parts]),
            key=cat([p.key for p in parts]),
            patient_id=cat([p.patient_id for p in parts]),
            section=cat([p.section for p in parts]),
            site=cat([p.site for p in parts]),
            core_index=cat([p.core_index for p in parts]),
            mpp=parts[0].mpp,
            tissue_left=cat([p.tissue_left for p in parts]),
            tissue_right=cat([p.tissue_right for p in parts]),
            restyled={k: cat([p.restyled[k] for p in parts]) for k in names},
        )


def class_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class id per item, sorted class keys): every physical core is one class."""
    classes, ids = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    return ids.astype(np.int64), classes


# --- the cache folder ------------------------------------------------------------------------


def write_index(folder: Path, items: list[dict], mpp: float, extra: dict | None = None) -> None:
    """Write cores.json into a cache folder being filled (``fpstore.store.io.staged_folder``:
    the folder appears whole, in one step, so a cache that exists is whole)."""
    doc = {"version": CACHE_VERSION, "mpp": mpp, "items": items, **(extra or {})}
    (Path(folder) / "cores.json").write_text(json.dumps(doc, indent=1))


def write_coreset(cores: CoreSet, folder: Path, extra: dict | None = None) -> Path:
    """Write ``cores`` to ``folder`` atomically."""
    with staged_folder(folder) as tmp:
        for name in ("left", "right", "tissue_left", "tissue_right"):
            np.save(tmp / f"{name}.npy", np.asarray(getattr(cores, name)))
        for style, copies in cores.restyled.items():
            (tmp / "restyled" / style).mkdir(parents=True)
            np.save(tmp / "restyled" / style / "left.npy", np.asarray(copies))
        write_index(tmp, cores.items(), cores.mpp, extra)
    return Path(folder)


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "cores.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} holds no prepared cores (cores.json); run prepare_cores on the TMA folder first"
        )
    doc = json.loads(path.read_text())
    if doc.get("version") != CACHE_VERSION:
        raise ConfigError(
            f"{folder}: core cache version {doc.get('version')} != {CACHE_VERSION}; delete it to rebuild"
        )
    return doc


def load_coreset(folder: Path, mmap: bool = True) -> CoreSet:
    """A cached CoreSet; pixels memory-mapped unless ``mmap`` is False."""
    folder = Path(folder)
    doc = read_meta(folder)
    mode = "r" if mmap else None
    items = doc["items"]

    def column(name, dtype=object):
        return np.array([it[name] for it in items], dtype=dtype)

    restyled = {}
    if (folder / "restyled").is_dir():
        for sub in sorted((folder / "restyled").iterdir()):
            if (sub / "left.npy").is_file():
                restyled[sub.name] = np.load(sub / "left.npy", mmap_mode=mode)
    return CoreSet(
        left=np.load(folder / "left.npy", mmap_mode=mode),
        right=np.load(folder / "right.npy", mmap_mode=mode),
        key=column("key"),
        patient_id=column("patient_id"),
        section=column("section"),
        site=column("site"),
        core_index=column("core_index", np.int64),
        mpp=float(doc["mpp"]),
        tissue_left=np.load(folder / "tissue_left.npy"),
        tissue_right=np.load(folder / "tissue_right.npy"),
        restyled=restyled,
    )


def save_restyled(folder: Path, name: str, copies: np.ndarray) -> None:
    """Add (or replace) the restyled copies ``name`` of a cached CoreSet's left halves."""
    target = Path(folder) / "restyled" / name
    target.mkdir(parents=True, exist_ok=True)
    write_npy_atomic(copies, target / "left.npy")


# --- crop positions and the crop stream ------------------------------------------------------


def crop_origins(
    tissue: np.ndarray, half_shape: tuple[int, int], patch_px: int, min_tissue: float = MIN_TISSUE
) -> list[np.ndarray]:
    """Per half, the allowed top-left corners (y, x) on the coarse grid for a ``patch_px`` crop.

    A corner is allowed when at least ``min_tissue`` of the cells under the crop are tissue;
    a half with no such corner allows every corner (it still trains, just on less tissue).
    """
    h, w = half_shape
    if patch_px > min(h, w):
        raise ConfigError(
            f"patch of {patch_px} px does not fit in core halves of {h}x{w} px; "
            f"use a smaller --patch-px or prepare larger crops"
        )
    cells = max(1, patch_px // TISSUE_STRIDE)
    ys = np.arange(0, h - patch_px + 1, TISSUE_STRIDE)
    xs = np.arange(0, w - patch_px + 1, TISSUE_STRIDE)
    out = []
    for grid in tissue:
        integral = np.pad(grid.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        gy = np.minimum(ys // TISSUE_STRIDE, grid.shape[0] - cells)
        gx = np.minimum(xs // TISSUE_STRIDE, grid.shape[1] - cells)
        gy, gx = np.maximum(gy, 0), np.maximum(gx, 0)
        y0, x0 = gy[:, None], gx[None, :]
        y1 = np.minimum(y0 + cells, grid.shape[0])
        x1 = np.minimum(x0 + cells, grid.shape[1])
        area = np.maximum((y1 - y0) * (x1 - x0), 1)
        frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
        ok = np.argwhere(frac >= min_tissue)
        if len(ok) == 0:
            ok = np.argwhere(np.ones_like(frac, bool))
        out.append(np.stack([ys[ok[:, 0]], xs[ok[:, 1]]], axis=1))
    return out


def fixed_crops(
    tissue: np.ndarray, half_shape, patch_px: int, per_half: int, seed: int
) -> list[tuple[int, int, int]]:
    """(item, y, x) of ``per_half`` reproducible crops per half: the monitoring set."""
    rng = np.random.default_rng(seed)
    out = []
    for i, origins in enumerate(crop_origins(tissue, half_shape, patch_px)):
        pick = rng.choice(len(origins), size=min(per_half, len(origins)), replace=False)
        out.extend((i, int(origins[j, 0]), int(origins[j, 1])) for j in sorted(pick))
    return out


def on_tissue(origins: np.ndarray, corners) -> np.ndarray:
    """Per corner (y, x) of a half, True when it is an allowed crop origin of ``crop_origins``
    (corners snap to the coarse grid used for the tissue test)."""
    allowed = {tuple(o) for o in origins.tolist()}
    return np.array(
        [
            (y // TISSUE_STRIDE * TISSUE_STRIDE, x // TISSUE_STRIDE * TISSUE_STRIDE) in allowed
            for y, x in corners
        ],
        bool,
    )


def grid_crops(tissue: np.ndarray, half_shape, patch_px: int) -> list[tuple[int, int, int]]:
    """(item, y, x) of non-overlapping tissue crops tiling each half: for fingerprinting a half."""
    h, w = half_shape
    tiles = [
        (y, x)
        for y in range(0, h - patch_px + 1, patch_px)
        for x in range(0, w - patch_px + 1, patch_px)
    ]
    out = []
    for i, origins in enumerate(crop_origins(tissue, half_shape, patch_px)):
        kept = [tile for tile, ok in zip(tiles, on_tissue(origins, tiles)) if ok]
        out.extend((i, y, x) for y, x in (kept or tiles))
    return out


def gather(halves: np.ndarray, crops, patch_px: int) -> np.ndarray:
    """uint8 [len(crops), p, p, 3] from (item, y, x) triples."""
    out = np.empty((len(crops), patch_px, patch_px, 3), np.uint8)
    for j, (i, y, x) in enumerate(crops):
        out[j] = halves[i, y : y + patch_px, x : x + patch_px]
    return out


class CropStream(torch.utils.data.IterableDataset):
    """Endless batches of random crops of left halves (and their restyled twins).

    Yields dicts {"x1": uint8 [B, p, p, 3], "x2": same or absent, "y": int64 [B]}. ``left``
    and ``restyled`` are arrays or .npy paths (memory-mapped lazily in each DataLoader
    worker, so workers share the page cache instead of pickled copies); ``rows`` picks the
    training items among their rows. A worker's id offsets the seed, so workers draw
    different crops.
    """

    def __init__(
        self,
        left,
        rows: np.ndarray,
        labels: np.ndarray,
        tissue: np.ndarray,
        patch_px: int,
        batch_size: int,
        seed: int = 0,
        restyled=None,
    ):
        super().__init__()
        self._left, self._restyled = left, restyled
        self.rows = np.asarray(rows, np.int64)
        self.labels = np.asarray(labels, np.int64)
        if (
            len(self.rows) == 0
            or len(self.labels) != len(self.rows)
            or len(tissue) != len(self.rows)
        ):
            raise TrainingError(
                f"crop stream needs matching rows, labels and tissue masks "
                f"(got {len(self.rows)}, {len(self.labels)}, {len(tissue)})"
            )
        self.patch_px, self.batch_size, self.seed = patch_px, batch_size, seed
        shape = _open(left).shape
        self.origins = crop_origins(tissue, shape[1:3], patch_px)
        self.max_y, self.max_x = shape[1] - patch_px, shape[2] - patch_px

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker])
        left = _open(self._left)
        restyled = _open(self._restyled) if self._restyled is not None else None
        while True:
            picks, crops = self._draw(rng)
            yield self._batch(rng, picks, crops, left, restyled)

    def _corner(self, rng, origins: np.ndarray) -> tuple[int, int]:
        """A random allowed corner, jittered within one grid cell so crops are not tied to
        the grid."""
        y, x = origins[rng.integers(len(origins))]
        y = int(min(self.max_y, y + rng.integers(TISSUE_STRIDE)))
        x = int(min(self.max_x, x + rng.integers(TISSUE_STRIDE)))
        return y, x

    def _draw(self, rng) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """(positions in ``rows`` of the batch's items, their crops as (row, y, x))."""
        picks = rng.integers(0, len(self.rows), self.batch_size)
        return picks, [(int(self.rows[k]), *self._corner(rng, self.origins[k])) for k in picks]

    def _batch(self, rng, picks, crops, left, restyled) -> dict:
        """x1 from the left halves; x2 the same crops of a random restyled copy of each."""
        p = self.patch_px
        batch = {
            "x1": torch.from_numpy(gather(left, crops, p)),
            "y": torch.from_numpy(self.labels[picks]),
        }
        if restyled is not None:
            copy = rng.integers(0, restyled.shape[1], len(crops))
            twin = np.empty((len(crops), p, p, 3), np.uint8)
            for j, (i, y, x) in enumerate(crops):
                twin[j] = restyled[i, copy[j], y : y + p, x : x + p]
            batch["x2"] = torch.from_numpy(twin)
        return batch


class SetStream(CropStream):
    """Batches for the set-level objective (``TrainConfig.objective`` "sets"): the game's
    comparison, two regions of one patient, made at every step.

    Each batch holds ``batch_size / (REGIONS * SET_CROPS)`` classes of distinct patients. For
    each class, SET_CROPS crops whose centres lie in the upper part of one item's left half,
    then SET_CROPS in the lower part of another item of the class (another serial section, so
    another site, for a TMA core; another pseudo-core for a cohort patient; the same item when
    the class has one). The order is class-major, [class][region][crop], which
    ``fpstore.fingerprint.losses.set_contrast`` relies on. With restyled copies each crop is
    the original or a random restyled copy, with equal chance (no twins: one image per crop).
    """

    def __init__(self, left, rows, labels, tissue, patch_px, batch_size, patients, **kwargs):
        super().__init__(left, rows, labels, tissue, patch_px, batch_size, **kwargs)
        per_set = REGIONS * SET_CROPS
        if batch_size % per_set:
            raise ConfigError(
                f"the set-level objective needs a batch size divisible by {per_set} "
                f"(classes x {REGIONS} regions x {SET_CROPS} crops), got {batch_size}"
            )
        self.n_sets = batch_size // per_set
        self.members = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        self.class_patient = np.array([str(patients[m[0]]) for m in self.members])
        if len(set(self.class_patient)) < self.n_sets:
            raise TrainingError(
                f"the set-level objective draws {self.n_sets} patients a batch but the training "
                f"cores hold {len(set(self.class_patient))}; use a batch size of at most "
                f"{per_set * len(set(self.class_patient))}"
            )
        middle = (_open(left).shape[1] - patch_px) / 2  # a corner above it centres the crop up
        self.regions = [
            [
                part if len(part) else origins
                for part in (origins[origins[:, 0] <= middle], origins[origins[:, 0] > middle])
            ]
            for origins in self.origins
        ]

    def _classes(self, rng) -> list[int]:
        """n_sets classes of distinct patients, in random order."""
        chosen, patients = [], set()
        for c in rng.permutation(len(self.members)):
            if self.class_patient[c] not in patients:
                chosen.append(int(c))
                patients.add(self.class_patient[c])
                if len(chosen) == self.n_sets:
                    break
        return chosen

    def _draw(self, rng):
        picks, crops = [], []
        for c in self._classes(rng):
            members = self.members[c]
            first = rng.choice(members)
            others = members[members != first]
            items = (first, rng.choice(others) if len(others) else first)
            for region, k in enumerate(items):
                for _ in range(SET_CROPS):
                    picks.append(k)
                    crops.append((int(self.rows[k]), *self._corner(rng, self.regions[k][region])))
        return np.array(picks), crops

    def _batch(self, rng, picks, crops, left, restyled):
        batch = super()._batch(rng, picks, crops, left, restyled)
        if "x2" in batch:
            twin = batch.pop("x2")
            restyle = torch.from_numpy(rng.random(len(crops)) < 0.5)
            batch["x1"][restyle] = twin[restyle]
        return batch


def _open(array):
    return np.load(array, mmap_mode="r") if isinstance(array, (str, Path)) else array
