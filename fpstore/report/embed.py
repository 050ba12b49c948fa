"""A 2-D map of fingerprints with clusters strongly predicted positive or negative (Fig. 7).

Embedding: PCA to ``pca_dims`` (randomised SVD), then openTSNE's FFT-accelerated t-SNE
(the "efficient implementation" the paper used; O(N) per iteration; Barnes-Hut below 10,000
points) or UMAP; benchmarks/bench_embed.py measures both. Clusters:
k-means on the 2-D map; a cluster is selected when the mean of its patches' scores, scaled so
that the score range maps to [-1, 1], is at least ``min_enrichment`` away from 0. For each
selected cluster the patches nearest its centre are picked, one per patient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpstore.config import check_choice, check_range
from fpstore.errors import ConfigError, FpstoreError, StoreError
from fpstore.store.fingerprints import resolve_encoder

METHODS = ("tsne", "umap")
COLOR_BY = ("prediction", "label", "patient", "site")


@dataclass(frozen=True)
class EmbedConfig:
    method: str = "tsne"
    pca_dims: int = 50
    perplexity: float = 30.0  # t-SNE; reduced automatically for tiny inputs
    n_neighbors: int = 15  # UMAP
    n_jobs: int = 2
    seed: int = 0
    max_points: int | None = None  # a seeded random subset when there are more patches

    def __post_init__(self):
        check_choice("EmbedConfig", "method", self.method, METHODS)
        check_range("EmbedConfig", "pca_dims", self.pca_dims, 2, 4096)
        check_range("EmbedConfig", "perplexity", self.perplexity, 2.0, 500.0)
        check_range("EmbedConfig", "n_neighbors", self.n_neighbors, 2, 500)
        check_range("EmbedConfig", "n_jobs", self.n_jobs, 1, 512)
        if self.max_points is not None:
            check_range("EmbedConfig", "max_points", self.max_points, 10)


@dataclass(frozen=True)
class ClusterConfig:
    n_clusters: int = 30
    n_select: int = 6  # per sign, as in the paper (six negative, six positive)
    per_cluster: int = 5  # patches per montage, each from a different patient
    min_enrichment: float = 0.2  # |mean scaled score| in [-1, 1]
    min_size: int = 10

    def __post_init__(self):
        check_range("ClusterConfig", "n_clusters", self.n_clusters, 2, 1000)
        check_range("ClusterConfig", "n_select", self.n_select, 0, 100)
        check_range("ClusterConfig", "per_cluster", self.per_cluster, 1, 50)
        check_range("ClusterConfig", "min_enrichment", self.min_enrichment, 0.0, 1.0)
        check_range("ClusterConfig", "min_size", self.min_size, 1)


def embed_points(vectors: np.ndarray, config: EmbedConfig = EmbedConfig()) -> np.ndarray:
    """(N, 2) float32 coordinates of (N, dim) vectors."""
    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    if vectors.ndim != 2 or n < 5:
        raise ConfigError(f"an embedding needs at least 5 vectors; got shape {vectors.shape}")
    reduced = _pca(vectors, config.pca_dims, config.seed)
    if config.method == "tsne":
        from openTSNE import TSNE

        perplexity = min(config.perplexity, (n - 1) / 3.0)
        # openTSNE's "auto": Barnes-Hut below 10,000 points (FFT's fixed grid costs more
        # there), FFT above. Small maps stay single-threaded: threads only add overhead there.
        tsne = TSNE(
            perplexity=perplexity,
            n_jobs=config.n_jobs if n >= 10_000 else 1,
            random_state=config.seed,
            negative_gradient_method="auto",
            verbose=False,
        )
        return np.asarray(tsne.fit(reduced), np.float32)
    import umap

    # A seed makes UMAP single-threaded; speed is worth more than bit-identical maps here.
    model = umap.UMAP(
        n_neighbors=min(config.n_neighbors, n - 1),
        n_jobs=config.n_jobs,
        init="pca" if n < 4096 else "spectral",
        low_memory=True,
    )
    return np.asarray(model.fit_transform(reduced), np.float32)


def _pca(vectors: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dims = min(dims, vectors.shape[1], len(vectors) - 1)
    if dims >= vectors.shape[1]:
        return vectors - vectors.mean(axis=0)
    return (
        PCA(dims, svd_solver="randomized", random_state=seed)
        .fit_transform(vectors)
        .astype(np.float32)
    )


def scaled_scores(scores, score_range: tuple[float, float]) -> np.ndarray:
    """Scores mapped linearly so that the score range becomes [-1, 1] (0 = undecided)."""
    lo, hi = score_range
    return (np.asarray(scores, np.float64) - (lo + hi) / 2) / ((hi - lo) / 2)


@dataclass
class Cluster:
    number: int  # 1-based, the label drawn on the map
    sign: str  # "positive" or "negative"
    mean_score: float  # scaled to [-1, 1]
    size: int
    centre: tuple[float, float]
    members: list[int]  # row indices of the montage patches, nearest the centre first

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def select_clusters(
    xy: np.ndarray,
    scaled: np.ndarray,
    patients,
    config: ClusterConfig = ClusterConfig(),
    seed: int = 0,
) -> tuple[np.ndarray, list[Cluster]]:
    """(k-means label per point, the selected clusters: most negative first, then most positive)."""
    from sklearn.cluster import KMeans

    xy = np.asarray(xy, np.float64)
    patients = np.asarray(patients)
    # About 100 points or more per cluster, so that a small map is not cut into slivers.
    k = max(2, min(config.n_clusters, len(xy) // 100))
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(xy)
    sizes = np.bincount(labels, minlength=k)
    means = np.bincount(labels, weights=scaled, minlength=k) / np.maximum(sizes, 1)
    ok = sizes >= config.min_size
    negative = [c for c in np.argsort(means) if ok[c] and means[c] <= -config.min_enrichment]
    positive = [c for c in np.argsort(-means) if ok[c] and means[c] >= config.min_enrichment]
    chosen = [(c, "negative") for c in negative[: config.n_select]]
    chosen += [(c, "positive") for c in positive[: config.n_select]]
    clusters = []
    for number, (c, sign) in enumerate(chosen, start=1):
        index = np.flatnonzero(labels == c)
        centre = xy[index].mean(axis=0)
        order = index[np.argsort(((xy[index] - centre) ** 2).sum(axis=1), kind="stable")]
        # Nearest first, skipping patients already shown: each patch from a different patient.
        _, first = np.unique(patients[order], return_index=True)
        members = order[np.sort(first)][: config.per_cluster]
        clusters.append(
            Cluster(
                number,
                sign,
                float(means[c]),
                int(sizes[c]),
                (float(centre[0]), float(centre[1])),
                members.tolist(),
            )
        )
    return labels, clusters


def plot_embedding(
    xy: np.ndarray,
    values,
    color_by: str,
    path: Path,
    clusters=(),
    score_range: tuple[float, float] = (-1.0, 1.0),
    title: str = "",
    size_in: float = 6.0,
    dpi: int = 100,
) -> Path:
    """Scatter of the map coloured by prediction (blue-green-red), label, patient or site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    check_choice("plot_embedding", "color_by", color_by, COLOR_BY)
    fig, ax = plt.subplots(figsize=(size_in, size_in), dpi=dpi)
    point = max(0.5, min(12.0, 4000.0 / max(len(xy), 1)))
    if color_by == "prediction":
        # The paper's shading: blue -1 (negative), green 0, red +1 (positive).
        cmap = LinearSegmentedColormap.from_list("bgr", ["#1f3fff", "#2fb84a", "#ff2a1a"])
        art = ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c=np.asarray(values, np.float64),
            cmap=cmap,
            vmin=score_range[0],
            vmax=score_range[1],
            s=point,
            linewidths=0,
            rasterized=True,
        )
        fig.colorbar(art, ax=ax, fraction=0.04, pad=0.02, label="prediction")
    else:
        names, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
        colors = plt.cm.tab20(codes % 20)
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=point, linewidths=0, rasterized=True)
        if len(names) <= 12:
            for i, name in enumerate(names):
                ax.scatter([], [], color=plt.cm.tab20(i % 20), label=name, s=20)
            ax.legend(fontsize=7, loc="best", markerscale=1.5, title=color_by, title_fontsize=8)
    for cluster in clusters:
        ax.annotate(
            str(cluster.number),
            cluster.centre,
            fontsize=9,
            weight="bold",
            ha="center",
            va="center",
            bbox={"boxstyle": "circle,pad=0.2", "fc": "white", "alpha": 0.8},
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"fingerprints coloured by {color_by}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class EmbeddingResult:
    cohort: str
    encoder: str
    method: str
    n_points: int
    n_patients: int
    table: Path  # embedding.parquet: patch keys, x, y, cluster, score
    figures: dict[str, Path]  # color_by -> PNG
    clusters: list[Cluster]
    montages: list[Path]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {
            k: v for k, v in self.__dict__.items() if k not in ("clusters", "figures", "montages")
        }
        out.update(
            table=str(self.table),
            figures={k: str(v) for k, v in self.figures.items()},
            clusters=[c.to_dict() for c in self.clusters],
            montages=[str(p) for p in self.montages],
        )
        return out


def embed_cohort(  # noqa: PLR0913  one keyword per `fpstore report embed` option
    store: Path,
    cohort: str,
    out: Path,
    encoder: str | None = None,
    run_id: str | None = None,
    marker: str | None = None,
    color_by=("prediction", "label", "site"),
    config: EmbedConfig = EmbedConfig(),
    clusters: ClusterConfig = ClusterConfig(),
    montage_px: int = 112,
) -> EmbeddingResult:
    """Embed a cohort's fingerprints, colour the map, select clusters and draw their montages.

    ``run_id`` gives the patch predictions (colour "prediction" and the cluster selection);
    ``marker`` (default: the run's) gives the patient labels for colour "label".
    """
    from fpstore.store.runs import load_run

    for name in color_by:
        check_choice("embed_cohort", "color_by", name, COLOR_BY)
    seconds: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    run = load_run(store, run_id) if run_id else None
    encoder = resolve_encoder(store, cohort, encoder or (run.encoder if run else None))
    keys, vectors = _points(store, cohort, encoder, config, notes)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    xy = embed_points(vectors, config)
    seconds["embed"] = time.perf_counter() - start

    patch_ids = keys.column("patch_id").to_pylist()
    patients = np.asarray(keys.column("patient_id").to_pylist())
    score_range = run.score_range if run else (-1.0, 1.0)
    scores = None if run is None else _run_scores(run, patch_ids, notes)

    start = time.perf_counter()
    cluster_labels = np.full(len(xy), -1)
    selected: list[Cluster] = []
    if scores is not None:
        scaled = scaled_scores(scores, score_range)
        selected = _clusters(xy, scaled, patients, clusters, config.seed, cluster_labels, notes)
    seconds["clusters"] = time.perf_counter() - start

    out = Path(out)
    start = time.perf_counter()
    marker = marker or (run.marker if run else None)
    view = _MapView(cohort, encoder, config.method, marker, score_range)
    figures = _maps(store, keys, xy, scores, selected, color_by, view, out, notes)
    montages = _montages(store, cohort, keys, selected, out, montage_px, notes)
    seconds["figures"] = time.perf_counter() - start

    columns = {"patch_id": patch_ids, "patient_id": patients.tolist(), "xy": xy}
    table_path = _write_table(keys, columns, cluster_labels, scores, out, view, run_id)
    return EmbeddingResult(
        cohort,
        encoder,
        config.method,
        len(xy),
        len(set(patients.tolist())),
        table_path,
        figures,
        selected,
        montages,
        seconds,
        notes,
    )


def _clusters(xy, scaled, patients, clusters: ClusterConfig, seed: int, labels, notes):
    """The enriched clusters among the scored patches (their members as rows of ``xy``);
    each scored patch's cluster goes into ``labels``."""
    scored = np.flatnonzero(np.isfinite(scaled))
    labels_scored, selected = select_clusters(
        xy[scored], scaled[scored], patients[scored], clusters, seed=seed
    )
    labels[scored] = labels_scored
    for c in selected:
        c.members = scored[c.members].tolist()
    if not selected:
        notes.append(f"no cluster has a mean scaled score beyond +/-{clusters.min_enrichment}")
    return selected


def _points(store: Path, cohort: str, encoder: str, config: EmbedConfig, notes: list):
    """(keys, vectors) of the cohort's fingerprints, a seeded sample of ``max_points``."""
    import pyarrow as pa

    from fpstore.store import open as open_store

    with open_store(store) as fs:
        fp = fs.fingerprints(encoder, cohort)
    if len(fp) < 5:
        raise StoreError(
            f"cohort {cohort!r} has {len(fp)} fingerprints for encoder {encoder!r}; "
            "an embedding needs at least 5 (run `fpstore extract`)"
        )
    keys, vectors = fp.keys, fp.vectors
    if config.max_points is not None and len(fp) > config.max_points:
        keep = np.sort(
            np.random.default_rng(config.seed).choice(len(fp), config.max_points, replace=False)
        )
        keys, vectors = keys.take(pa.array(keep)), vectors[keep]
        notes.append(f"embedded a random {config.max_points} of {len(fp)} patches")
    return keys, vectors


def _run_scores(run, patch_ids: list, notes: list) -> np.ndarray | None:
    """The run's score per patch (NaN where it has none); None where it has none at all."""
    from fpstore.report.figure_data import lookup

    if not run.patches_path.is_file():
        notes.append(f"run {run.run_id} stored no patch scores: no prediction colours or clusters")
        return None
    scores = lookup(patch_ids, run.patch_scores(), "score")
    missing = np.array([s is None for s in scores])
    if missing.all():
        notes.append(
            f"run {run.run_id} scored none of these patches: no prediction colours or clusters"
        )
        return None
    if missing.any():
        notes.append(
            f"{int(missing.sum())} patches have no score in run {run.run_id} "
            "(left out of the prediction colours)"
        )
    return np.where(missing, np.nan, scores).astype(np.float64)


@dataclass(frozen=True)
class _MapView:
    """What a map shows, for its titles and its table's metadata."""

    cohort: str
    encoder: str
    method: str
    marker: str | None
    score_range: tuple


def _maps(store, keys, xy, scores, selected, color_by, view: _MapView, out: Path, notes):
    """One map per colouring of ``color_by`` that has values: {colouring: png path}."""
    figures = {}
    for name in color_by:
        values = _colour_values(name, store, view.cohort, keys, scores, view.marker, notes)
        if values is None:
            continue
        shown = selected if name == "prediction" else ()
        title = f"{view.cohort} {view.encoder} {view.method}: {name}" + (
            f" ({view.marker})" if name == "label" else ""
        )
        figures[name] = plot_embedding(
            xy, values, name, out / f"embedding_{name}.png", shown, view.score_range, title
        )
    return figures


def _montages(store, cohort, keys, selected, out: Path, montage_px: int, notes) -> list:
    from fpstore.report.montage import cluster_montages

    try:
        return cluster_montages(store, cohort, keys, selected, out, montage_px)
    except FpstoreError as error:  # slides moved or unreadable: the map is still worth having
        notes.append(f"no cluster montages: {error}")
        return []


def _write_table(keys, columns: dict, cluster_labels, scores, out: Path, view: _MapView, run_id):
    """embedding.parquet: each patch's position, cluster and score."""
    import pyarrow as pa

    from fpstore.store.io import write_parquet_atomic
    from fpstore.store.schema import file_metadata

    xy = columns["xy"]
    table = pa.table(
        {
            "patch_id": columns["patch_id"],
            "patient_id": columns["patient_id"],
            "slide_id": keys.column("slide_id"),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "cluster": pa.array(cluster_labels, pa.int32()),
            "score": pa.array(
                scores if scores is not None else np.full(len(xy), np.nan), pa.float32()
            ),
        }
    )
    metadata = file_metadata(
        "embedding",
        encoder=view.encoder,
        cohort=view.cohort,
        method=view.method,
        run_id=run_id or "",
    )
    return write_parquet_atomic(table, out / "embedding.parquet", metadata)


def _colour_values(name, store, cohort, keys, scores, marker, notes):
    if name == "prediction":
        if scores is None:
            notes.append("no run given or no scores: map not coloured by prediction")
        return scores
    if name == "patient":
        return keys.column("patient_id").to_pylist()
    if name == "site":
        return [s or "unknown" for s in keys.column("site").to_pylist()]
    if not marker:
        notes.append("no marker given: map not coloured by label")
        return None
    from fpstore.report.figure_data import patient_labels

    status = patient_labels(store, cohort, marker)
    return [
        {1: f"{marker}+", 0: f"{marker}-"}.get(status.get(p), "missing")
        for p in keys.column("patient_id").to_pylist()
    ]
