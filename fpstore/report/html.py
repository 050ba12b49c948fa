"""One static HTML page per run: cohort summary, compare table, ROC curves, heatmaps, embedding.

``build_report`` writes ``OUT/index.html`` and the figures it shows under ``OUT/figures``,
linked by relative paths, so the folder opens in any browser without a server and can be
copied or zipped whole. A part that cannot be drawn (a slide file gone, no fingerprints)
is reported in the page's notes and the rest is still written.
"""

from __future__ import annotations

import datetime
import html
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fpstore.config import MARKERS, check_range
from fpstore.errors import FpstoreError
from fpstore.report.embed import ClusterConfig, EmbedConfig, EmbeddingResult
from fpstore.report.results import COLUMNS as RESULT_COLUMNS
from fpstore.report.results import stored_results
from fpstore.store.cohorts import read_cohort
from fpstore.store.io import remove_dead_temporaries_in, write_text_atomic

# The report's map: a subset keeps a 1,000-patient cohort's page to a minute or so.
REPORT_EMBED = EmbedConfig(max_points=20_000)
REPORT_CLUSTERS = ClusterConfig()
CATEGORIES = ("true positive", "true negative", "false positive", "false negative")
# A predicted patient without a clinical label (a `predict` run on unlabelled slides).
UNLABELLED = ("predicted positive, no label", "predicted negative, no label")


@dataclass
class ReportResult:
    out: Path
    index: Path
    run_id: str
    n_figures: int
    heatmaps: list[str]  # slide ids
    embedding: EmbeddingResult | None
    notes: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "index": str(self.index),
            "run_id": self.run_id,
            "n_figures": self.n_figures,
            "heatmaps": self.heatmaps,
            "embedding": self.embedding.to_dict() if self.embedding else None,
            "notes": self.notes,
            "seconds": self.seconds,
        }


def cohort_summary_rows(store: Path, cohort: str) -> list[dict]:
    """Patients, slides and per-marker positive / negative / missing counts of a cohort."""
    registered = read_cohort(store, cohort)
    slides = registered.slides
    labels = registered.labels.to_pylist()
    patients = {row["patient_id"] for row in labels}
    rows = [
        {"item": "patients (clinical table)", "value": len(patients)},
        {"item": "slides", "value": slides.num_rows},
        {
            "item": "patients with slides",
            "value": len({p for p in slides.column("patient_id").to_pylist() if p}),
        },
    ]
    for marker in MARKERS:
        status = [row["status"] for row in labels if row["marker"] == marker]
        if status:
            rows.append(
                {
                    "item": f"{marker} positive / negative / missing",
                    "value": f"{status.count(1)} / {status.count(0)} / {status.count(None)}",
                }
            )
    return rows


