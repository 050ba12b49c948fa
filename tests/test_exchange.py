"""Features in and out: TRIDENT/CLAM and STAMP per-slide HDF5 files, AnnData, round trips."""

import json

import h5py
import numpy as np
import pytest
from _report_store import COHORT, DIM, ENCODER, build_store

from fpstore.extract.exchange import export_features, import_features
from fpstore.store import open as open_store
from fpstore.store.fingerprints import partition_settings


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("exchange") / "store")


def _stored(store, encoder):
    with open_store(store) as fs:
        rows = fs.sql(
            "SELECT patch_id, patient_id, site, x, y, size_px, tissue_fraction, fingerprint "
            "FROM fingerprints WHERE encoder = ? ORDER BY patch_id",
            [encoder],
        ).rows()
    vectors = np.array([r.pop("fingerprint") for r in rows], np.float32)
    return rows, vectors


def test_trident_export_opens_as_trident_reads_it_and_round_trips_bit_for_bit(store, tmp_path):
    summary = export_features(store, COHORT, ENCODER, tmp_path / "trident", "trident")
    assert summary.n_slides == 16 and summary.dim == DIM
    path = tmp_path / "trident" / "S00.h5"
    # As TRIDENT's read_coords and extract_slide_features read a patch-feature file:
    with h5py.File(path, "r") as f:
        coords_attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
        features = f["features"][:]
        provenance = {k: f.attrs[k] for k in f.attrs}
    for needed in ("patch_size", "level0_magnification", "target_magnification"):
        assert needed in coords_attrs
    assert coords.dtype == np.int64 and coords.shape == (len(features), 2)
    assert features.dtype == np.float32 and features.shape[1] == DIM
    assert coords_attrs["patch_size_level0"] == 224 and coords_attrs["patch_size"] == 224
    assert coords_attrs["level0_magnification"] == pytest.approx(10 / 0.499, rel=1e-6)
    assert provenance["fpstore.encoder"] == ENCODER and provenance["fpstore.dim"] == DIM
    assert json.loads(provenance["fpstore.metadata"])["encoder"] == ENCODER
    # Level-0 top-left corners: the x, y of the patch ids.
    ids = [f"S00/{x}_{y}_224" for x, y in coords]
    rows, _ = _stored(store, ENCODER)
    assert set(ids) <= {r["patch_id"] for r in rows}

    done = import_features(store, COHORT, tmp_path / "trident", "roundtrip")
    assert done.n_slides == 16 and done.dim == DIM and not done.skipped
    before, vectors_before = _stored(store, ENCODER)
    after, vectors_after = _stored(store, "roundtrip")
    assert after == before
    assert vectors_after.tobytes() == vectors_before.tobytes()
    settings = partition_settings(store, "roundtrip", COHORT)
    assert settings["encoder"] == "roundtrip" and settings["dim"] == str(DIM)


def test_stamp_export_reads_in_microns_and_round_trips(store, tmp_path):
    export_features(store, COHORT, ENCODER, tmp_path / "stamp", "stamp")
    with h5py.File(tmp_path / "stamp" / "S03.h5", "r") as f:  # as STAMP's get_coords reads it
        assert f.attrs["unit"] == "um" and f.attrs["feat_type"] == "tile"
        tile_size_um = float(f.attrs["tile_size"])
        coords_um = f["coords"][:]
        feats = f["feats"][:]
    assert tile_size_um == pytest.approx(224 * 0.499, rel=1e-6)
    assert coords_um.shape == (len(feats), 2)
    assert np.allclose(coords_um / 0.499, np.rint(coords_um / 0.499))
    import_features(store, COHORT, tmp_path / "stamp", "stamp-rt", fmt="stamp")
    before, vectors_before = _stored(store, ENCODER)
    after, vectors_after = _stored(store, "stamp-rt")
    assert [r["patch_id"] for r in after] == [r["patch_id"] for r in before]
    assert vectors_after.tobytes() == vectors_before.tobytes()


