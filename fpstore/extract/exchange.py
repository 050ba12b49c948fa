"""Features in and out: the per-slide HDF5 files TRIDENT/CLAM and STAMP read, and AnnData.

Layouts, as their code reads and writes them (versions read for this module):

- TRIDENT (mahmoodlab/TRIDENT, ``trident/wsi_objects/WSI.py`` ``extract_patch_features`` and
  ``trident/IO.py`` ``save_h5`` / ``coords_to_h5`` / ``read_coords``, commit 0b2f600a): one
  ``<slide name>.h5`` per slide with datasets ``features`` (N, D) and ``coords`` (N, 2), int64,
  the top-left corner of each patch in level-0 pixels, (x, y). ``coords`` carries the
  patching attributes (``patch_size`` at the target magnification, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``),
  ``features`` carries ``name`` and ``savetodir``. CLAM's MIL datasets
  (``datasets/dataset_generic.py``, as its forks carry it) read ``h5_files/<slide_id>.h5`` by
  those two dataset names, so CLAM, TRIDENT's slide encoders and the MIL tools that read CLAM
  features open these files.
- STAMP (KatherLab/STAMP, ``src/stamp/modeling/data.py`` ``get_coords``, the "STAMP v2"
  branch, commit 2aa37a5f): datasets ``feats`` (N, D) and ``coords`` (N, 2) as the patches'
  top-left corners in microns, with file attributes ``unit = "um"`` and ``tile_size`` (microns);
  ``tile_size_px``, ``extractor`` and ``feat_type = "tile"`` are the other attributes its
  extractor writes.
- AnnData ``.h5ad`` (on-disk format 0.1.0 with "dataframe" 0.2.0 and "string-array" 0.2.0
  elements, what anndata, scanpy and LazySlide open): one row per patch, ``X`` the features,
  ``obs`` the patch keys and tissue type, ``obsm/spatial`` the level-0 (x, y), ``uns`` the
  provenance. Written with h5py, so anndata need not be installed to export.

Every exported file also carries fpstore's provenance as attributes prefixed ``fpstore.``
(encoder id, dimension, the fingerprint file's metadata, patient, site, mpp) and the patches'
``tissue_fraction``, so ``fpstore import`` of an fpstore export restores the store's rows bit
for bit. Imports of other tools' files are matched to the cohort's slides by file name (slide
id, or the slide file's name without extension, TRIDENT's naming).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError, StoreError

FORMATS = ("trident", "stamp", "h5ad")
IMPORT_FORMATS = ("auto", "trident", "stamp")
PREFIX = "fpstore."


@dataclass
class ExchangeSummary:
    """What an export or import did."""

    cohort: str
    encoder: str
    format: str
    out: str
    n_slides: int = 0
    n_patches: int = 0
    dim: int = 0
    files: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # [{"file", "reason"}]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - a dependency in setup.cfg
        raise ConfigError("feature files need h5py: pip install h5py") from None
    return h5py


def _slide_rows(store, cohort: str, encoder: str):
    """(keys table, (N, dim) vectors, metadata) per stored fingerprint file of the partition."""
    from fpstore.store.fingerprints import partition_settings, read_slide_file
    from fpstore.store.layout import StoreLayout, visible_files

    partition_settings(store, encoder, cohort)  # refuses corrupt or mixed partitions by name
    for path in visible_files(StoreLayout.of(store).fingerprint_dir(encoder, cohort)):
        yield read_slide_file(path)


def _provenance(table, metadata: dict, cohort: str, encoder: str, dim: int) -> dict:
    first = table.slice(0, 1).to_pylist()[0] if table.num_rows else {}
    mpp = (first["x_um"] / first["x"]) if first and first["x"] else None
    size_um = float(first["size_px"]) * mpp if mpp else None
    return {
        PREFIX + "encoder": encoder,
        PREFIX + "dim": dim,
        PREFIX + "cohort": cohort,
        PREFIX + "slide_id": first.get("slide_id", ""),
        PREFIX + "patient_id": first.get("patient_id") or "",
        PREFIX + "site": first.get("site") or "",
        PREFIX + "size_px": float(first.get("size_px", 0.0)),
        PREFIX + "patch_um": float(first.get("patch_um", 0.0)),
        PREFIX + "out_px": int(first.get("out_px", 0)),
        PREFIX + "mpp": mpp if mpp is not None else float("nan"),
        PREFIX + "patch_size_um": size_um if size_um is not None else float("nan"),
        PREFIX + "metadata": json.dumps(metadata, sort_keys=True),
    }


def _mpp_of(table) -> float | None:
    """The level-0 mpp the writer used (x_um = x * mpp), from a patch off the origin."""
    x = table.column("x").to_numpy()
    x_um = table.column("x_um").to_numpy()
    y = table.column("y").to_numpy()
    y_um = table.column("y_um").to_numpy()
    for a, b in ((x, x_um), (y, y_um)):
        nonzero = np.flatnonzero(a)
        if len(nonzero):
            return float(b[nonzero[0]] / a[nonzero[0]])
    return None


def export_features(
    store: Path, cohort: str, encoder: str, out: Path, fmt: str = "trident"
) -> ExchangeSummary:
    """Write the cohort's stored fingerprints of ``encoder`` as ``fmt`` files under ``out``:
    one ``<slide_id>.h5`` per slide (trident, stamp) or ``<cohort>.<encoder>.h5ad``."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}; use one of {', '.join(FORMATS)}")
    from fpstore.store.fingerprints import resolve_encoder

    start = time.perf_counter()
    encoder = resolve_encoder(store, cohort, encoder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExchangeSummary(cohort, encoder, fmt, str(out))
    slides = list(_slide_rows(store, cohort, encoder))
    if not slides:
        raise StoreError(f"cohort {cohort!r} has no {encoder} fingerprints; run `fpstore extract`")
    if fmt == "h5ad":
        path = out / f"{cohort}.{encoder}.h5ad"
        summary.dim = _write_h5ad(store, cohort, encoder, slides, path)
        summary.files.append(str(path))
    for table, vectors, metadata in slides if fmt != "h5ad" else ():
        slide_id = table.column("slide_id")[0].as_py()
        path = out / f"{slide_id}.h5"
        _write_slide_h5(path, table, vectors, metadata, cohort, encoder, fmt, out)
        summary.files.append(str(path))
    for table, vectors, _ in slides:
        summary.n_slides += 1
        summary.n_patches += table.num_rows
        summary.dim = vectors.shape[1]
    summary.seconds = time.perf_counter() - start
    return summary


def _write_slide_h5(
    path: Path,
    table,
    vectors: np.ndarray,
    metadata: dict,
    cohort: str,
    encoder: str,
    fmt: str,
    out: Path,
) -> None:
    h5py = _h5py()
    x = table.column("x").to_numpy()
    y = table.column("y").to_numpy()
    provenance = _provenance(table, metadata, cohort, encoder, vectors.shape[1])
    mpp = _mpp_of(table)
    if mpp is not None:
        provenance[PREFIX + "mpp"] = mpp
    slide_id = provenance[PREFIX + "slide_id"]
    size_px = provenance[PREFIX + "size_px"]
    out_px = provenance[PREFIX + "out_px"]
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in provenance.items():
            f.attrs[key] = value
        if fmt == "trident":
            features = f.create_dataset("features", data=vectors)
            features.attrs.update({"name": slide_id, "savetodir": str(out)})
            coords = f.create_dataset("coords", data=np.column_stack([x, y]).astype(np.int64))
            level0_mag = 10.0 / mpp if mpp else float("nan")
            target_mag = level0_mag * out_px / size_px if size_px else float("nan")
            coords.attrs.update(
                {
                    "patch_size": int(out_px),
                    "patch_size_level0": int(round(size_px)),
                    "level0_magnification": level0_mag,
                    "target_magnification": target_mag,
                    "overlap": 0,
                    "name": slide_id,
                    "savetodir": str(out),
                }
            )
        else:  # stamp: microns
            f.create_dataset("feats", data=vectors)
            f.create_dataset(
                "coords",
                data=np.column_stack(
                    [table.column("x_um").to_numpy(), table.column("y_um").to_numpy()]
                ),
            )
            f.attrs.update(
                {
                    "unit": "um",
                    "tile_size": provenance[PREFIX + "patch_size_um"],
                    "tile_size_px": int(out_px),
                    "extractor": provenance[PREFIX + "encoder"],
                    "feat_type": "tile",
                }
            )
        f.create_dataset(
            "tissue_fraction", data=table.column("tissue_fraction").to_numpy().astype(np.float32)
        )
    tmp.replace(path)


def _write_h5ad(store, cohort: str, encoder: str, slides, path: Path) -> int:
    """AnnData's on-disk layout with h5py: X, obs (dataframe), var, obsm/spatial, uns."""
    import pyarrow as pa

    from fpstore.store.tissue import read_tissue_types

    h5py = _h5py()
    table = pa.concat_tables([t for t, _, _ in slides])
    vectors = np.concatenate([v for _, v, _ in slides])
    types = read_tissue_types(store, cohort)
    tissue = np.full(table.num_rows, "", dtype=object)
    if types is not None:
        index = dict(
            zip(types.column("patch_id").to_pylist(), types.column("tissue_type").to_pylist())
        )
        tissue = np.array(
            [index.get(p, "") for p in table.column("patch_id").to_pylist()], dtype=object
        )
    text = h5py.string_dtype("utf-8")

    def strings(group, name, values):
        d = group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=text)
        d.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})

    def array(group, name, values):
        d = group.create_dataset(name, data=values)
        d.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def frame(group, index, columns: dict):
        group.attrs.update(
            {"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"}
        )
        # As anndata writes it: the names as strings, an empty frame's as an empty array.
        if columns:
            group.attrs.create("column-order", list(columns), dtype=text)
        else:
            group.attrs["column-order"] = np.array([], np.float64)
        strings(group, "_index", index)
        for name, values in columns.items():
            if values.dtype == object:
                strings(group, name, values)
            else:
                array(group, name, values)

    def mapping(f, name):
        g = f.create_group(name)
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        return g

    def column(name):
        return table.column(name).to_numpy(zero_copy_only=False)

    tmp = path.with_name(f".{path.name}.tmp")
    dim = vectors.shape[1]
    metadata = slides[0][2]
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        array(f, "X", vectors)
        obs = f.create_group("obs")
        frame(
            obs,
            column("patch_id").astype(object),
            {
                "patient_id": column("patient_id").astype(object),
                "slide_id": column("slide_id").astype(object),
                "site": np.array([s or "" for s in column("site")], dtype=object),
                "x": column("x"),
                "y": column("y"),
                "x_um": column("x_um"),
                "y_um": column("y_um"),
                "size_px": column("size_px"),
                "tissue_fraction": column("tissue_fraction"),
                "tissue_type": tissue,
            },
        )
        frame(f.create_group("var"), np.array([f"f{i}" for i in range(dim)], dtype=object), {})
        obsm = mapping(f, "obsm")
        array(obsm, "spatial", np.column_stack([column("x"), column("y")]).astype(np.int64))
        for name in ("varm", "obsp", "varp", "layers"):
            mapping(f, name)
        uns = mapping(f, "uns")
        for key, value in {
            "encoder": encoder,
            "dim": str(dim),
            "cohort": cohort,
            "coordinates": "obsm/spatial: level-0 pixels, top-left corner of each patch",
            "fingerprint_metadata": json.dumps(
                {k: v for k, v in metadata.items() if k not in ("slide_id", "n_patches")},
                sort_keys=True,
            ),
        }.items():
            d = uns.create_dataset(key, data=value, dtype=text)
            d.attrs.update({"encoding-type": "string", "encoding-version": "0.2.0"})
    tmp.replace(path)
    return dim