def compare_rows(store: Path, run, n_boot: int = 1000) -> list[dict]:
    """Every stored run of the same marker that scored patients of ``run``'s cohorts (a
    classify run's CV and external cohorts, a predict run's cohort), or that ran on ``run``'s
    cohort (a comparison's members, tested on an external cohort included): AUC (CI) per role
    and scored cohort, DeLong p vs ``run`` on the patients both scored."""
    import pyarrow.compute as pc

    from fpstore.classify.metrics import delong_test, summarize
    from fpstore.store.runs import list_runs, load_run

    scored_cohorts = run.patients.column("cohort").unique()

    def scores_by_role(r):
        table = r.patients
        table = table.filter(table.column("label").is_valid())  # AUCs need labels
        if r.cohort != run.cohort:
            table = table.filter(pc.is_in(table.column("cohort"), value_set=scored_cohorts))
        out = {}
        keys = zip(table.column("role").to_pylist(), table.column("cohort").to_pylist())
        for role, cohort in set(keys):
            part = table.filter(
                pc.and_(
                    pc.equal(table.column("role"), role), pc.equal(table.column("cohort"), cohort)
                )
            )
            out[(role, cohort)] = dict(
                zip(
                    part.column("patient_id").to_pylist(),
                    zip(
                        (part.column("label").to_numpy() > 0).astype(int).tolist(),
                        part.column("score").to_numpy().astype(float).tolist(),
                    ),
                )
            )
        return out

    # Patient ids are unique across a run's roles (an external cohort is disjoint).
    mine = {p: v for by_patient in scores_by_role(run).values() for p, v in by_patient.items()}
    rows = []
    for run_id in list_runs(store):
        try:
            other = run if run_id == run.run_id else load_run(store, run_id)
        except FpstoreError as error:  # e.g. a run an older fpstore wrote
            rows.append({"run": run_id, "note": str(error)})
            continue
        if other.marker != run.marker:
            continue
        for (role, cohort), by_patient in sorted(scores_by_role(other).items()):
            y = np.array([v[0] for v in by_patient.values()])
            s = np.array([v[1] for v in by_patient.values()])
            row = {
                "run": run_id,
                "method": other.method,
                "encoder": other.encoder,
                "pool": other.pool,
                "role": role,
                "cohort": cohort,
            }
            try:
                row.update(summarize(y, s, n_boot=n_boot))
            except FpstoreError as error:
                row["note"] = str(error)
                rows.append(row)
                continue
            shared = sorted(set(by_patient) & set(mine))
            if run_id != run.run_id and len(shared) >= 4:
                ys = np.array([mine[p][0] for p in shared])
                try:
                    row["p_vs_this_run"] = delong_test(
                        ys, [mine[p][1] for p in shared], [by_patient[p][1] for p in shared]
                    )["p"]
                except FpstoreError as error:
                    row["note"] = str(error)
            rows.append(row)
    return rows


def pick_examples(store: Path, run, n: int) -> list[tuple[str, str, str, float]]:
    """(category, patient, slide, score): the most confident TP, TN, FP and FN first (Fig. 6c)."""
    scored = set(run.slides_with_patch_scores())
    slides_of: dict[str, list[str]] = {}
    for cohort in set(run.patients.column("cohort").to_pylist()):
        for row in read_cohort(store, cohort).slides.to_pylist():
            if row["slide_id"] in scored and row["patient_id"]:
                slides_of.setdefault(row["patient_id"], []).append(row["slide_id"])
    lo, hi = run.score_range
    mid = (lo + hi) / 2
    rows = [p for p in run.patients.to_pylist() if p["patient_id"] in slides_of]
    patients = [p for p in rows if p["label"] is not None]
    unlabelled = [p for p in rows if p["label"] is None]
    queues = {
        "true positive": sorted(
            (p for p in patients if p["label"] > 0 and p["score"] >= mid), key=lambda p: -p["score"]
        ),
        "true negative": sorted(
            (p for p in patients if p["label"] <= 0 and p["score"] < mid), key=lambda p: p["score"]
        ),
        "false positive": sorted(
            (p for p in patients if p["label"] <= 0 and p["score"] >= mid),
            key=lambda p: -p["score"],
        ),
        "false negative": sorted(
            (p for p in patients if p["label"] > 0 and p["score"] < mid), key=lambda p: p["score"]
        ),
        UNLABELLED[0]: sorted(
            (p for p in unlabelled if p["score"] >= mid), key=lambda p: -p["score"]
        ),
        UNLABELLED[1]: sorted(
            (p for p in unlabelled if p["score"] < mid), key=lambda p: p["score"]
        ),
    }
    picked = []
    while len(picked) < n and any(queues.values()):
        for category in CATEGORIES + UNLABELLED:
            if queues[category] and len(picked) < n:
                p = queues[category].pop(0)
                picked.append(
                    (category, p["patient_id"], min(slides_of[p["patient_id"]]), p["score"])
                )
    return picked


COMPARE_COLUMNS = [
    "run",
    "method",
    "encoder",
    "pool",
    "role",
    "cohort",
    "n",
    "n_pos",
    "n_neg",
    "auc",
    "ci_low",
    "ci_high",
    "p_vs_this_run",
    "note",
]


