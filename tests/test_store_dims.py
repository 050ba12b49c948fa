"""Fingerprints of 512, 768, 1024, 1536 and 2560 dimensions side by side in one store: SQL with
vector functions, compare (classify for each), predict with a saved model, similar, embed."""

import re
from pathlib import Path

import numpy as np
import pytest

import fpstore.store
from fpstore.classify.pipeline import ClassifyConfig, CompareConfig, classify, compare
from fpstore.classify.predict import PredictConfig, predict
from fpstore.report.embed import EmbedConfig, embed_points
from fpstore.store.similarity import similar
from tests._classify_store import add_cohort

# The paper's network (512), UNI2-h / H-optimus (1536), Virchow2 (2560), ViT-B (768), UNI (1024)
DIMS = {"fingerprint": 512, "h0-mini": 768, "uni": 1024, "uni2-h": 1536, "virchow2": 2560}
FAST = {"max_epochs": 20, "patience": 4}
DOCS = Path(__file__).parents[1] / "docs" / "queries.md"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dims-store")
    add_cohort(root, "train", 60, seed=1, tissue=True, encoders=tuple(DIMS), dims=DIMS)
    add_cohort(root, "ext", 30, seed=2, tissue=False, encoders=tuple(DIMS), dims=DIMS)
    return root


def test_sql_sees_every_dimension_and_array_functions_work_per_dimension(store):
    with fpstore.store.open(store, read_only=True) as fs:
        assert fs.dims == DIMS
        rows = fs.sql(
            "SELECT encoder, min(len(fingerprint)) AS lo, max(len(fingerprint)) AS hi "
            "FROM fingerprints GROUP BY encoder ORDER BY encoder"
        ).rows()
        assert {r["encoder"]: (r["lo"], r["hi"]) for r in rows} == {
            e: (d, d) for e, d in DIMS.items()
        }
        # The shared view holds lists: list functions work across encoders...
        (same,) = (
            fs.sql("SELECT min(list_cosine_similarity(fingerprint, fingerprint)) FROM fingerprints")
            .to_arrow()[0]
            .to_pylist()
        )
        assert same == pytest.approx(1.0, abs=1e-5)
        for encoder, dim in DIMS.items():
            view = f"fingerprints_{dim}"
            assert (
                fs.sql(f"SELECT fingerprint FROM {view} LIMIT 1")
                .to_arrow()
                .schema.field("fingerprint")
                .type.list_size
                == dim
            )
            # ...and array functions in each dimension's own view, against a query vector.
            top = fs.sql(
                f"WITH q AS (SELECT fingerprint FROM {view} WHERE cohort = 'ext' LIMIT 1) "
                f"SELECT f.patch_id, array_cosine_similarity(f.fingerprint, q.fingerprint) AS s "
                f"FROM {view} f, q WHERE f.encoder = ? ORDER BY s DESC LIMIT 3",
                [encoder],
            ).rows()
            assert len(top) == 3 and top[0]["s"] == pytest.approx(1.0, abs=1e-5)
            assert top[0]["s"] >= top[1]["s"] >= top[2]["s"]
        documented = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)[4]
        hits = fs.sql(documented).rows()
        assert len(hits) == 10 and hits[0]["patch_id"] == "ext-P0003-S/0_0_224"
        assert hits[0]["s"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_compare_classifies_every_dimension_on_the_same_splits(store):
    cfg = CompareConfig(
        marker="ER",
        cohort="train",
        methods=("mil",),
        pools=("all",),
        n_boot=200,
        classifier={"mil": FAST},
    )
    doc = compare(store, cfg, progress=False)
    by_encoder = {r["encoder"]: r for r in doc["rows"]}
    assert set(by_encoder) == set(DIMS)
    # The planted ER signal survives each projection: every head finds it.
    assert all(r["auc"] > 0.75 for r in by_encoder.values()), doc["rows"]


@pytest.mark.slow
def test_a_saved_2560_d_model_predicts_another_cohort_and_similar_and_embed_work(store):
    run = classify(
        store,
        ClassifyConfig(
            marker="ER", cohort="train", encoder="virchow2", n_boot=200, classifier=FAST
        ),
        progress=False,
    )
    scored = predict(
        store, PredictConfig(model=run["model"]["model_id"], cohort="ext", n_boot=200), False
    )
    assert scored["config"]["encoder"] == "virchow2" and scored["predict"]["metrics"]["auc"] > 0.7
    with fpstore.store.open(store) as fs:
        for encoder, dim in DIMS.items():
            vectors = fs.fingerprints(encoder, "ext")
            assert vectors.vectors.shape[1] == dim
            query = vectors.keys.column("patch_id")[0].as_py()
            hits = similar(fs, query, k=4, encoder=encoder, cohort="ext")
            assert len(hits.hits) == 4 and query not in [h["patch_id"] for h in hits.hits]
            ids, means = fs.mean_fingerprints(encoder, "ext")
            assert means.shape == (len(ids), dim)
        points = embed_points(fs.fingerprints("virchow2", "train").vectors, EmbedConfig(seed=0))
    assert points.shape[1] == 2 and np.isfinite(points).all()


def test_site_probe_on_features_wider_than_the_cohort_equals_the_full_fit():
    """The probe rotates wide features onto the patients' span (PCA keeping every
    component): the same L2-penalised model as the fit in all dimensions, much faster."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fpstore.classify.leakage import site_probe
    from tests._classify_bags import make_bags

    bags, _ = make_bags(n_patients=40, n_patches=4, dim=8, seed=3, n_sites=4)
    bags.features = bags.features @ np.random.default_rng(0).normal(size=(8, 120))
    probe = site_probe(bags)
    full = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, tol=1e-8))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    proba = cross_val_predict(
        full, bags.mean_features(), bags.sites, cv=folds, method="predict_proba"
    )
    classes = np.unique(bags.sites)
    assert probe["accuracy"] == pytest.approx(np.mean(classes[proba.argmax(1)] == bags.sites))


@pytest.mark.slow
def test_the_report_of_a_run_on_2560_d_fingerprints(tmp_path):
    """The report's fingerprint map, clusters and montages from Virchow2-wide vectors."""
    from fpstore.report.html import build_report
    from tests._report_store import build_store

    store = build_store(tmp_path / "store", dim=2560)
    with fpstore.store.open(store) as fs:
        assert set(fs.dims.values()) == {2560}
    report = build_report(
        store, "mil-run", tmp_path / "out", n_heatmaps=1, n_boot=100, embed=EmbedConfig(seed=0)
    )
    assert report.index.is_file() and len(report.heatmaps) == 1
    assert report.embedding is not None and len(report.embedding.clusters) >= 2
    assert "Fingerprint map" in report.index.read_text()
