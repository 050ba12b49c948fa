"""`fpstore predict`: a saved model scores a cohort of the store, or new slides.

The model (``fpstore.classify.saved_models``) is rebuilt from its arrays and card and scores every
patient of the cohort that has patches, labelled or not. The cohort's fingerprints must come
from the model's encoder with the same weights and preprocessing (hash), precision and stain
normalisation: anything else is refused in one line. The predictions are saved as a run
(kind ``predict``), so heatmaps and the HTML report work as for a classify run; where the
cohort has labels the document holds the AUC with its CI and DeLong's test against every
other stored run of the marker that scored the same patients.

``--slides``: the slides are registered as an unlabelled cohort (each slide its own patient)
and the missing fingerprints are extracted with the encoder the card names, rebuilt from its
recorded options (a checkpoint path can be pointed elsewhere, for a model shipped to another
site); a rebuilt encoder with another hash is refused before any slide is read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fpstore.classify.settings import N_BOOT_RANGE
from fpstore.config import check_range
from fpstore.errors import ClassifyError, ConfigError

# What fingerprints must share with the model's training fingerprints: (what it is called,
# card key, file metadata key).
_MUST_MATCH = (
    ("encoder hash", "hash", "encoder_hash"),
    ("precision", "precision", "precision"),
    ("stain normalisation", "stain_norm", "stain_norm"),
)


@dataclass(frozen=True)
class PredictConfig:
    model: str  # a model id of the store, or the path of a model folder
    cohort: str | None = None  # with slides: the name to register them under
    slides: tuple[str, ...] = ()  # globs, folders or files: a new unlabelled cohort
    fold: int | None = None  # score with this fold's model instead of the final one
    patches: int | str = "model"  # per patient: "model" (as trained), "all", or a number
    seed: int = 0  # patch sampling
    n_boot: int = 2000
    encoder_options: dict = field(default_factory=dict)  # --slides: override the card's
    device: str = "auto"  # --slides extraction

    def __post_init__(self):
        if not self.cohort and not self.slides:
            raise ConfigError("predict needs --cohort NAME or --slides GLOB")
        if self.patches not in ("model", "all"):
            if not isinstance(self.patches, int):
                raise ConfigError(
                    f"--patches {self.patches!r}: give a number per patient, 'all' or 'model'"
                )
            check_range("predict", "patches", self.patches, 1, 10**7)
        if self.fold is not None:
            check_range("predict", "fold", self.fold, 0, 19)
        check_range("predict", "n_boot", self.n_boot, *N_BOOT_RANGE)


def _patches(cfg: PredictConfig, card: dict) -> int | None:
    """Patches per patient to score (None: all): "model" means as many as the model saw, its
    classify-time draw or else its training extraction's count."""
    if cfg.patches == "all":
        return None
    if isinstance(cfg.patches, int):
        return cfg.patches
    if card["patches_per_patient"] is not None:
        return card["patches_per_patient"]
    extracted = (card["encoder"] or {}).get("extracted_patches")
    return int(extracted) if isinstance(extracted, str) and extracted.isdigit() else None


def check_fingerprints(card: dict, settings: dict, cohort: str) -> None:
    """Refuse fingerprints the model was not trained on (one line naming each difference)."""
    encoder = card["encoder"]
    diff = [
        f"{label} {settings.get(stored)!r} (model: {encoder[key]!r})"
        for label, key, stored in _MUST_MATCH
        if settings.get(stored) != encoder[key]
    ]
    if diff:
        raise ClassifyError(
            f"cohort {cohort!r}'s {encoder['id']} fingerprints differ from model "
            f"{card['model_id']}'s: {'; '.join(diff)}; extract them with the model's encoder "
            f"and settings (`fpstore models show {card['model_id']}`) into another cohort"
        )