@dataclass
class _Report:
    """A report as it is built: the run, where its figures go, and the sections, notes and
    seconds per part so far."""

    store: Path
    run: Any
    out: Path
    sections: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    @contextmanager
    def timed(self, part: str):
        start = time.perf_counter()
        yield
        self.seconds[part] = time.perf_counter() - start


def build_report(
    store: Path,
    run_id: str,
    out: Path,
    n_heatmaps: int = 4,
    heatmap_px: int = 768,
    embed: EmbedConfig | None = REPORT_EMBED,
    clusters: ClusterConfig = REPORT_CLUSTERS,
    n_boot: int = 1000,
) -> ReportResult:
    """Write OUT/index.html and OUT/figures/* for run ``run_id``; ``embed=None`` skips the map."""
    from fpstore.store.runs import load_run

    check_range("build_report", "n_heatmaps", n_heatmaps, 0, 100)
    check_range("build_report", "n_boot", n_boot, 10)
    run = load_run(store, run_id)
    out = Path(out)
    report = _Report(store, run, out, [_header(run)])
    figures = report.figures
    figures.mkdir(parents=True, exist_ok=True)
    for folder in (out, *(p for p in figures.rglob("*") if p.is_dir()), figures):
        remove_dead_temporaries_in(folder)  # what a killed report left
    with report.timed("tables"):
        _add_tables(report, n_boot)
    with report.timed("roc"):
        _add_roc(report, n_boot)
    with report.timed("heatmaps"):
        shown = _add_heatmaps(report, n_heatmaps, heatmap_px)
    with report.timed("embedding"):
        embedding = None if embed is None else _add_embedding(report, embed, clusters)
    notes, sections, seconds = report.notes, report.sections, report.seconds
    if notes:
        sections.append(
            _section("Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
        )
    index = out / "index.html"
    write_text_atomic(_page(f"fpstore report: run {run_id}", "\n".join(sections)), index)
    n_figures = len(list(figures.rglob("*.png")))
    return ReportResult(out, index, run_id, n_figures, shown, embedding, notes, seconds)


def _add_tables(report: _Report, n_boot: int) -> None:
    store, run = report.store, report.run
    trained_on = run.config.get("trained_on") or run.cohort
    results = stored_results(store, trained_on)
    if results:  # the report opens with the results table the demo prints
        report.sections.append(
            _section(
                f"Results: stored comparisons on {trained_on}",
                _table(results, list(RESULT_COLUMNS)),
                "Per marker, the latest `fpstore compare` on the cohort: AUC per patient on the "
                "cohort it was evaluated on, with a 95% bootstrap CI; p_vs_encoder: DeLong's "
                "test against the same method and pool with the comparison's first encoder "
                "(vs_encoder).",
            )
        )
    report.sections.append(
        _section("Cohort", _table(cohort_summary_rows(store, run.cohort), ["item", "value"]))
    )
    report.sections.append(
        _section(
            f"Compare: every stored {run.marker or ''} run on {run.cohort}",
            _table(compare_rows(store, run, n_boot), COMPARE_COLUMNS),
            "AUC per patient with a 95% bootstrap CI; "
            "p: DeLong's test against this run on shared patients.",
        )
    )


def _add_roc(report: _Report, n_boot: int) -> None:
    from fpstore.report.roc import plot_roc, run_roc_curves

    run = report.run
    curves = run_roc_curves(run, n_boot=n_boot)
    if not curves:
        report.notes.append("no role of this run has both classes: no ROC curve")
        return
    title = f"{run.marker or ''} {run.method or ''} run {run.run_id}"
    roc = plot_roc(curves, report.figures / "roc.png", title)
    caption = "ROC curves with 95% bootstrap bands"
    report.sections.append(
        _section("ROC curves", _figure(roc, report.out, caption, [c.legend() for c in curves]))
    )


def _add_heatmaps(report: _Report, n_heatmaps: int, heatmap_px: int) -> list[str]:
    """Heatmaps of up to ``n_heatmaps`` example slides; returns the slides shown."""
    from fpstore.report.heatmap import slide_heatmap

    shown, blocks = [], []
    run_id = report.run.run_id
    for category, patient, slide_id, score in pick_examples(report.store, report.run, n_heatmaps):
        try:
            result = slide_heatmap(
                report.store, run_id, slide_id, report.figures / "heatmaps", heatmap_px
            )
        except FpstoreError as error:
            report.notes.append(f"heatmap of {slide_id}: {error}")
            continue
        shown.append(slide_id)
        report.notes += result.notes
        caption = (
            f"{category}: patient {patient}, slide {slide_id}, score {score:.3f} "
            f"({result.n_patches} patches)"
        )
        links = {"GeoJSON (QuPath)": result.geojson}
        blocks.append(_figure(result.figure, report.out, caption, links=links))
    if blocks:
        report.sections.append(
            _section(
                "Heatmaps",
                "\n".join(blocks),
                "H&E thumbnail, tissue type and prediction (black = negative, white = "
                "positive); for an attention head (abmil), where it looked (viridis).",
            )
        )
    elif n_heatmaps:
        report.notes.append(
            "no slide of this run has patch scores with a readable slide: no heatmaps"
        )
    return shown


def _add_embedding(report: _Report, embed: EmbedConfig, clusters: ClusterConfig):
    """The cohort's fingerprint map (None, with a note, where it cannot be drawn)."""
    from fpstore.report.embed import embed_cohort

    run = report.run
    try:
        embedding = embed_cohort(
            report.store,
            run.cohort,
            report.figures / "embedding",
            run_id=run.run_id,
            config=embed,
            clusters=clusters,
        )
    except FpstoreError as error:
        report.notes.append(f"embedding: {error}")
        return None
    report.notes += embedding.notes
    report.sections.append(
        _section(
            f"Fingerprint map ({embedding.method}, {embedding.n_points} patches, "
            f"{embedding.n_patients} patients)",
            _embedding_html(embedding, report.out),
        )
    )
    return embedding


# -- HTML pieces (every value escaped) --


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _rel(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve()).as_posix()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return _e(value)


def _table(rows: list[dict], columns: list[str]) -> str:
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(path: Path, out: Path, caption: str, lines=(), links: dict | None = None) -> str:
    extra = "".join(f"<br>{_e(line)}" for line in lines)
    extra += "".join(
        f' <a href="{_e(_rel(p, out))}">{_e(name)}</a>' for name, p in (links or {}).items() if p
    )
    return (
        f'<figure><img src="{_e(_rel(path, out))}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}{extra}</figcaption></figure>"
    )


def _section(title: str, body: str, intro: str = "") -> str:
    intro_html = f"<p>{_e(intro)}</p>" if intro else ""
    return f"<section><h2>{_e(title)}</h2>{intro_html}{body}</section>"


def _header(run) -> str:
    facts = {
        "run": run.run_id,
        "kind": run.kind,
        "marker": run.marker,
        "method": run.method,
        "encoder": run.encoder,
        "pool": run.pool,
        "cohort": run.cohort,
        "model": run.config.get("model"),
        "trained on": run.config.get("trained_on"),
        "score range": run.score_range,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items() if v is not None)
    return f"<header><h1>fpstore report: run {_e(run.run_id)}</h1><dl>{items}</dl></header>"


def _embedding_html(result: EmbeddingResult, out: Path) -> str:
    parts = [_figure(p, out, f"coloured by {name}") for name, p in result.figures.items()]
    rows = []
    for cluster, montage in zip(result.clusters, result.montages):
        rows.append(
            f"<tr><td>{cluster.number}</td><td>{_e(cluster.sign)}</td><td>{cluster.mean_score:.3f}</td>"
            f'<td>{cluster.size}</td><td><img class="montage" src="{_e(_rel(montage, out))}" '
            f'alt="cluster {cluster.number}"></td></tr>'
        )
    if rows:
        parts.append(
            "<h3>Clusters strongly predicted negative or positive</h3><p>The patches nearest "
            "each cluster's centre, each from a different patient.</p><table><thead><tr><th>#</th>"
            "<th>sign</th><th>mean score (scaled to [-1, 1])</th><th>patches</th><th>montage</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        )
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; } img.montage { height: 96px; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
