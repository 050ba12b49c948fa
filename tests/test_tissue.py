"""Tissue types per patch: label-free rules on real tiles and the real CMU slide, trained
classifiers (saved, reloaded, refused on the wrong encoder), the tissue table, truth masks,
evaluation, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from fpstore.cli.main import cli
from fpstore.config import TISSUE_TYPES
from fpstore.errors import ConfigError, StoreError, TrainingError
from fpstore.store.io import write_parquet_atomic
from fpstore.store.schema import TISSUE, file_metadata, fingerprint_schema, patch_id
from fpstore.tissue.evaluate import evaluate_tissue, scores
from fpstore.tissue.features import FEATURE_NAMES, pixel_features
from fpstore.tissue.methods import METHODS
from fpstore.tissue.rules import RuleThresholds, rule_logits, rule_probabilities
from fpstore.tissue.train import train_tissue
from fpstore.tissue.trained import TissueModel, TissueTrainConfig, fit_tissue_model
from fpstore.tissue.truth import load_truth, patch_truth
from fpstore.tissue.type_patches import predict_tissue

DATA = Path(__file__).parent / "data"
TILES = DATA / "tiles"
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
CMU_ID = "CMU-1-Small-Region"


def read_tile(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def rules_type(images) -> list[str]:
    probs = rule_probabilities(pixel_features(images))
    return [TISSUE_TYPES[i] for i in probs.argmax(axis=1)]


# --- label-free rules on real pixels ------------------------------------------------------

BACKGROUND_TILES = sorted(TILES.glob("histolab-no-tissue*.png")) + [
    TILES / "histolab-almost-white-1.png"
]
TISSUE_TILES = sorted(TILES.glob("histolab-tissue-*.png")) + sorted(
    TILES.glob("*nuclei-score-*.png")
)


def test_real_histolab_tiles_background_or_not():
    assert len(BACKGROUND_TILES) == 4 and len(TISSUE_TILES) == 4
    images = np.stack([read_tile(p) for p in BACKGROUND_TILES + TISSUE_TILES])
    typed = rules_type(images)
    assert typed[:4] == ["background"] * 4, dict(zip(BACKGROUND_TILES, typed))
    assert "background" not in typed[4:], dict(zip(TISSUE_TILES, typed[4:]))


def test_real_adipose_tile_is_fat_and_dense_tissue_is_not():
    # histolab's "low nuclei score" tile is adipose tissue: thin membranes around vacuoles.
    fat, dense = (
        read_tile(TILES / "histolab-low-nuclei-score-level1.png"),
        read_tile(DATA / "patches" / "tiatoolbox-target_image.png"),
    )
    assert rules_type(np.stack([fat, dense[:512, :512]]))[0] == "fat"
    assert rules_type(dense[None])[0] in ("epithelium", "stroma")


def test_features_are_named_and_independent_of_batch_company():
    tiles = np.stack([read_tile(p) for p in BACKGROUND_TILES[:2] + TISSUE_TILES[:2]])
    together = pixel_features(tiles)
    alone = np.concatenate([pixel_features(tile) for tile in tiles])
    assert together.shape == (4, len(FEATURE_NAMES))
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    white = FEATURE_NAMES.index("white_fraction")
    assert together[0, white] > 0.95 and together[3, white] < 0.5


def test_features_refuse_non_rgb_input():
    with pytest.raises(ConfigError, match="uint8"):
        pixel_features(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="shape"):
        pixel_features(np.zeros((32, 32), dtype=np.uint8))


def test_rule_probabilities_follow_the_rules_and_thresholds():
    images = np.stack([read_tile(p) for p in BACKGROUND_TILES + TISSUE_TILES])
    features = pixel_features(images)
    probs = rule_probabilities(features)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (rule_logits(features).argmax(axis=1) == probs.argmax(axis=1)).all()
    # Asking epithelium to beat the other types by the whole square leaves none.
    none = rule_probabilities(features, RuleThresholds(epithelium_margin=1.0))
    assert TISSUE_TYPES.index("epithelium") not in none.argmax(axis=1)
    with pytest.raises(ConfigError, match="background_white"):
        RuleThresholds(background_white=1.5)


# --- trained classifiers ------------------------------------------------------------------


def blobs(n=300, dim=16, classes=(0, 1, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(TISSUE_TYPES), dim))
    y = rng.choice(classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("method", ["fingerprint-logreg", "fingerprint-knn", "pixel-logreg"])
def test_trained_model_learns_saves_and_reloads(tmp_path, method):
    X, y = blobs(dim=len(FEATURE_NAMES) if method == "pixel-logreg" else 16)
    model = fit_tissue_model(
        X[:200],
        y[:200],
        TissueTrainConfig(method=method, k=5),
        {"encoder": {"id": "e", "hash": "h", "dim": X.shape[1]}},
    )
    probs = model.predict_proba(X[200:])
    assert probs.shape == (100, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == y[200:]).mean() > 0.9
    loaded = TissueModel.load(model.save(tmp_path / "m.npz"))
    assert loaded.hash == model.hash and loaded.method == method
    np.testing.assert_allclose(loaded.predict_proba(X[200:]), probs, rtol=1e-5)


def test_classes_absent_from_training_get_zero_probability():
    X, y = blobs(classes=(0, 2))  # background and stroma only: a binary model
    model = fit_tissue_model(X, y, TissueTrainConfig())
    probs = model.predict_proba(X)
    assert (probs[:, [1, 3]] == 0).all()
    assert (probs.argmax(axis=1) == y).mean() > 0.95


def test_training_needs_two_classes_and_the_right_width():
    X, y = blobs(classes=(2,))
    with pytest.raises(TrainingError, match="two classes"):
        fit_tissue_model(X, y, TissueTrainConfig())
    model = fit_tissue_model(*blobs(), TissueTrainConfig())
    with pytest.raises(ConfigError, match="16 features"):
        model.predict_proba(np.zeros((3, 512), np.float32))
    with pytest.raises(ConfigError, match="method"):
        TissueTrainConfig(method="cnn")


def test_not_a_model_file_is_refused(tmp_path):
    bogus = tmp_path / "m.npz"
    np.savez(bogus, W=np.zeros(3))
    with pytest.raises(StoreError, match="retrain"):
        TissueModel.load(bogus)
    with pytest.raises(StoreError, match="tissue train"):
        TissueModel.load(tmp_path / "missing.npz")


def test_training_on_a_cohort_checks_its_labels_before_reading_the_store(tmp_path):
    store = tmp_path / "no-store"
    with pytest.raises(TrainingError, match="--labels truth needs --truth DIR"):
        train_tissue(store, TissueTrainConfig(), cohort="c")
    with pytest.raises(ConfigError, match="train.labels='masks'"):
        train_tissue(store, TissueTrainConfig(), cohort="c", labels="masks")
    with pytest.raises(TrainingError, match="batch do not apply"):
        train_tissue(store, TissueTrainConfig(), cohort="c", labels="rules", batch=8)
    assert not store.exists()


def test_train_on_tile_folders_with_aliases_and_map(tmp_path):
    # Public datasets' layout: one folder per class, named BACK / ADI / STR ...
    for folder, tiles in {
        "BACK": BACKGROUND_TILES,
        "ADI": [TILES / "histolab-low-nuclei-score-level1.png"],
        "STR": TISSUE_TILES[:2],
        "LYM": TISSUE_TILES[2:3],
    }.items():
        (tmp_path / "tiles" / folder).mkdir(parents=True)
        for i, tile in enumerate(tiles):
            Image.open(tile).convert("RGB").save(tmp_path / "tiles" / folder / f"{i}.png")
    with pytest.raises(ConfigError, match="LYM"):
        train_tissue(
            tmp_path / "store", TissueTrainConfig(method="pixel-logreg"), tiles=tmp_path / "tiles"
        )
    described = train_tissue(
        tmp_path / "store",
        TissueTrainConfig(method="pixel-logreg"),
        tiles=tmp_path / "tiles",
        mapping={"LYM": "skip"},
    )
    assert described["train_counts"] == {"background": 4, "stroma": 2, "fat": 1}
    model = TissueModel.load(described["path"])
    assert Path(described["path"]) == tmp_path / "store" / "models" / "tissue" / "pixel-logreg.npz"
    typed = model.predict_proba(pixel_features(np.stack([read_tile(p) for p in BACKGROUND_TILES])))
    assert (typed.argmax(axis=1) == 0).all()
    with pytest.raises(TrainingError, match="--encoder"):
        train_tissue(
            tmp_path / "store",
            TissueTrainConfig(),
            tiles=tmp_path / "tiles",
            mapping={"LYM": "skip"},
        )


# --- truth masks and scores ---------------------------------------------------------------


def test_patch_truth_is_the_majority_type_unless_mostly_background():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 2  # right half stroma
    mask[0:10, 20:30] = 1  # some epithelium
    mask[20:40, 0:10] = 3  # fat on the left, bottom
    x = np.array([0, 160, 120, 0, 80])
    y = np.array([0, 0, 240, 160, 160])
    size = np.full(5, 80.0)  # level-0 px, downsample 8 -> 10 mask px
    labels = patch_truth(mask, 8.0, x, y, size)
    # glass; epithelium square; half stroma (majority tissue, background exactly half);
    # fat; 100% background on the left of the fat
    assert [TISSUE_TYPES[i] for i in labels] == [
        "background",
        "epithelium",
        "stroma",
        "fat",
        "background",
    ]


def test_truth_folder_needs_a_downsample_and_valid_labels(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s1.png")
    with pytest.raises(ConfigError, match="--downsample"):
        load_truth(tmp_path)
    assert load_truth(tmp_path, downsample=4)["s1"].downsample == 4
    (tmp_path / "truth.json").write_text(json.dumps({"slides": {"s1": {"downsample": 16}}}))
    mask = load_truth(tmp_path)["s1"]
    assert mask.downsample == 16 and mask.read().shape == (8, 8)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "s1.png")
    with pytest.raises(ConfigError, match=r"\[7\]"):
        mask.read()


def test_scores_per_class_f1_and_confusion():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 2, 3, 3])
    result = scores(y_true, y_pred)
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["confusion"][0] == [1, 1, 0, 0] and result["confusion"][2] == [0, 0, 2, 1]
    assert result["per_class"]["epithelium"]["precision"] == pytest.approx(2 / 3)
    assert result["per_class"]["epithelium"]["f1"] == pytest.approx(0.8)
    assert result["per_class"]["fat"]["f1"] == pytest.approx(2 / 3)


# --- the store: the real CMU slide --------------------------------------------------------


def write_fingerprints(
    store: Path,
    cohort: str,
    slide_id: str,
    xy: np.ndarray,
    size: int,
    vectors: np.ndarray,
    encoder: str = "test",
    encoder_hash: str = "h1",
):
    """Stored patches as the extraction writes them (schema FINGERPRINTS, one file per slide)."""
    n, dim = vectors.shape
    table = pa.table(
        {
            "patient_id": ["P1"] * n,
            "slide_id": [slide_id] * n,
            "patch_id": [patch_id(slide_id, x, y, size) for x, y in xy],
            "site": ["A"] * n,
            "x": xy[:, 0],
            "y": xy[:, 1],
            "size_px": np.full(n, size, np.float32),
            "x_um": xy[:, 0] * 0.499,
            "y_um": xy[:, 1] * 0.499,
            "patch_um": np.full(n, 112, np.float32),
            "out_px": np.full(n, 224, np.int32),
            "tissue_fraction": np.ones(n, np.float32),
            "fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        },
        schema=fingerprint_schema(dim),
    )
    path = (
        store / "fingerprints" / f"encoder={encoder}" / f"cohort={cohort}" / f"{slide_id}.parquet"
    )
    write_parquet_atomic(
        table, path, file_metadata("fingerprints", encoder=encoder, encoder_hash=encoder_hash)
    )


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory):
    """The real CMU slide as a cohort, a 112 um grid of stored patches, and 'fingerprints'
    that carry the pixel features (plus noise), so that a fingerprint classifier can learn."""
    from fpstore.cohort.cohorts import add_cohort

    root = tmp_path_factory.mktemp("cmu")
    store = root / "store"
    clinical = root / "labels.csv"
    clinical.write_text(
        f"patient_id,slide,ER,PR,Her2,site\nP1,{CMU.resolve()},Positive,Negative,Negative,A\n"
    )
    add_cohort(store, "cmu", clinical=clinical, fmt="csv")
    size = 224  # 112 um at 0.499 um/px
    xs, ys = np.arange(0, 2220 - size + 1, size), np.arange(0, 2967 - size + 1, size)
    xy = np.stack([a.ravel() for a in np.meshgrid(xs, ys)], axis=1)
    from fpstore.slides.slide import open_slide
    from fpstore.tissue.data import slide_pixel_features

    keys = pa.table(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "size_px": [float(size)] * len(xy),
            "out_px": [224] * len(xy),
        }
    )
    with open_slide(CMU) as slide:  # against the slide's own stains, as predict reads them
        features, _ = slide_pixel_features(slide, keys)
    rng = np.random.default_rng(0)
    vectors = np.concatenate([features, rng.normal(size=(len(xy), 3))], axis=1).astype(np.float32)
    write_fingerprints(store, "cmu", CMU_ID, xy, size, vectors)
    return store, xy, features


def test_predict_rules_writes_the_tissue_table_for_every_patch(cmu_store):
    store, xy, features = cmu_store
    summary = predict_tissue(store, "cmu", "rules", progress=False)
    assert summary.n_patches == len(xy) and not summary.failed
    table = pq.read_table(store / "tissue" / "cohort=cmu" / f"{CMU_ID}.parquet")
    assert table.schema.remove_metadata() == TISSUE
    assert table.num_rows == len(xy)
    expected = [TISSUE_TYPES[i] for i in rule_probabilities(features).argmax(axis=1)]
    assert table.column("tissue_type").to_pylist() == expected
    probs = np.stack([table.column(f"p_{t}").to_numpy() for t in TISSUE_TYPES], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # A pooled run records what typed its patches and the epithelium precision to expect.
    from fpstore.tissue.type_patches import typing_record

    record = typing_record(store, "cmu")["methods"]
    assert list(record) == ["rules"] and record["rules"]["patches"] == len(xy)
    assert 0 < record["rules"]["expected_epithelium_precision"] <= 1
    # Skin: glass around it, epidermis (epithelium) and dermis (stroma) inside.
    counts = summary.counts
    assert counts["background"] > 30 and counts["epithelium"] > 10 and counts["stroma"] > 10
    assert set(table.column("method").to_pylist()) == {"rules"}


def test_tissue_table_groups_in_sql(cmu_store):
    import duckdb

    store, xy, _ = cmu_store
    predict_tissue(store, "cmu", "rules", progress=False)
    rows = duckdb.sql(
        f"SELECT tissue_type, count(*) FROM read_parquet('{store}/tissue/cohort=*/*.parquet') "
        "GROUP BY tissue_type"
    ).fetchall()
    assert sum(n for _, n in rows) == len(xy)


def test_fingerprint_classifier_trained_on_rule_labels_types_without_pixels(cmu_store, tmp_path):
    store, xy, features = cmu_store
    described = train_tissue(
        store,
        TissueTrainConfig(method="fingerprint-logreg"),
        cohort="cmu",
        out=tmp_path / "fp.npz",
        labels="rules",
        progress=False,
    )
    assert described["encoder"]["id"] == "test" and described["encoder"]["hash"] == "h1"
    summary = predict_tissue(
        store, "cmu", "fingerprint-logreg", model=tmp_path / "fp.npz", progress=False
    )
    table = pq.read_table(store / "tissue" / "cohort=cmu" / f"{CMU_ID}.parquet")
    rules = [TISSUE_TYPES[i] for i in rule_probabilities(features).argmax(axis=1)]
    agreement = np.mean(np.array(table.column("tissue_type").to_pylist()) == np.array(rules))
    assert summary.method == "fingerprint-logreg" and agreement > 0.85
    assert set(table.column("method").to_pylist()) == {"fingerprint-logreg"}


def test_model_of_another_encoder_is_refused_per_slide(cmu_store, tmp_path):
    store, xy, _ = cmu_store
    model = fit_tissue_model(
        *blobs(dim=16),
        TissueTrainConfig(),
        {"encoder": {"id": "test", "hash": "other-weights", "dim": 16}},
    )
    model.save(tmp_path / "other.npz")
    before = (store / "tissue" / "cohort=cmu" / f"{CMU_ID}.parquet").read_bytes()
    summary = predict_tissue(
        store, "cmu", "fingerprint-logreg", model=tmp_path / "other.npz", progress=False
    )
    assert summary.n_slides == 0 and "other-weights" in summary.failed[0]["error"]
    # Nothing written over the previous table.
    assert (store / "tissue" / "cohort=cmu" / f"{CMU_ID}.parquet").read_bytes() == before


def test_evaluate_against_a_truth_mask(cmu_store, tmp_path):
    store, xy, features = cmu_store
    # A user's mask at downsample 8, painted with the rule types of the patch squares.
    rule_types = rule_probabilities(features).argmax(axis=1)
    mask = np.zeros((2967 // 8 + 1, 2220 // 8 + 1), np.uint8)
    for (x, y), label in zip(xy, rule_types):
        mask[y // 8 : (y + 224) // 8, x // 8 : (x + 224) // 8] = label
    Image.fromarray(mask).save(tmp_path / f"{CMU_ID}.png")
    report = evaluate_tissue(store, "cmu", tmp_path, ["rules"], downsample=8, progress=False)
    rules = report.methods[0]
    assert rules.accuracy == 1.0 and rules.n_patches == len(xy)
    assert np.trace(np.array(rules.confusion)) == len(xy)
    assert report.truth_counts == {
        t: int((rule_types == i).sum()) for i, t in enumerate(TISSUE_TYPES)
    }
    with pytest.raises(ConfigError, match="no truth mask"):
        (tmp_path / "other").mkdir()
        Image.fromarray(mask).save(tmp_path / "other" / "unrelated.png")
        evaluate_tissue(store, "cmu", tmp_path / "other", ["rules"], downsample=8, progress=False)


# --- the command line ---------------------------------------------------------------------


def test_cli_methods_match_the_library():
    from fpstore.cli import tissue

    assert tissue.METHODS == METHODS and tissue.TYPES == TISSUE_TYPES


def test_cli_predict_and_evaluate_json(cmu_store, tmp_path):
    store, xy, _ = cmu_store
    runner = CliRunner()
    result = runner.invoke(
        cli, ["tissue", "predict", "--cohort", "cmu", "--store", str(store), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_patches"] == len(xy)
    mask = np.full((400, 300), 2, np.uint8)
    Image.fromarray(mask).save(tmp_path / f"{CMU_ID}.png")
    result = runner.invoke(
        cli,
        [
            "tissue",
            "evaluate",
            "--cohort",
            "cmu",
            "--store",
            str(store),
            "--truth",
            str(tmp_path),
            "--downsample",
            "8",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["truth_counts"]["stroma"] == len(xy)
    assert report["methods"][0]["method"] == "rules"
    result = runner.invoke(
        cli,
        [
            "tissue",
            "evaluate",
            "--cohort",
            "cmu",
            "--store",
            str(store),
            "--truth",
            str(tmp_path),
            "--downsample",
            "8",
        ],
    )
    assert result.exit_code == 0 and "F1 stroma" in result.output and "confusion" in result.output


def test_cli_bad_input_is_one_line(cmu_store, tmp_path):
    store, _, _ = cmu_store
    runner = CliRunner()
    result = runner.invoke(cli, ["tissue", "predict", "--cohort", "nope", "--store", str(store)])
    assert result.exit_code != 0 and "nope" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        cli,
        [
            "tissue",
            "predict",
            "--cohort",
            "cmu",
            "--store",
            str(store),
            "--threshold",
            "fat_white_max=lots",
        ],
    )
    assert result.exit_code != 0 and "fat_white_max" in result.output
    result = runner.invoke(
        cli,
        [
            "tissue",
            "predict",
            "--cohort",
            "cmu",
            "--store",
            str(store),
            "--method",
            "fingerprint-knn",
            "--model",
            str(tmp_path / "x.npz"),
        ],
    )
    assert result.exit_code != 0 and "tissue train" in result.output


# --- synthetic cohorts with truth masks: sites the classifiers did not train on -------------


@pytest.fixture(scope="module")
def synth_store(synth_small, tmp_path_factory):
    """The small synthetic TCGA-like (4 sites) and external (2 other sites) cohorts, every
    112 um square on a half-overlapping grid stored (tissue or not, so every type occurs),
    with the squares' pixel features as their 'fingerprints' (a stand-in encoder)."""
    from fpstore.cohort.cohorts import add_cohort, load_cohort
    from fpstore.slides.slide import open_slide

    store = tmp_path_factory.mktemp("synth-store")
    add_cohort(
        store,
        "tcga",
        slides=str(synth_small / "tcga" / "slides"),
        clinical=synth_small / "tcga" / "nationwidechildrens.org_clinical_patient_brca.txt",
    )
    add_cohort(
        store,
        "external",
        slides=str(synth_small / "external" / "slides"),
        clinical=synth_small / "external" / "labels.csv",
        fmt="csv",
    )
    for cohort in ("tcga", "external"):
        for row in load_cohort(store, cohort).slides.to_pylist():
            with open_slide(row["path"]) as slide:
                size = int(round(112 / slide.info.mpp))
                xs = np.arange(0, slide.info.width - size + 1, size // 2)
                ys = np.arange(0, slide.info.height - size + 1, size // 2)
                xy = np.stack([a.ravel() for a in np.meshgrid(xs, ys)], axis=1)
                features = pixel_features(slide.read_patches(xy, size, 224))
            write_fingerprints(store, cohort, row["slide_id"], xy, size, features)
    return store, synth_small / "truth"


def test_rules_on_synthetic_sites_never_tuned_on(synth_store):
    # The rule thresholds were set on the TCGA-like sites; the external sites differ in stain.
    store, truth = synth_store
    report = evaluate_tissue(store, "external", truth, ["rules"], progress=False)
    rules = report.methods[0]
    assert not report.slides_without_truth and all(report.truth_counts.values())
    f1 = {t: c["f1"] for t, c in rules.per_class.items()}
    assert rules.accuracy > 0.7 and f1["background"] > 0.85, f1
    assert min(f1.values()) > 0.5, f1


def test_classifier_trained_on_truth_types_another_site(synth_store, tmp_path):
    store, truth = synth_store
    described = train_tissue(
        store,
        TissueTrainConfig(method="fingerprint-logreg"),
        cohort="tcga",
        labels="truth",
        truth=truth,
        out=tmp_path / "fp.npz",
        sample=0,
        progress=False,
    )
    assert set(described["train_counts"]) == set(TISSUE_TYPES)
    report = evaluate_tissue(
        store,
        "external",
        truth,
        ["fingerprint-logreg", "rules"],
        models={"fingerprint-logreg": tmp_path / "fp.npz"},
        progress=False,
    )
    trained, rules = report.methods
    assert trained.n_patches == rules.n_patches == sum(report.truth_counts.values())
    # Random-weight fingerprints on unseen sites: accuracy and macro F1 about 0.70
    # (majority class 0.31); a trained fingerprint network does better.
    assert trained.accuracy > 0.6 and trained.macro_f1 > 0.6


# --- the hand-labelled real truth set -----------------------------------------------------

REAL_TRUTH = DATA / "tissue_truth" / "real_tissue_truth.csv"


def test_real_truth_file_reads_and_says_how_each_patch_was_drawn():
    from fpstore.tissue.truth import PATCH_TRUTH_COLUMNS, read_patch_truth

    header = REAL_TRUTH.read_text().splitlines()[0].split(",")
    assert tuple(header) == PATCH_TRUTH_COLUMNS
    patches = read_patch_truth(REAL_TRUTH)
    kinds = {p.tissue_type for p in patches}
    assert {"background", "epithelium", "stroma", "fat"} <= kinds
    assert all(p.image.is_file() and p.mpp > 0 and p.size_px > 0 for p in patches)
    assert {p.drawn for p in patches} <= {"grid cell", "rectangle", "whole tile"}
    # Every labelled square is about the 112 um a patch spans.
    assert all(abs(p.size_px * p.mpp - 112) < 1 for p in patches)


@pytest.mark.parametrize(
    "row, message",
    [
        ("../slides/CMU-1-Small-Region.svs,0.499,0,0,224,lymphocyte,grid cell", "lymphocyte"),
        ("../slides/CMU-1-Small-Region.svs,big,0,0,224,stroma,grid cell", "numbers"),
        ("../slides/CMU-1-Small-Region.svs,0.499,0,0,0,stroma,grid cell", "size_px"),
        ("../slides/nope.svs,0.499,0,0,224,stroma,grid cell", "nope.svs"),
    ],
)
def test_patch_truth_rows_are_checked(tmp_path, row, message):
    from fpstore.tissue.truth import PATCH_TRUTH_COLUMNS, read_patch_truth

    folder = tmp_path / "truth"
    folder.mkdir()
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "CMU-1-Small-Region.svs").symlink_to(CMU.resolve())
    path = folder / "t.csv"
    path.write_text(",".join(PATCH_TRUTH_COLUMNS) + "\n" + row + "\n")
    with pytest.raises(ConfigError, match=message):
        read_patch_truth(path)
    path.write_text("image,x,y\n")
    with pytest.raises(ConfigError, match="lacks columns mpp"):
        read_patch_truth(path)


def test_rules_on_the_real_truth_set_meet_an_honest_bar():
    # The bar sits below what the rules scored (docs/results.md) by a margin for readers'
    # rounding, not at the synthetic goal: real prostate smooth muscle takes up more
    # hematoxylin than the collagen the rules were developed on.
    from fpstore.tissue.evaluate import evaluate_patch_truth

    report = evaluate_patch_truth(REAL_TRUTH)
    (rules,) = report.methods
    per_class = rules.per_class
    assert rules.accuracy >= 0.85, rules
    assert per_class["background"]["f1"] >= 0.9 and per_class["stroma"]["f1"] >= 0.85, per_class
    assert per_class["epithelium"]["recall"] >= 0.8, per_class
    with pytest.raises(ConfigError, match="fingerprints"):
        evaluate_patch_truth(REAL_TRUTH, ["fingerprint-logreg"])


def test_tissue_methods_are_a_registry():
    from fpstore.tissue.methods import REGISTRY, TRAINED_METHODS, get_method
    from fpstore.tissue.trained import _FAMILIES

    assert not get_method("rules").trained and get_method("rules").reads == "pixels"
    assert all(REGISTRY[m].family in _FAMILIES for m in TRAINED_METHODS)
    assert TissueTrainConfig(method="pixel-logreg").source == "pixels"
    with pytest.raises(ConfigError, match="valid tissue methods: fingerprint-knn"):
        get_method("nope")


def test_slide_stains_are_the_slides_own():
    from fpstore.slides.slide import open_slide
    from fpstore.tissue.features import DEFAULT_STAINS, estimate_slide_stains

    slide = open_slide(CMU)
    try:
        xy = np.array([[x, y] for x in (896, 1120, 1344) for y in (1120, 1568, 2016)])
        stains = estimate_slide_stains(slide.read_patches(xy, 224.0, 224))
    finally:
        slide.close()
    assert stains.fitted and stains != DEFAULT_STAINS
    # hematoxylin absorbs red more than eosin does; the cut sits between stroma and cytoplasm
    assert stains.hematoxylin[0] > stains.eosin[0]
    assert 0.0 < stains.cytoplasm_h < 0.4
    assert estimate_slide_stains(np.full((2, 64, 64, 3), 240, np.uint8)) == DEFAULT_STAINS