def _slides_cohort(store, cfg: PredictConfig) -> str:
    """The cohort holding ``cfg.slides``: registered now, or the one registered before."""
    from fpstore.cohort.cohorts import add_cohort
    from fpstore.cohort.slide_list import list_slides
    from fpstore.store.cohorts import cohort_names, read_cohort

    entries = list_slides(list(cfg.slides))
    paths = sorted(os.path.abspath(e.path) for e in entries)  # as `cohort add` stores them
    name = cfg.cohort or "slides-" + hashlib.sha1("\n".join(paths).encode()).hexdigest()[:8]
    if name in cohort_names(store):
        have = sorted(read_cohort(store, name).slides.column("path").to_pylist())
        if have != paths:
            raise ClassifyError(
                f"cohort {name!r} exists with other slides; name a new one with --cohort, or "
                f"drop --slides to score {name!r} as it is"
            )
        return name
    add_cohort(store, name, slides=list(cfg.slides), validate=True)  # no usable slide: no cohort
    return name


def _encoder_for_slides(card: dict, cfg: PredictConfig):
    """(registry name, options, the built encoder) of the model's encoder, checked against
    the card's hash."""
    from fpstore.encoders.registry import create_encoder

    encoder = card["encoder"]
    if encoder["spec"] is None:
        raise ClassifyError(
            f"model {card['model_id']}'s card does not say how to build encoder "
            f"{encoder['id']!r} (its fingerprints predate fpstore recording it); extract the "
            "slides with `fpstore extract` as the training cohort was, then predict --cohort"
        )
    if encoder["stain_norm"] not in (None, "none"):
        raise ClassifyError(
            f"model {card['model_id']} was trained on stain-normalised fingerprints "
            f"({encoder['stain_norm']}); extract the slides with that normalisation, then "
            "predict --cohort"
        )
    name = encoder["spec"]["name"]
    options = {**encoder["spec"]["options"], **cfg.encoder_options}
    built = create_encoder(name, **options)
    if built.hash != encoder["hash"]:
        raise ClassifyError(
            f"encoder {name!r} built with {options} has hash {built.hash}, model "
            f"{card['model_id']} needs {encoder['hash']}; point --checkpoint/--weights at the "
            "weights it was trained with"
        )
    return name, options, built


def _extract(
    store, cohort: str, card: dict, cfg: PredictConfig, patches, progress, encoder_for_slides
) -> dict:
    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract

    name, options, built = encoder_for_slides
    encoder = card["encoder"]
    summary = extract(
        store,
        cohort,
        ExtractConfig(
            encoder=name,
            encoder_options=options,
            patches=patches,
            device=cfg.device,
            precision=encoder["precision"],
            min_tissue=float(encoder["min_tissue"]),
            seed=cfg.seed,
        ),
        progress=progress,
        encoder=built,  # built once: checked, then used
    )
    if summary.failed:
        first = summary.failed[0]
        raise ClassifyError(
            f"{len(summary.failed)} slide(s) failed to extract, e.g. {first.slide_id}: "
            f"{first.error}; fix or remove them and rerun"
        )
    return {k: v for k, v in summary.to_dict().items() if k != "slides"}


def delong_vs_runs(store, marker: str, cohort: str, predictions) -> list[dict]:
    """DeLong's test of these scores against every stored run of ``marker`` that scored the
    same labelled patients of ``cohort`` (any role: CV test, external, predict)."""
    from fpstore.classify.protocol import shared_delong
    from fpstore.errors import StoreError
    from fpstore.store.runs import list_runs, load_run

    rows = []
    for run_id in list_runs(store):
        try:
            other = load_run(store, run_id)
        except StoreError:  # a run an older fpstore wrote: not comparable here
            continue
        if other.marker != marker:
            continue
        table = other.patients
        roles = np.asarray(table.column("role").to_pylist())
        mine = np.asarray(table.column("cohort").to_pylist()) == cohort
        for role in sorted(set(roles[mine].tolist())):
            mask = mine & (roles == role)
            n, test = shared_delong(
                predictions.patient_ids,
                predictions.labels,
                predictions.scores,
                np.asarray(table.column("patient_id").to_pylist())[mask],
                table.column("score").to_numpy()[mask],
            )
            if test is not None:
                rows.append(
                    {
                        "run": run_id,
                        "kind": other.kind,
                        "method": other.method,
                        "encoder": other.encoder,
                        "pool": other.pool,
                        "role": role,
                        "n_shared": n,
                        "auc_this": test["auc_a"],
                        "auc_other": test["auc_b"],
                        "p": test["p"],
                    }
                )
    return rows