@dataclass
class _Features:
    """One imported file, in the store's terms."""

    vectors: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size_px: float
    out_px: int
    tissue_fraction: np.ndarray
    mpp: float | None  # from an fpstore export; else the slide's
    attributes: dict  # provenance kept in the store's file metadata


def _read_h5(path: Path, fmt: str, mpp_of) -> _Features:
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        root = {k: _plain(v) for k, v in f.attrs.items()}
        if fmt == "auto":
            fmt = "trident" if "features" in f else "stamp" if "feats" in f else ""
        if fmt == "trident":
            if "features" not in f or "coords" not in f:
                raise StoreError(f"{path}: no 'features' and 'coords' datasets (TRIDENT/CLAM)")
            vectors = f["features"][:]
            coords = f["coords"][:]
            attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        elif fmt == "stamp":
            if "feats" not in f or "coords" not in f:
                raise StoreError(f"{path}: no 'feats' and 'coords' datasets (STAMP)")
            vectors = f["feats"][:]
            coords = f["coords"][:]
            attrs = root
        else:
            raise StoreError(
                f"{path}: neither 'features' (TRIDENT/CLAM) nor 'feats' (STAMP); "
                "not a per-slide feature file"
            )
        fraction = f["tissue_fraction"][:] if "tissue_fraction" in f else None
    if vectors.ndim != 2 or coords.shape != (len(vectors), 2):
        raise StoreError(
            f"{path}: features {vectors.shape} and coords {coords.shape} do not match (N, D) "
            "and (N, 2)"
        )
    mpp = root.get(PREFIX + "mpp")
    mpp = float(mpp) if mpp is not None and np.isfinite(mpp) else None
    if fmt == "trident":
        x, y = coords[:, 0].astype(np.int64), coords[:, 1].astype(np.int64)
        size_px = attrs.get("patch_size_level0")
        if size_px is None and "patch_size" in attrs:  # CLAM: patch_size at patch_level
            size_px = float(attrs["patch_size"]) * (2 ** int(attrs.get("patch_level", 0)))
        out_px = int(attrs.get("patch_size", 224))
        extractor = root.get(PREFIX + "encoder")
    else:
        unit = attrs.get("unit")
        tile_um = attrs.get("tile_size_um", attrs.get("tile_size") if unit == "um" else None)
        if tile_um is None:
            raise StoreError(
                f"{path}: STAMP coordinates without unit 'um' and tile_size; re-extract with "
                "STAMP 2 or later"
            )
        mpp = mpp or mpp_of()
        x = np.rint(coords[:, 0] / mpp).astype(np.int64)
        y = np.rint(coords[:, 1] / mpp).astype(np.int64)
        size_px = float(tile_um) / mpp
        out_px = int(attrs.get("tile_size_px", 224))
        extractor = attrs.get("extractor")
    if size_px is None:
        raise StoreError(f"{path}: coords carry no patch size (patch_size_level0 or patch_size)")
    n = len(vectors)
    return _Features(
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        x=x,
        y=y,
        size_px=float(size_px),
        out_px=out_px,
        tissue_fraction=np.ones(n, np.float32) if fraction is None else fraction,
        mpp=mpp,
        attributes={"source_format": fmt, "source_extractor": str(extractor or "")},
    )


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def import_features(
    store: Path,
    cohort: str,
    folder: Path,
    encoder: str | None = None,
    fmt: str = "auto",
    patch_um: float | None = None,
    force: bool = False,
) -> ExchangeSummary:
    """Bring per-slide feature files (TRIDENT/CLAM ``features``, STAMP ``feats``, fpstore's
    exports) into the store as the fingerprints of ``encoder`` for ``cohort``'s slides.

    A file matches a slide by name (``<slide_id>.h5`` or the slide file's name with ``.h5``);
    files of no slide are skipped and listed. ``encoder``: the id to store them under (an
    fpstore export keeps its own when not given). The features' dimension is the files'.
    A partition that holds fingerprints already is refused unless ``force`` (replaced).
    """
    if fmt not in IMPORT_FORMATS:
        raise ConfigError(f"import format {fmt!r}; use one of {', '.join(IMPORT_FORMATS)}")
    start = time.perf_counter()
    folder = Path(folder)
    summary = ExchangeSummary(cohort, encoder or "", fmt, str(folder))
    plans = _match_files(store, cohort, folder, summary)
    features = [_read_h5(path, fmt, partial(_slide_mpp, record)) for path, record in plans]
    dims = {f.vectors.shape[1] for f in features}
    if len(dims) != 1:
        raise StoreError(
            f"the files hold features of several dimensions {sorted(dims)}; import one "
            "encoder's files at a time"
        )
    summary.dim = dims.pop()
    summary.encoder, key = _import_key(
        store, cohort, folder, plans[0][0], features[0], encoder, summary.dim, force
    )
    for (path, record), feats in zip(plans, features):
        n = _write_slide(store, summary.encoder, cohort, record, feats, key, summary.dim, patch_um)
        summary.n_slides += 1
        summary.n_patches += n
        summary.files.append(str(path))
    summary.seconds = time.perf_counter() - start
    return summary


