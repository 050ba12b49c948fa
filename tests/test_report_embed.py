"""Fingerprint maps: structure kept, clusters picked by score, montages from distinct patients."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _report_store import FP_PER_SLIDE, N_PATIENTS, build_store
from PIL import Image

from fpstore.errors import ConfigError, StoreError
from fpstore.report.embed import (
    ClusterConfig,
    EmbedConfig,
    embed_cohort,
    embed_points,
    scaled_scores,
    select_clusters,
)
from fpstore.report.montage import SIGN_COLORS, montage_image


def _blobs(n_per=100, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 8
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def _knn_agreement(xy, labels):
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return (labels[d.argmin(1)] == labels).mean()


def test_tsne_keeps_planted_clusters_apart():
    vectors, labels = _blobs()
    xy = embed_points(vectors, EmbedConfig(method="tsne", seed=0))
    assert xy.shape == (300, 2) and xy.dtype == np.float32
    assert _knn_agreement(xy, labels) > 0.98


@pytest.mark.slow  # numba compiles UMAP on first use: ~20 s
def test_umap_keeps_planted_clusters_apart():
    vectors, labels = _blobs()
    xy = embed_points(vectors, EmbedConfig(method="umap"))
    assert _knn_agreement(xy, labels) > 0.98


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="method"):
        EmbedConfig(method="pca")
    with pytest.raises(ConfigError, match="max_points"):
        EmbedConfig(max_points=3)
    with pytest.raises(ConfigError, match="min_enrichment"):
        ClusterConfig(min_enrichment=2.0)
    with pytest.raises(ConfigError, match="at least 5"):
        embed_points(np.zeros((3, 8)))


def test_select_clusters_picks_strong_clusters_with_one_patch_per_patient():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [50, 0], [0, 50], [50, 50]], float)
    which = np.repeat(np.arange(4), 150)
    xy = centres[which] + rng.normal(size=(600, 2))
    scores = np.array([0.9, -0.7, 0.05, -0.1])[which] + rng.normal(size=600) * 0.05
    patients = rng.integers(0, 8, 600)
    labels, clusters = select_clusters(
        xy, scores, patients, ClusterConfig(n_clusters=4, per_cluster=5)
    )
    assert len(set(labels)) == 4
    assert [c.sign for c in clusters] == ["negative", "positive"]
    neg, pos = clusters
    assert np.allclose(neg.centre, centres[1], atol=0.5) and np.allclose(
        pos.centre, centres[0], atol=0.5
    )
    assert neg.mean_score == pytest.approx(-0.7, abs=0.02)
    for c in clusters:
        assert len(c.members) == 5 and len(set(patients[c.members])) == 5
        assert all(labels[m] == labels[c.members[0]] for m in c.members)
        # The first member is the point nearest the centre among the cluster's points.
        d = ((xy - c.centre) ** 2).sum(1)
        same = labels == labels[c.members[0]]
        assert c.members[0] == np.flatnonzero(same)[d[same].argmin()]


def test_scaled_scores_map_the_range_to_minus_one_one():
    assert scaled_scores([0.0, 0.5, 1.0], (0.0, 1.0)).tolist() == [-1.0, 0.0, 1.0]


def test_montage_image_layout():
    tiles = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    image = montage_image(tiles, pad=2, color=(255, 0, 0))
    assert image.shape == (8, 3 * 6 + 2, 3)
    assert (image[2:6, 2:6] == 10).all() and (image[2:6, 14:18] == 30).all()
    assert (image[0, :] == (255, 0, 0)).all()
    with pytest.raises(ConfigError):
        montage_image([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])


def test_embed_cohort_writes_map_clusters_and_montages(tmp_path):
    store = build_store(tmp_path / "store")
    result = embed_cohort(
        store,
        "toy",
        tmp_path / "embed",
        run_id="mil-run",
        color_by=("prediction", "label", "patient"),
        config=EmbedConfig(seed=0),
    )
    assert result.encoder == "toy-enc"  # the run's encoder
    assert (result.n_points, result.n_patients) == (N_PATIENTS * FP_PER_SLIDE, N_PATIENTS)
    table = pq.read_table(result.table)
    assert table.num_rows == result.n_points
    assert set(table.column_names) >= {"patch_id", "patient_id", "x", "y", "cluster", "score"}
    # The planted +0.8 and -0.8 fingerprint clusters are found, each with a montage.
    signs = {c.sign for c in result.clusters}
    assert signs == {"positive", "negative"}
    assert all(abs(c.mean_score) > 0.5 for c in result.clusters)
    assert len(result.montages) == len(result.clusters)
    patients = np.asarray(table.column("patient_id").to_pylist())
    for cluster, path in zip(result.clusters, result.montages):
        assert len(set(patients[cluster.members])) == len(cluster.members) == 5
        image = np.asarray(Image.open(path))
        assert image.shape == (112 + 8, 5 * 116 + 4, 3)
        assert image[0, 0].tolist() == list(SIGN_COLORS[cluster.sign])
        assert image[4:116, 4:116].std() > 1  # slide pixels, not a blank tile
    assert set(result.figures) == {"prediction", "label", "patient"}
    for path in result.figures.values():
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape == (600, 600, 3) and image.std() > 10


def test_embed_cohort_subsamples_and_names_missing_inputs(tmp_path):
    store = build_store(tmp_path / "store")
    result = embed_cohort(
        store, "toy", tmp_path / "embed", color_by=("site",), config=EmbedConfig(max_points=100)
    )
    assert result.n_points == 100 and result.clusters == []
    assert any("100 of 400" in n for n in result.notes)
    # A run without patch scores: the map is drawn by label, the note says why not by prediction.
    by_label = embed_cohort(
        store, "toy", tmp_path / "e1", run_id="logreg-run", config=EmbedConfig(max_points=100)
    )
    assert set(by_label.figures) == {"label", "site"} and by_label.clusters == []
    assert any("no patch scores" in n for n in by_label.notes)
    with pytest.raises(StoreError, match="encoder"):
        embed_cohort(store, "toy", tmp_path / "e2", encoder="nope")
    with pytest.raises(StoreError, match="has no fingerprints"):
        embed_cohort(store, "other", tmp_path / "e3")


def test_unreadable_slides_cost_the_montages_not_the_map(tmp_path):
    store = build_store(tmp_path / "store")
    slides_path = store / "cohorts" / "toy" / "slides.parquet"
    slides = pq.read_table(slides_path)
    moved = slides.set_column(
        slides.column_names.index("path"), "path", pa.array(["/gone/x.svs"] * slides.num_rows)
    )
    pq.write_table(moved, slides_path)
    result = embed_cohort(
        store, "toy", tmp_path / "embed", run_id="mil-run", color_by=("prediction",)
    )
    assert result.clusters and result.montages == []
    assert any("no cluster montages" in n and "/gone/x.svs" in n for n in result.notes)
    assert result.figures["prediction"].is_file()