def _cohort_to_score(store: Path, cfg: PredictConfig, card: dict, patches, progress: bool):
    """(cohort, extraction summary or None): ``cfg.cohort``, or ``cfg.slides`` registered as
    an unlabelled cohort and extracted with the card's encoder."""
    from fpstore.store.cohorts import read_cohort_document

    if cfg.slides:
        if card["encoder"] is None:
            raise ClassifyError(
                f"model {card['model_id']} ({card['method']}) reads patch pixels: add the slides "
                "with `fpstore cohort add`, extract them with any encoder (for the patch grid), "
                "then predict --cohort"
            )
        # The encoder is built and checked first and the slides opened before the cohort is
        # registered: a failure must not leave a cohort behind.
        built = _encoder_for_slides(card, cfg)
        cohort = _slides_cohort(store, cfg)
        return cohort, _extract(store, cohort, card, cfg, patches, progress, built)
    if cfg.cohort is None:  # PredictConfig.__post_init__ refuses this already
        raise ConfigError("predict needs --cohort NAME or --slides GLOB")
    read_cohort_document(store, cfg.cohort)  # an unknown cohort fails first, naming the known
    return cfg.cohort, None


def predict(store: Path, cfg: PredictConfig, progress: bool = True, save: bool = True) -> dict:
    """Score a cohort (or new slides) with a saved model; save the predictions as a run."""
    from fpstore.classify.data import cache_images, fingerprint_settings, load_scoring_bags
    from fpstore.classify.protocol import score
    from fpstore.classify.save_run import new_run_id, save_run
    from fpstore.classify.saved_models import load_model
    from fpstore.store.fingerprints import resolve_encoder

    model = load_model(store, cfg.model)
    card = model.card
    which = "final" if cfg.fold is None else f"fold-{cfg.fold}"
    patches = _patches(cfg, card)
    pixels = card["encoder"] is None
    cohort, extraction = _cohort_to_score(store, cfg, card, patches, progress)
    encoder = None
    if not pixels:
        encoder = resolve_encoder(store, cohort, card["encoder"]["id"])
        check_fingerprints(card, fingerprint_settings(store, cohort, encoder), cohort)
    bags, y, counts = load_scoring_bags(
        store, cohort, card["marker"], encoder, card["pool"], patches, cfg.seed
    )
    images = cache_images(store, cohort, bags, progress=progress) if pixels else None
    result = score(model.estimator(which, images), bags, y, cfg.n_boot, cfg.seed)
    config = {
        "marker": card["marker"],
        "cohort": cohort,
        "method": card["method"],
        "encoder": encoder,
        "pool": card["pool"],
        **{k: v for k, v in asdict(cfg).items() if k not in ("cohort", "encoder_options")},
        "model": card["model_id"],
        "model_path": str(Path(model.folder).resolve()),
        "which": which,
        "patches": patches,
        "trained_on": card["training"]["cohort"],
        "encoder_options": {k: str(v) for k, v in cfg.encoder_options.items()},
    }
    document = {
        "kind": "predict",
        "config": config,
        "score_range": card["score_range"],
        "data": counts,
        "predict": result.to_dict(),
        "classifier": result.classifier,
        "model_performance": card["performance"],
    }
    if extraction is not None:
        document["extraction"] = extraction
    if cohort == card["training"]["cohort"]:
        document["notes"] = [
            f"{cohort} is the cohort model {card['model_id']} was trained on: its AUC here "
            "is not a test (the run's cross-validated predictions are)"
        ]
    document["delong"] = delong_vs_runs(store, card["marker"], cohort, result.predictions)
    if save:
        run_id = new_run_id(config)
        document["run_id"] = run_id
        document["run_path"] = str(
            save_run(store, run_id, document, [(cohort, "predict", result.predictions)])
        )
    return document
