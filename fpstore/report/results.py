"""The results table: external (or CV) AUCs with CIs from stored comparisons, with DeLong's
test between encoders.

One row per marker, method, encoder and pool of a comparison (`fpstore compare`, what the demo
runs); ``p_vs_encoder`` is DeLong's p of the row against the same method and pool with the
comparison's first encoder (``vs_encoder``), on the patients both scored. The demo prints these
rows and the HTML report opens with them.
"""

from __future__ import annotations

COLUMNS = (
    "marker",
    "method",
    "encoder",
    "pool",
    "evaluated_on",
    "n",
    "auc",
    "ci_low",
    "ci_high",
    "vs_encoder",
    "p_vs_encoder",
)


def results_rows(documents, pools: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of compare documents (only ``pools`` when given), in each document's order."""
    rows = []
    for document in documents:
        marker = document["config"]["marker"]
        encoders = document["config"]["encoders"]
        names = document["names"]
        p = document["pairwise_p"]
        first = encoders[0] if encoders else None
        index = {
            (r.get("method"), r.get("encoder"), r.get("pool")): i
            for i, r in enumerate(document["rows"])
        }
        for i, row in enumerate(document["rows"]):
            if pools and row.get("pool") not in pools:
                continue
            out = {"marker": marker, **{k: row.get(k) for k in COLUMNS if k in row}}
            out["evaluated_on"] = document.get("evaluated_on")
            j = index.get((row.get("method"), first, row.get("pool")))
            if row.get("encoder") not in (first, "pixels") and j is not None and j < len(names):
                out["vs_encoder"], out["p_vs_encoder"] = first, p[i][j]
            rows.append(out)
    return rows


def stored_results(store, cohort: str, pools: tuple[str, ...] | None = None) -> list[dict]:
    """``results_rows`` of the latest comparison per marker and evaluation cohort among the
    store's comparisons trained on ``cohort``."""
    from fpstore.store.runs import list_compares

    latest: dict[tuple, dict] = {}
    for document in list_compares(store):  # oldest first: a later one replaces it
        config = document.get("config", {})
        if config.get("cohort") == cohort and "rows" in document:
            latest[(config.get("marker"), document.get("evaluated_on"))] = document
    return results_rows(list(latest.values()), pools)