def _slide_mpp(record) -> float:
    from fpstore.cohort.cohorts import open_cohort_slide

    slide = open_cohort_slide(record)
    try:
        return slide.info.mpp
    finally:
        slide.close()


def _match_files(store: Path, cohort: str, folder: Path, summary: ExchangeSummary) -> list:
    """(file, slide record) for each .h5 file named after a slide of ``cohort``."""
    from fpstore.store.cohorts import read_cohort

    files = sorted(folder.glob("*.h5")) if folder.is_dir() else [folder]
    if not files or not all(f.is_file() for f in files):
        raise StoreError(f"no .h5 feature files in {str(folder)!r}; give a folder of them")
    records = read_cohort(store, cohort).slide_records()
    by_name = {r.slide_id: r for r in records}
    for r in records:
        by_name.setdefault(Path(r.path).name.split(".")[0], r)
    plans = []
    for path in files:
        record = by_name.get(path.stem) or by_name.get(path.stem.split(".")[0])
        if record is None:
            summary.skipped.append({"file": str(path), "reason": f"no slide of {cohort!r}"})
            continue
        plans.append((path, record))
    if not plans:
        raise StoreError(
            f"none of the {len(files)} files in {str(folder)!r} is named after a slide of cohort "
            f"{cohort!r} (<slide_id>.h5 or the slide file's name); e.g. {files[0].name}"
        )
    return plans