def test_h5ad_export_has_a_row_per_patch_with_coordinates_and_tissue(store, tmp_path):
    summary = export_features(store, COHORT, ENCODER, tmp_path / "ad", "h5ad")
    rows, vectors = _stored(store, ENCODER)
    with h5py.File(summary.files[0], "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        assert f["obs"].attrs["encoding-type"] == "dataframe"
        index = f["obs/_index"].asstr()[:]
        x = f["obs/x"][:]
        tissue = f["obs/tissue_type"].asstr()[:]
        spatial = f["obsm/spatial"][:]
        matrix = f["X"][:]
        assert f["uns/encoder"].asstr()[()] == ENCODER
    assert len(index) == len(rows) == matrix.shape[0] and matrix.shape[1] == DIM
    order = np.argsort(index)
    assert matrix[order].tobytes() == vectors.tobytes()
    assert list(spatial[order, 0]) == [r["x"] for r in rows] == list(x[order])
    assert set(tissue) <= {"epithelium", "stroma", "fat", "background", ""}
    assert (tissue != "").any()


def test_foreign_trident_features_of_another_dimension_import_and_classify(store, tmp_path):
    """Files as TRIDENT writes them with UNI (1024-D, no fpstore attributes), named after the
    slides, go into the store under the id given; classify reads them."""
    from fpstore.classify.pipeline import ClassifyConfig, classify

    rows, _ = _stored(store, ENCODER)
    folder = tmp_path / "uni"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for slide in sorted({r["patch_id"].split("/")[0] for r in rows}):
        xy = np.array(
            [[r["x"], r["y"]] for r in rows if r["patch_id"].startswith(slide + "/")], np.int64
        )
        with h5py.File(folder / f"{slide}.h5", "w") as f:
            f.create_dataset("features", data=rng.normal(size=(len(xy), 1024)).astype(np.float32))
            coords = f.create_dataset("coords", data=xy)
            coords.attrs.update(
                {
                    "patch_size": 256,
                    "patch_size_level0": 224,
                    "level0_magnification": 20,
                    "target_magnification": 20,
                }
            )
    (folder / "stray.h5").write_bytes((folder / "S00.h5").read_bytes())
    summary = import_features(store, COHORT, folder, "uni")
    assert summary.dim == 1024 and summary.n_slides == 16
    assert summary.skipped == [
        {"file": str(folder / "stray.h5"), "reason": f"no slide of {COHORT!r}"}
    ]
    settings = partition_settings(store, "uni", COHORT)
    assert settings["source_format"] == "trident" and settings["dim"] == "1024"
    from fpstore.report.heatmap import slide_heatmap

    doc = classify(
        store,
        ClassifyConfig(
            marker="ER",
            cohort=COHORT,
            encoder="uni",
            folds=3,
            n_boot=100,
            site_probe=False,
            save_models="none",
            classifier={"max_epochs": 5, "patience": 2},
        ),
        progress=False,
    )
    assert doc["data"]["patients"] == 16
    heatmap = slide_heatmap(store, doc["run_id"], "S00", tmp_path / "maps", max_px=128)
    assert heatmap.n_patches == 25 and heatmap.figure.is_file()
    from fpstore.classify.pipeline import CompareConfig, compare

    both = compare(
        store,
        CompareConfig(
            marker="ER",
            cohort=COHORT,
            encoders=(ENCODER, "uni"),
            methods=("logreg",),
            pools=("all",),
            folds=3,
            n_boot=100,
        ),
        progress=False,
        save=False,
    )
    assert [r["encoder"] for r in both["rows"]] == [ENCODER, "uni"]
    assert both["rows"][1]["p_vs_first"] is not None  # DeLong, imported against fpstore's own
    with open_store(store) as fs:
        dims = fs.sql(
            "SELECT DISTINCT len(fingerprint) AS d FROM fingerprints WHERE encoder = 'uni'"
        ).rows()
    assert dims == [{"d": 1024}]


def test_cli_export_and_import(store, tmp_path):
    from click.testing import CliRunner

    from fpstore.cli.main import cli

    base = ["--store", str(store)]
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli, base + ["export", "--encoder", ENCODER, "--format", "stamp", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("exported 400 patches of 16 slides (toy-enc, 16-D, stamp)")
    result = CliRunner().invoke(
        cli, base + ["import", str(out), "--encoder-id", "cli-rt", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_patches"] == 400
    # An export names its own encoder, which holds these fingerprints already: refused.
    again = CliRunner().invoke(cli, base + ["import", str(out)])
    assert again.exit_code == 1
    assert again.output.strip() == (
        f"error: cohort 'toy' has {ENCODER} fingerprints already; import under another "
        "--encoder-id, or pass --force to replace them"
    )
