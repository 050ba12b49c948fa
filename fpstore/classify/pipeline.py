"""`fpstore classify` and `fpstore compare` on a store: load, validate, probe, save, summarise.

Both return one JSON-able document; the predictions go to ``store/runs/<run_id>/`` and
classify's models to ``store/models/classify/<run_id>/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
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
from fpstore.classify.settings import PERMUTATIONS_RANGE, CohortRunConfig, CVProtocol
from fpstore.config import POOLS, check_choice, check_range
from fpstore.errors import ClassifyError, ConfigError
from fpstore.store.cohorts import read_cohort_document
from fpstore.store.fingerprints import cohort_encoders, partition_settings, resolve_encoder
from fpstore.store.layout import StoreLayout


@dataclass(frozen=True)
class ClassifyConfig(CohortRunConfig):
    """`fpstore classify`: one method cross-validated on ``cohort`` (``classifier``: overrides
    of the method's config)."""

    pool: str = "all"
    method: str = "mil"
    encoder: str | None = None
    site_probe: bool = True
    permutations: int = 0  # label shuffles for a permutation test of the CV AUC (0: none)
    save_models: str = "final"  # final | all (and the fold models) | none

    def __post_init__(self):
        super().__post_init__()
        check_range("classify", "permutations", self.permutations, *PERMUTATIONS_RANGE)
        check_choice("classify", "method", self.method, method_names())
        check_choice("classify", "save_models", self.save_models, SAVE_MODELS)
        parse_pool(self.pool)

    @property
    def protocol(self) -> CVProtocol:
        return replace(super().protocol, permutations=self.permutations)


@dataclass(frozen=True)
class CompareConfig(CohortRunConfig):
    """`fpstore compare`: methods x encoders x pools on identical splits (``classifier``: per
    method, e.g. {"mil": {"max_epochs": 50}})."""

    methods: tuple[str, ...] = field(default_factory=compare_methods)
    encoders: tuple[str, ...] | None = None  # None: every encoder with fingerprints of the cohort
    pools: tuple[str, ...] | None = None  # None: 'all', plus the tissue pools if typed

    def __post_init__(self):
        super().__post_init__()
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


def _probe(bags, protocol: CVProtocol) -> dict:
    from fpstore.classify.leakage import site_probe

    if bags.dim == 0:
        return {"skipped": "no fingerprints (the method reads pixels)"}
    return site_probe(bags, n_folds=protocol.folds, seed=protocol.seed)


def _groups(split_basis, protocol: CVProtocol) -> dict:
    """patient_id -> group from (patient ids, labels, sites)."""
    from fpstore.classify.protocol import assign_groups

    ids, y, sites = split_basis
    return assign_groups(ids, y, protocol.split, sites, protocol.folds, protocol.seed)


def _external_block(cohort: str, result) -> dict:
    m = result.metrics
    return {"cohort": cohort, **{k: m[k] for k in ("auc", "ci_low", "ci_high", "n")}}


def _load(store: Path, cfg: CohortRunConfig, cohort: str, encoder, pool: str, loaded=(None, None)):
    """A cohort's Dataset for this run (``loaded``: its bags and counts, if read already)."""
    from fpstore.classify.data import load_dataset

    bags, counts = loaded
    return load_dataset(
        store, cohort, cfg.marker, encoder, pool, bags, counts, patches=cfg.patches, seed=cfg.seed
    )


def classify(store: Path, cfg: ClassifyConfig, progress: bool = True, save: bool = True) -> dict:
    """Cross-validate one method on a cohort (and test it on --external); save the run and
    the final model (trained on the whole cohort), with the fold models if asked."""
    from fpstore.classify.protocol import cross_validate, fit_final, score_range

    for name in cfg.cohorts:
        read_cohort_document(store, name)  # an unknown cohort fails first, naming the known ones
    encoder = None if _reads_pixels(cfg.method) else resolve_encoder(store, cfg.cohort, cfg.encoder)
    notes, typing = _tissue_notes(store, cfg, encoder, progress)
    data = _load(store, cfg, cfg.cohort, encoder, cfg.pool)
    protocol = cfg.protocol.with_groups(_groups(data.split_basis, cfg.protocol))
    images = _images(store, cfg.cohort, data.bags, cfg.method)
    estimator = create_classifier(cfg.method, cfg.seed, images, **cfg.classifier)
    keep_folds = save and cfg.save_models == "all"
    cv = cross_validate(data.bags, data.y, estimator, protocol, progress, keep_folds)
    config = {**asdict(cfg), "encoder": encoder}
    document: dict = {
        "kind": "classify",
        "config": config,
        "score_range": score_range(method_spec(cfg.method).score_range, cv.predictions),
        "data": data.summary(),
        "extraction": _extraction(store, encoder, cfg.cohort),
        "cv": cv.to_dict(),
        "classifier": cv.classifier,
        "fold_assignment": protocol.groups,
        "notes": [n for n in notes if n],
        "tissue_typing": typing,  # which method typed the pooled patches, what to expect
    }
    predictions = [(cfg.cohort, "test", cv.predictions)]
    final = None
    if cfg.external is not None or (save and cfg.save_models != "none"):
        final = fit_final(estimator, data.bags, data.y, protocol)
    external = None
    if cfg.external is not None:
        external = _validate_external(
            store, cfg, cfg.external, encoder, final, document, predictions
        )
    if cfg.site_probe:
        document["site_probe"] = _probe(data.bags, protocol)
    if cfg.permutations:
        from fpstore.classify.permutation import permutation_test

        document["permutation"] = permutation_test(
            data.bags, data.y, cv.metrics["auc"], estimator, protocol, progress
        )
    if save:
        _save_classify(store, cfg, document, data, final, cv.models, external, predictions)
    return document


def _tissue_notes(store: Path, cfg: ClassifyConfig, encoder, progress: bool):
    """(notes, typing records): tissue types a pool needs, computed where the store can (what
    was done, per cohort), and which method typed each cohort with what to expect of it."""
    from fpstore.classify.data import ensure_tissue_types
    from fpstore.tissue.type_patches import typing_record

    if parse_pool(cfg.pool) is None:
        return [], []
    notes = [ensure_tissue_types(store, name, encoder, progress) for name in cfg.cohorts]
    return notes, [typing_record(store, name) for name in cfg.cohorts]


def _validate_external(
    store, cfg: ClassifyConfig, cohort: str, encoder, final, document, predictions
):
    """The final model tested once on ``cohort`` (``cfg.external``): its block goes into ``document``, its
    predictions onto ``predictions``; returns the model card's external block."""
    from fpstore.classify.protocol import external_score

    if final is None:  # fitted whenever there is an external cohort
        raise ClassifyError("no final model to test on the external cohort")
    if encoder is not None:
        resolve_encoder(store, cohort, encoder)
    ext_data = _load(store, cfg, cohort, encoder, cfg.pool)
    model, info = final
    if _reads_pixels(cfg.method):
        model.images = _images(store, cohort, ext_data.bags, cfg.method)
    ext = external_score(model, info, ext_data.bags, ext_data.y, cfg.protocol)
    document["external_validation"] = {
        **ext.to_dict(),
        "data": ext_data.summary(),
        "extraction": _extraction(store, encoder, cohort),
    }
    predictions.append((cohort, "external", ext.predictions))
    return _external_block(cohort, ext)


def _save_classify(
    store, cfg: ClassifyConfig, document, data, final, fold_models, external, predictions
) -> None:
    """Save the run (and its models, unless --save-models none); their ids go into
    ``document``."""
    from fpstore.classify.data import fingerprint_settings
    from fpstore.classify.save_run import new_run_id, save_run
    from fpstore.classify.saved_models import build_card, encoder_card, save_models

    config = document["config"]
    encoder = config["encoder"]
    run_id = new_run_id(config)
    write_model: Callable[[], object] | None = None
    if final is not None and cfg.save_models != "none":
        encoder_block = (
            None
            if encoder is None
            else encoder_card(fingerprint_settings(store, cfg.cohort, encoder), encoder)
        )
        card = build_card(run_id, document, data, encoder_block, final, external)
        # written inside the run's commit, before it: a model is listed only once its run is
        write_model = partial(save_models, store, run_id, card, final[0], fold_models)
        folder = StoreLayout.of(store).model_dir(run_id)
        document["model"] = {"model_id": run_id, "path": str(folder)}
    document["run_id"] = run_id
    document["run_path"] = str(save_run(store, run_id, document, predictions, write_model))


def _default_pools(store: Path, cohort: str) -> tuple[str, ...]:
    from fpstore.classify.data import load_tissue

    return POOLS if load_tissue(store, cohort) is not None else ("all",)


def _pool_types(pool: str) -> int:
    types = parse_pool(pool)
    return 3 if types is None else len(types)


def compare(store: Path, cfg: CompareConfig, progress: bool = True, save: bool = True) -> dict:
    """methods x encoders x pools on identical splits, with CIs and DeLong p-values."""
    from fpstore.classify.protocol import validate_entries
    from fpstore.classify.save_run import new_run_id
    from fpstore.store.runs import write_compare

    for name in cfg.cohorts:
        read_cohort_document(store, name)
    encoders = cfg.encoders or tuple(cohort_encoders(store, cfg.cohort))
    if any(not _reads_pixels(m) for m in cfg.methods) and not encoders:
        raise ClassifyError(
            f"cohort {cfg.cohort!r} has no fingerprints; run `fpstore extract` first"
        )
    notes = []
    if any(parse_pool(p) is not None for p in cfg.pools or ()):  # tissue pools asked for
        from fpstore.classify.data import ensure_tissue_types

        for name in filter(None, (cfg.cohort, cfg.external)):
            notes.append(ensure_tissue_types(store, name, (encoders or (None,))[0], progress))
    pools = cfg.pools or _default_pools(store, cfg.cohort)
    built = _Entries(store, cfg)
    for encoder, method in _sources(cfg.methods, encoders):
        for pool in pools:
            built.add(encoder, method, pool)
    if not built.entries:
        reasons = "; ".join(s["reason"] for s in built.skipped) or "no entries"
        raise ClassifyError(f"nothing to compare: {reasons}")
    ids = sorted(built.basis)
    basis = ([*ids], [built.basis[p][0] for p in ids], _object_array(built.basis, ids))
    protocol = cfg.protocol.with_groups(_groups(basis, cfg.protocol))
    result = validate_entries(built.entries, protocol, progress)
    config = {**asdict(cfg), "encoders": list(encoders), "pools": list(pools)}
    compare_id = new_run_id({**config, "method": "compare"})
    if save:
        for i, (row, entry, res) in enumerate(
            zip(result["rows"], built.entries, result["results"])
        ):
            row["run_id"] = _save_member(store, cfg, (compare_id, i), entry, res, result["groups"])
    document = {
        "kind": "compare",
        "compare_id": compare_id,
        "config": config,
        "evaluated_on": cfg.external or f"{cfg.cohort} ({cfg.folds}-fold CV)",
        "rows": result["rows"],
        "names": result["names"],
        "pairwise_p": result["pairwise_p"],
        "site_probe": built.probes,
        "skipped": built.skipped,
        "notes": [n for n in notes if n],
    }
    if save:
        write_compare(store, compare_id, document)
    return document


def _sources(methods, encoders) -> list[tuple[str | None, str]]:
    """(encoder, method) pairs: feature methods on every encoder, then pixel methods once."""
    feature_methods = [m for m in methods if not _reads_pixels(m)]
    sources: list[tuple[str | None, str]] = [(e, m) for e in encoders for m in feature_methods]
    return sources + [(None, m) for m in methods if _reads_pixels(m)]


def _object_array(basis: dict, ids: list) -> np.ndarray:
    return np.array([basis[p][1] for p in ids], dtype=object)


class _Entries:
    """A comparison's entries as they are built: each encoder's bags read once, the entries
    that cannot run skipped with their reason, the patients' (label, site) gathered for one
    set of groups, and a site probe per encoder."""

    def __init__(self, store: Path, cfg: CompareConfig):
        self.store, self.cfg = store, cfg
        self.entries: list = []
        self.skipped: list[dict] = []
        self.probes: dict = {}
        self.basis: dict = {}
        self._loaded: dict = {}

    def _bags(self, encoder: str | None) -> list:
        from fpstore.classify.data import load_bags

        if encoder not in self._loaded:
            cohorts = self.cfg.cohorts
            self._loaded[encoder] = [
                load_bags(self.store, c, encoder, tissue_required=False) for c in cohorts
            ]
        return self._loaded[encoder]

    def add(self, encoder: str | None, method: str, pool: str) -> None:
        from fpstore.classify.protocol import Entry

        cfg, store = self.cfg, self.store
        loaded = self._bags(encoder)
        by_tissue = method_spec(method).by_tissue
        tags = {"method": method, "encoder": encoder or "pixels", "pool": pool}
        name = " | ".join(tags.values())  # for display only
        if by_tissue and _pool_types(pool) < 2:
            return  # one tissue type: the per-type mean is the plain mean
        if by_tissue and loaded[0][0].tissue is None:
            reason = "no tissue types; run `fpstore tissue predict`"
            self.skipped.append({"name": name, "reason": reason})
            return
        try:
            data = _load(store, cfg, cfg.cohort, encoder, pool, loaded[0])
            ext = (
                _load(store, cfg, cfg.external, encoder, pool, loaded[1]) if cfg.external else None
            )
        except ClassifyError as error:  # e.g. no patient with fat patches: say so, go on
            self.skipped.append({"name": name, "reason": str(error)})
            return
        for pid, label, site in zip(*data.split_basis):
            self.basis[pid] = (label, site)
        images = _images(store, cfg.cohort, data.bags, method)
        self.entries.append(
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
        if pool == "all" and encoder is not None and encoder not in self.probes:
            self.probes[encoder] = _probe(data.bags, cfg.protocol)


def _save_member(store: Path, cfg: CompareConfig, member_of, entry, res, groups) -> str:
    """Save entry ``i`` of comparison ``compare_id`` (``member_of``) as a run, its config
    shaped as a classify run's (what classify would have been asked to run it alone)."""
    from fpstore.classify.protocol import score_range
    from fpstore.classify.save_run import save_run

    method = entry.tags["method"]
    shared = {f.name: getattr(cfg, f.name) for f in fields(CohortRunConfig)}
    member = ClassifyConfig(
        **{**shared, "classifier": cfg.classifier.get(method, {})},
        pool=entry.tags["pool"],
        method=method,
        site_probe=False,
        save_models="none",
    )
    encoder = None if _reads_pixels(method) else entry.tags["encoder"]
    compare_id, i = member_of
    run_id = f"{compare_id}-{i:02d}"
    doc = {
        "kind": res.kind,
        "config": {**asdict(member), "encoder": encoder},
        "compare_id": compare_id,
        "score_range": score_range(method_spec(method).score_range, res.predictions),
        res.kind: res.to_dict(),
        "extraction": {c: _extraction(store, encoder, c) for c in cfg.cohorts},
        "classifier": res.classifier,
        "fold_assignment": groups,
    }
    block = (cfg.external or cfg.cohort, "external" if res.kind == "external" else "test")
    save_run(store, run_id, doc, [(*block, res.predictions)])
    return run_id