def _import_key(store, cohort, folder, first, feats, encoder, dim, force) -> tuple[str, dict]:
    """(encoder id, the settings every imported file carries): an fpstore export brings its
    own settings back; other tools' files get a key of what they are (format, extractor,
    dimension), the same for every slide."""
    from fpstore.store.layout import StoreLayout, check_partition_value, visible_files
    from fpstore.store.schema import SCHEMA_VERSION

    with _h5py().File(first, "r") as f:
        original = f.attrs.get(PREFIX + "metadata")
    restored = json.loads(_plain(original)) if original is not None else None
    encoder = encoder or (restored or {}).get("encoder")
    if not encoder:
        raise ConfigError("name the imported features' encoder with --encoder-id (e.g. uni)")
    check_partition_value("encoder id", encoder)
    if not force and visible_files(StoreLayout.of(store).fingerprint_dir(encoder, cohort)):
        raise StoreError(
            f"cohort {cohort!r} has {encoder} fingerprints already; import under another "
            "--encoder-id, or pass --force to replace them"
        )
    if restored is not None:
        key = {k: v for k, v in restored.items() if k not in ("slide_id", "n_patches", "cohort")}
        key.update(encoder=encoder, dim=str(dim))
        return encoder, key
    source = feats.attributes
    digest = hashlib.sha1(
        json.dumps({"encoder": encoder, **source, "dim": dim}, sort_keys=True).encode()
    ).hexdigest()[:16]
    return encoder, {
        "schema_version": SCHEMA_VERSION,
        "encoder": encoder,
        "encoder_hash": digest,
        "dim": str(dim),
        "patches": "all",
        "seed": "0",
        "min_tissue": "unknown",
        "precision": "unknown",
        "stain_norm": "none",
        "weights_hash": "imported",
        "imported_from": str(Path(folder).resolve()),
        **source,
    }


