"""`fpstore classify` and `fpstore compare` on a store: load, validate, probe, save, summarise.

Both return one JSON-able document; the predictions go to ``store/runs/<run_id>/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fpstore.classify.bags import POOLS, parse_pool
from fpstore.classify.methods import FEATURE_METHODS, METHODS
from fpstore.classify.splits import SPLITS
from fpstore.config import MARKERS, check_choice, check_range
from fpstore.errors import ClassifyError, ConfigError
from fpstore.store.cohorts import read_cohort_document
from fpstore.store.fingerprints import cohort_encoders, partition_settings, resolve_encoder

DEFAULT_COMPARE_METHODS = ("mil", "logreg", "logreg-tissue", "xgboost", "xgboost-tissue")


@dataclass(frozen=True)
class ClassifyConfig:
    marker: str
    cohort: str
    pool: str = "all"
    method: str = "mil"
    encoder: str | None = None
    external: str | None = None
    folds: int = 5
    split: str = "patient"
    seed: int = 0
    n_boot: int = 2000
    site_probe: bool = True
    permutations: int = 0  # label shuffles for a permutation test of the CV AUC (0: none)
    classifier: dict = field(default_factory=dict)  # overrides of the method's config

    def __post_init__(self):
        check_choice("classify", "marker", self.marker, MARKERS)
        check_range("classify", "permutations", self.permutations, 0, 100_000)
        check_choice("classify", "method", self.method, METHODS)
        check_choice("classify", "split", self.split, SPLITS)
        check_range("classify", "folds", self.folds, 3, 20)
        check_range("classify", "n_boot", self.n_boot, 100, 100_000)
        parse_pool(self.pool)
        if self.external is not None and self.external == self.cohort:
            raise ConfigError(
                f"--external {self.external!r} is the training cohort; name another cohort"
            )


@dataclass(frozen=True)
class CompareConfig:
    marker: str
    cohort: str
    external: str | None = None
    methods: tuple[str, ...] = DEFAULT_COMPARE_METHODS
    encoders: tuple[str, ...] | None = None  # None: every encoder with fingerprints of the cohort
    pools: tuple[str, ...] | None = None  # None: 'all', plus the tissue pools if typed
    folds: int = 5
    split: str = "patient"
    seed: int = 0
    n_boot: int = 2000
    classifier: dict = field(default_factory=dict)  # per method: {"mil": {"max_epochs": 50}}

    def __post_init__(self):
        check_choice("compare", "marker", self.marker, MARKERS)
        check_choice("compare", "split", self.split, SPLITS)
        check_range("compare", "folds", self.folds, 3, 20)
        for m in self.methods:
            check_choice("compare", "method", m, METHODS)
        for p in self.pools or ():
            parse_pool(p)
        if not self.methods:
            raise ConfigError("compare needs at least one method (--methods)")


def score_range(method: str, predictions) -> list[float]:
    """The range a run's scores live in, for heatmaps: tanh for the MIL head, probabilities
    for XGBoost and the patch CNN, symmetric around 0 for logistic-regression logits."""
    if method == "mil":
        return [-1.0, 1.0]
    if method.startswith("logreg"):
        values = [predictions.scores] + (
            [] if predictions.patch_scores is None else [predictions.patch_scores]
        )
        bound = float(max(np.abs(v).max() for v in values)) or 1.0
        return [-bound, bound]
    return [0.0, 1.0]


def _extraction(store, encoder: str | None, cohort: str) -> dict:
    """The extraction settings of the fingerprints a run read (none for pixel methods)."""
    return {} if encoder is None else partition_settings(store, encoder, cohort)


def _images(store, cohort, bags, method):
    if method != "patch-cnn":
        return None
    from fpstore.classify.data import cache_images

    return cache_images(store, cohort, bags)


def _probe(bags, cfg_folds: int, seed: int) -> dict:
    from fpstore.classify.leakage import site_probe

    if bags.dim == 0:
        return {"skipped": "no fingerprints (patch-cnn reads pixels)"}
    return site_probe(bags, n_folds=cfg_folds, seed=seed)


def _groups(dataset, split: str, folds: int, seed: int) -> dict:
    from fpstore.classify.protocol import assign_groups

    ids, y, sites = dataset.split_basis
    return assign_groups(ids, y, split, sites, folds, seed)


def classify(store: Path, cfg: ClassifyConfig, progress: bool = True, save: bool = True) -> dict:
    """Cross-validate one method on a cohort (and test it on --external); save the run."""
    from fpstore.classify.data import load_dataset
    from fpstore.classify.protocol import cross_validate, external_validate
    from fpstore.classify.runs import new_run_id, save_run

    for name in filter(None, (cfg.cohort, cfg.external)):
        read_cohort_document(store, name)  # an unknown cohort fails first, naming the known ones
    encoder = None if cfg.method == "patch-cnn" else resolve_encoder(store, cfg.cohort, cfg.encoder)
    data = load_dataset(store, cfg.cohort, cfg.marker, encoder, cfg.pool)
    groups = _groups(data, cfg.split, cfg.folds, cfg.seed)
    images = _images(store, cfg.cohort, data.bags, cfg.method)
    common = dict(
        method=cfg.method,
        groups=groups,
        n_folds=cfg.folds,
        seed=cfg.seed,
        n_boot=cfg.n_boot,
        classifier_kw=cfg.classifier,
        images=images,
    )
    cv = cross_validate(data.bags, data.y, progress=progress, **common)
    config = {**asdict(cfg), "encoder": encoder}
    document = {
        **config,
        "config": config,
        "kind": "classify",
        "score_range": score_range(cfg.method, cv.predictions),
        "data": data.summary(),
        "extraction": _extraction(store, encoder, cfg.cohort),
        "cv": cv.to_dict(),
        "classifier": cv.classifier,
        "fold_assignment": groups,
    }
    predictions = [(cfg.cohort, "test", cv.predictions)]
    if cfg.external is not None:
        if encoder is not None:
            resolve_encoder(store, cfg.external, encoder)
        ext_data = load_dataset(store, cfg.external, cfg.marker, encoder, cfg.pool)
        ext = external_validate(
            data.bags,
            data.y,
            ext_data.bags,
            ext_data.y,
            test_images=_images(store, cfg.external, ext_data.bags, cfg.method),
            **common,
        )
        document["external_validation"] = {
            **ext.to_dict(),
            "data": ext_data.summary(),
            "extraction": _extraction(store, encoder, cfg.external),
        }
        predictions.append((cfg.external, "external", ext.predictions))
    if cfg.site_probe:
        document["site_probe"] = _probe(data.bags, cfg.folds, cfg.seed)
    if cfg.permutations:
        from fpstore.classify.permutation import permutation_test

        document["permutation"] = permutation_test(
            data.bags,
            data.y,
            cv.metrics["auc"],
            cfg.permutations,
            cfg.method,
            cfg.split,
            cfg.folds,
            cfg.seed,
            cfg.classifier,
            images,
            progress,
        )
    if save:
        run_id = new_run_id(config)
        document["run_id"] = run_id
        document["run_path"] = str(save_run(store, run_id, document, predictions))
    return document


def _default_pools(store: Path, cohort: str) -> tuple[str, ...]:
    from fpstore.classify.data import load_tissue

    return POOLS if load_tissue(store, cohort) is not None else ("all",)


def _pool_types(pool: str) -> int:
    types = parse_pool(pool)
    return 3 if types is None else len(types)


def compare(store: Path, cfg: CompareConfig, progress: bool = True, save: bool = True) -> dict:
    """methods x encoders x pools on identical splits, with CIs and DeLong p-values."""
    from fpstore.classify.data import load_bags, load_dataset
    from fpstore.classify.protocol import Entry
    from fpstore.classify.protocol import compare as run_compare
    from fpstore.classify.runs import new_run_id, save_run
    from fpstore.store.runs import write_compare

    for name in filter(None, (cfg.cohort, cfg.external)):
        read_cohort_document(store, name)
    encoders = cfg.encoders or tuple(cohort_encoders(store, cfg.cohort))
    feature_methods = [m for m in cfg.methods if m in FEATURE_METHODS]
    if feature_methods and not encoders:
        raise ClassifyError(
            f"cohort {cfg.cohort!r} has no fingerprints; run `fpstore extract` first"
        )
    pools = cfg.pools or _default_pools(store, cfg.cohort)
    entries, skipped, probes, basis = [], [], {}, {}
    sources = [(e, m) for e in encoders for m in feature_methods]
    if "patch-cnn" in cfg.methods:
        sources.append((None, "patch-cnn"))
    loaded = {}
    for encoder, method in sources:
        if encoder not in loaded:
            loaded[encoder] = [load_bags(store, cfg.cohort, encoder, tissue_required=False)]
            if cfg.external:
                loaded[encoder].append(
                    load_bags(store, cfg.external, encoder, tissue_required=False)
                )
        for pool in pools:
            name = f"{method} | {encoder or 'pixels'} | {pool}"
            if method.endswith("-tissue") and _pool_types(pool) < 2:
                continue  # one tissue type: the per-type mean is the plain mean
            if method.endswith("-tissue") and loaded[encoder][0][0].tissue is None:
                skipped.append(
                    {"name": name, "reason": "no tissue types; run `fpstore tissue predict`"}
                )
                continue
            try:
                data = load_dataset(
                    store, cfg.cohort, cfg.marker, encoder, pool, *loaded[encoder][0]
                )
                ext = (
                    load_dataset(
                        store, cfg.external, cfg.marker, encoder, pool, *loaded[encoder][1]
                    )
                    if cfg.external
                    else None
                )
            except ClassifyError as error:  # e.g. no patient with fat patches: say so, go on
                skipped.append({"name": name, "reason": str(error)})
                continue
            for pid, label, site in zip(*data.split_basis):
                basis[pid] = (label, site)
            entries.append(
                Entry(
                    name=name,
                    bags=data.bags,
                    y=data.y,
                    method=method,
                    test_bags=ext.bags if ext else None,
                    test_y=ext.y if ext else None,
                    classifier_kw=cfg.classifier.get(method),
                    images=_images(store, cfg.cohort, data.bags, method),
                    test_images=_images(store, cfg.external, ext.bags, method) if ext else None,
                )
            )
            if pool == "all" and encoder is not None and encoder not in probes:
                probes[encoder] = _probe(data.bags, cfg.folds, cfg.seed)
    if not entries:
        raise ClassifyError(
            f"nothing to compare: {'; '.join(s['reason'] for s in skipped) or 'no entries'}"
        )
    from fpstore.classify.protocol import assign_groups

    ids = sorted(basis)
    groups = assign_groups(
        ids,
        [basis[p][0] for p in ids],
        cfg.split,
        np.array([basis[p][1] for p in ids], dtype=object),
        cfg.folds,
        cfg.seed,
    )
    result = run_compare(
        entries,
        n_folds=cfg.folds,
        split=cfg.split,
        seed=cfg.seed,
        n_boot=cfg.n_boot,
        progress=progress,
        groups=groups,
    )
    config = {**asdict(cfg), "encoders": list(encoders), "pools": list(pools)}
    compare_id = new_run_id({**config, "method": "compare"})
    for i, (row, entry, res) in enumerate(zip(result["rows"], entries, result["results"])):
        method, encoder, pool = entry.name.split(" | ")
        row.update({"encoder": encoder, "pool": pool})
        if save:
            run_config = {
                "marker": cfg.marker,
                "cohort": cfg.cohort,
                "external": cfg.external,
                "method": method,
                "encoder": None if encoder == "pixels" else encoder,
                "pool": pool,
                "folds": cfg.folds,
                "split": cfg.split,
                "seed": cfg.seed,
                "n_boot": cfg.n_boot,
                "classifier": res.classifier,
            }
            run_id = f"{compare_id}-{i:02d}"
            doc = {
                **run_config,
                "config": run_config,
                "kind": res.kind,
                "compare_id": compare_id,
                "score_range": score_range(method, res.predictions),
                res.kind: res.to_dict(),
                "extraction": {
                    c: _extraction(store, run_config["encoder"], c)
                    for c in filter(None, (cfg.cohort, cfg.external))
                },
                "fold_assignment": result["groups"],
            }
            block = (cfg.external or cfg.cohort, "external" if res.kind == "external" else "test")
            save_run(store, run_id, doc, [(*block, res.predictions)])
            row["run_id"] = run_id
    document = {
        "kind": "compare",
        "compare_id": compare_id,
        "config": config,
        "evaluated_on": cfg.external or f"{cfg.cohort} ({cfg.folds}-fold CV)",
        "rows": result["rows"],
        "names": result["names"],
        "pairwise_p": result["pairwise_p"],
        "site_probe": probes,
        "skipped": skipped,
    }
    if save:
        write_compare(store, compare_id, document)
    return document
