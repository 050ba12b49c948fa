"""`fpstore classify` and `fpstore compare` on a store: load, validate, probe, save, summarise.

Both return one JSON-able document; the predictions go to ``store/runs/<run_id>/`` and
classify's models to ``store/models/classify/<run_id>/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fpstore.classify.bags import parse_pool
from fpstore.classify.methods import (
    SAVE_MODELS,
    compare_methods,
    create_classifier,
    method_names,
    method_spec,
)
from fpstore.config import MARKERS, POOLS, SPLITS, check_choice, check_range
from fpstore.errors import ClassifyError, ConfigError
from fpstore.store.cohorts import read_cohort_document
from fpstore.store.fingerprints import cohort_encoders, partition_settings, resolve_encoder
from fpstore.store.layout import StoreLayout


def _check_patches(owner: str, patches: int | None) -> None:
    if patches is not None:
        check_range(owner, "patches", patches, 1, 10**7)


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
    patches: int | None = None  # per patient, drawn from the stored ones (None: all of them)
    save_models: str = "final"  # final | all (and the fold models) | none

    def __post_init__(self):
        check_choice("classify", "marker", self.marker, MARKERS)
        check_range("classify", "permutations", self.permutations, 0, 100_000)
        check_choice("classify", "method", self.method, method_names())
        check_choice("classify", "split", self.split, SPLITS)
        check_range("classify", "folds", self.folds, 3, 20)
        check_range("classify", "n_boot", self.n_boot, 100, 100_000)
        check_choice("classify", "save_models", self.save_models, SAVE_MODELS)
        _check_patches("classify", self.patches)
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
    methods: tuple[str, ...] = field(default_factory=compare_methods)
    encoders: tuple[str, ...] | None = None  # None: every encoder with fingerprints of the cohort
    pools: tuple[str, ...] | None = None  # None: 'all', plus the tissue pools if typed
    folds: int = 5
    split: str = "patient"
    seed: int = 0
    n_boot: int = 2000
    classifier: dict = field(default_factory=dict)  # per method: {"mil": {"max_epochs": 50}}
    patches: int | None = None  # per patient, drawn from the stored ones (None: all of them)

    def __post_init__(self):
        check_choice("compare", "marker", self.marker, MARKERS)
        check_choice("compare", "split", self.split, SPLITS)
        check_range("compare", "folds", self.folds, 3, 20)
        _check_patches("compare", self.patches)
        for m in self.methods:
            check_choice("compare", "method", m, method_names())
        for p in self.pools or ():
            parse_pool(p)
        if not self.methods:
            raise ConfigError("compare needs at least one method (--methods)")


def _reads_pixels(method: str) -> bool:
    return method_spec(method).inputs == "pixels"


def _extraction(store, encoder: str | None, cohort: str) -> dict:
    """The extraction settings of the fingerprints a run read (none for pixel methods)."""
    return {} if encoder is None else partition_settings(store, encoder, cohort)


def _images(store, cohort, bags, method):
    if not _reads_pixels(method):
        return None
    from fpstore.classify.data import cache_images

    return cache_images(store, cohort, bags)


def _probe(bags, cfg_folds: int, seed: int) -> dict:
    from fpstore.classify.leakage import site_probe

    if bags.dim == 0:
        return {"skipped": "no fingerprints (the method reads pixels)"}
    return site_probe(bags, n_folds=cfg_folds, seed=seed)


def _groups(dataset, split: str, folds: int, seed: int) -> dict:
    from fpstore.classify.protocol import assign_groups

    ids, y, sites = dataset.split_basis
    return assign_groups(ids, y, split, sites, folds, seed)


def _external_block(cohort: str, result) -> dict:
    m = result.metrics
    return {"cohort": cohort, **{k: m[k] for k in ("auc", "ci_low", "ci_high", "n")}}


def classify(store: Path, cfg: ClassifyConfig, progress: bool = True, save: bool = True) -> dict:
    """Cross-validate one method on a cohort (and test it on --external); save the run and
    the final model (trained on the whole cohort), with the fold models if asked."""
    from fpstore.classify.data import ensure_tissue_types, fingerprint_settings, load_dataset
    from fpstore.classify.models import build_card, encoder_card, save_models
    from fpstore.classify.protocol import (
        cross_validate,
        external_score,
        fit_final,
        score_range,
    )
    from fpstore.classify.runs import new_run_id, save_run

    for name in filter(None, (cfg.cohort, cfg.external)):
        read_cohort_document(store, name)  # an unknown cohort fails first, naming the known ones
    spec = method_spec(cfg.method)
    encoder = None if _reads_pixels(cfg.method) else resolve_encoder(store, cfg.cohort, cfg.encoder)
    notes = []
    if parse_pool(cfg.pool) is not None:
        for name in filter(None, (cfg.cohort, cfg.external)):
            notes.append(ensure_tissue_types(store, name, encoder, progress))
    data = load_dataset(
        store, cfg.cohort, cfg.marker, encoder, cfg.pool, patches=cfg.patches, seed=cfg.seed
    )
    groups = _groups(data, cfg.split, cfg.folds, cfg.seed)
    images = _images(store, cfg.cohort, data.bags, cfg.method)
    estimator = create_classifier(cfg.method, cfg.seed, images, **cfg.classifier)
    cv = cross_validate(
        data.bags,
        data.y,
        estimator,
        groups=groups,
        n_folds=cfg.folds,
        seed=cfg.seed,
        n_boot=cfg.n_boot,
        progress=progress,
        keep_models=save and cfg.save_models == "all",
    )
    config = {**asdict(cfg), "encoder": encoder}
    document: dict = {
        "kind": "classify",
        "config": config,
        "score_range": score_range(spec.score_range, cv.predictions),
        "data": data.summary(),
        "extraction": _extraction(store, encoder, cfg.cohort),
        "cv": cv.to_dict(),
        "classifier": cv.classifier,
        "fold_assignment": groups,
        "notes": [n for n in notes if n],
    }
    predictions = [(cfg.cohort, "test", cv.predictions)]
    final = None
    if cfg.external is not None or (save and cfg.save_models != "none"):
        final = fit_final(
            estimator, data.bags, data.y, groups=groups, n_folds=cfg.folds, seed=cfg.seed
        )
    external = None
    if cfg.external is not None:
        if final is None:  # fitted just above whenever there is an external cohort
            raise ClassifyError("no final model to test on the external cohort")
        if encoder is not None:
            resolve_encoder(store, cfg.external, encoder)
        ext_data = load_dataset(
            store, cfg.external, cfg.marker, encoder, cfg.pool, patches=cfg.patches, seed=cfg.seed
        )
        model, info = final
        if images is not None:
            model.images = _images(store, cfg.external, ext_data.bags, cfg.method)
        ext = external_score(model, info, ext_data.bags, ext_data.y, cfg.n_boot, cfg.seed)
        document["external_validation"] = {
            **ext.to_dict(),
            "data": ext_data.summary(),
            "extraction": _extraction(store, encoder, cfg.external),
        }
        predictions.append((cfg.external, "external", ext.predictions))
        external = _external_block(cfg.external, ext)
    if cfg.site_probe:
        document["site_probe"] = _probe(data.bags, cfg.folds, cfg.seed)
    if cfg.permutations:
        from fpstore.classify.permutation import permutation_test

        document["permutation"] = permutation_test(
            data.bags,
            data.y,
            cv.metrics["auc"],
            cfg.permutations,
            estimator,
            cfg.split,
            cfg.folds,
            cfg.seed,
            progress,
        )
    if save:
        run_id = new_run_id(config)
        write_model: Callable[[], object] | None = None
        if final is not None and cfg.save_models != "none":
            encoder_block = (
                None
                if encoder is None
                else encoder_card(fingerprint_settings(store, cfg.cohort, encoder), encoder)
            )
            card = build_card(
                run_id,
                config,
                data,
                encoder_block,
                *final,
                document["score_range"],
                cv.metrics,
                document.get("permutation"),
                external,
            )
            write_model = partial(save_models, store, run_id, card, final[0], cv.models)
            folder = StoreLayout.of(store).model_dir(run_id)
            document["model"] = {"model_id": run_id, "path": str(folder)}
        document["run_id"] = run_id
        document["run_path"] = str(save_run(store, run_id, document, predictions, write_model))
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
    from fpstore.classify.protocol import Entry, score_range
    from fpstore.classify.protocol import compare as run_compare
    from fpstore.classify.runs import new_run_id, save_run
    from fpstore.store.runs import write_compare

    for name in filter(None, (cfg.cohort, cfg.external)):
        read_cohort_document(store, name)
    encoders = cfg.encoders or tuple(cohort_encoders(store, cfg.cohort))
    feature_methods = [m for m in cfg.methods if not _reads_pixels(m)]
    if feature_methods and not encoders:
        raise ClassifyError(
            f"cohort {cfg.cohort!r} has no fingerprints; run `fpstore extract` first"
        )
    pools = cfg.pools or _default_pools(store, cfg.cohort)
    entries, skipped, probes, basis = [], [], {}, {}
    sources: list[tuple[str | None, str]] = [(e, m) for e in encoders for m in feature_methods]
    sources += [(None, m) for m in cfg.methods if _reads_pixels(m)]
    loaded = {}
    for encoder, method in sources:
        if encoder not in loaded:
            loaded[encoder] = [load_bags(store, cfg.cohort, encoder, tissue_required=False)]
            if cfg.external:
                loaded[encoder].append(
                    load_bags(store, cfg.external, encoder, tissue_required=False)
                )
        by_tissue = method_spec(method).by_tissue
        for pool in pools:
            tags = {"method": method, "encoder": encoder or "pixels", "pool": pool}
            name = " | ".join(tags.values())  # for display only
            if by_tissue and _pool_types(pool) < 2:
                continue  # one tissue type: the per-type mean is the plain mean
            if by_tissue and loaded[encoder][0][0].tissue is None:
                skipped.append(
                    {"name": name, "reason": "no tissue types; run `fpstore tissue predict`"}
                )
                continue
            try:
                data = load_dataset(
                    store,
                    cfg.cohort,
                    cfg.marker,
                    encoder,
                    pool,
                    *loaded[encoder][0],
                    patches=cfg.patches,
                    seed=cfg.seed,
                )
                ext = (
                    load_dataset(
                        store,
                        cfg.external,
                        cfg.marker,
                        encoder,
                        pool,
                        *loaded[encoder][1],
                        patches=cfg.patches,
                        seed=cfg.seed,
                    )
                    if cfg.external
                    else None
                )
            except ClassifyError as error:  # e.g. no patient with fat patches: say so, go on
                skipped.append({"name": name, "reason": str(error)})
                continue
            for pid, label, site in zip(*data.split_basis):
                basis[pid] = (label, site)
            images = _images(store, cfg.cohort, data.bags, method)
            entries.append(
                Entry(
                    name=name,
                    bags=data.bags,
                    y=data.y,
                    estimator=create_classifier(
                        method, cfg.seed, images, **cfg.classifier.get(method, {})
                    ),
                    test_bags=ext.bags if ext else None,
                    test_y=ext.y if ext else None,
                    test_images=_images(store, cfg.external, ext.bags, method) if ext else None,
                    tags=tags,
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
        if save:
            method = entry.tags["method"]
            # A member run's config has the shape of a classify run's (what classify would
            # have been asked to run it alone).
            member = ClassifyConfig(
                marker=cfg.marker,
                cohort=cfg.cohort,
                pool=entry.tags["pool"],
                method=method,
                external=cfg.external,
                folds=cfg.folds,
                split=cfg.split,
                seed=cfg.seed,
                n_boot=cfg.n_boot,
                site_probe=False,
                classifier=cfg.classifier.get(method, {}),
                patches=cfg.patches,
                save_models="none",
            )
            encoder = None if _reads_pixels(method) else entry.tags["encoder"]
            run_id = f"{compare_id}-{i:02d}"
            doc = {
                "kind": res.kind,
                "config": {**asdict(member), "encoder": encoder},
                "compare_id": compare_id,
                "score_range": score_range(method_spec(method).score_range, res.predictions),
                res.kind: res.to_dict(),
                "extraction": {
                    c: _extraction(store, encoder, c)
                    for c in filter(None, (cfg.cohort, cfg.external))
                },
                "classifier": res.classifier,
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