def _write_slide(store, encoder, cohort, record, feats, key, dim, patch_um) -> int:
    """Write one slide's imported features and its status; returns its patch count."""
    from fpstore.store.fingerprints import (
        fingerprint_table,
        patch_keys_table,
        write_fingerprints,
        write_status,
    )
    from fpstore.store.schema import file_metadata

    mpp = feats.mpp if feats.mpp is not None else _slide_mpp(record)
    patch_um = patch_um or float(key.get("patch_um") or round(feats.size_px * mpp, 3))
    keys = patch_keys_table(
        record.patient_id or "",
        record.slide_id,
        record.site,
        feats.x,
        feats.y,
        feats.size_px,
        mpp,
        patch_um,
        feats.out_px,
        feats.tissue_fraction,
    )
    table = fingerprint_table(keys, feats.vectors, dim)
    values = {k: v for k, v in key.items() if k not in ("table", "fpstore_version")}
    values.update(
        cohort=cohort,
        slide_id=record.slide_id,
        patch_um=key.get("patch_um", patch_um),
        out_px=key.get("out_px", feats.out_px),
        n_patches=len(feats.vectors),
    )
    metadata = file_metadata("fingerprints", **values)
    write_fingerprints(store, encoder, cohort, record.slide_id, table, metadata)
    write_status(
        store, encoder, key.get("encoder_hash", ""), cohort, record.slide_id, "ok", "", len(table)
    )
    return table.num_rows
