"""Saved classifiers: the model card, saving a run's models, loading one to score new data.

A saved model is its fitted estimator's arrays (``get_state``) and a card (JSON, and the same
as a short Markdown page) saying how to rebuild it (method and settings), what it expects of
its inputs (the encoder by id and hash, precision, stain normalisation, patch size, patches
per patient, the pool), where it came from (training cohort, its sites and class counts) and
what it is worth (CV AUC with its CI, the permutation p-value when run). ``classify`` saves the
final model of a run (trained on the whole cohort) and, where asked, its fold models; the
model id is the run id. The folder's files are ``fpstore.store.models``'.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fpstore
from fpstore.classify.methods import create_classifier, estimator_class, method_spec
from fpstore.errors import ClassifyError
from fpstore.store.layout import StoreLayout
from fpstore.store.models import list_models, model_folder, read_card, read_state, write_model


def _library_versions() -> dict:
    """Versions of the libraries the run used (those imported: none is imported for this)."""
    names = {"numpy": "numpy", "sklearn": "scikit-learn", "torch": "torch", "xgboost": "xgboost"}
    return {
        label: str(sys.modules[module].__version__).split("+")[0]
        for module, label in names.items()
        if module in sys.modules
    }


def encoder_card(settings: dict, encoder: str) -> dict:
    """The card's encoder block from ``fingerprint_settings`` (a pixel method has none)."""
    spec = settings.get("encoder_spec")
    return {
        "id": encoder,
        "hash": settings.get("encoder_hash"),
        "weights_hash": settings.get("weights_hash"),
        "dim": settings.get("dim"),
        "precision": settings.get("precision"),
        "stain_norm": settings.get("stain_norm"),
        "patch_um": settings.get("patch_um"),
        "out_px": settings.get("out_px"),
        "min_tissue": settings.get("min_tissue"),
        "extracted_patches": settings.get("patches"),
        "extraction_seed": settings.get("seed"),
        # How to build it for new slides: {"name", "options"}; None when the fingerprints
        # predate fpstore recording it.
        "spec": json.loads(spec) if isinstance(spec, str) and spec != "{}" else None,
    }


def _sites(bags, y) -> dict:
    if bags.sites is None:
        return {}
    out = {}
    for site in sorted(set(bags.sites.tolist())):
        mask = bags.sites == site
        out[site or "unknown"] = {
            "patients": int(mask.sum()),
            "positive": int(y[mask].sum()),
            "negative": int((1 - y[mask]).sum()),
        }
    return out


def _auc_block(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keys = ("auc", "ci_low", "ci_high", "n", "n_pos", "n_neg", "mean_fold_auc", "sd_fold_auc")
    return {k: metrics[k] for k in keys if k in metrics}


def build_card(
    run_id: str, document: dict, data, encoder: dict | None, final: tuple, external: dict | None
) -> dict:
    """The model card of a classify run's models (``document``: the run's, for its config,
    score range, CV metrics and permutation test; ``data``: its ``Dataset``; ``final``: the
    final model and its row from ``fit_final``)."""
    config, score_range = document["config"], document["score_range"]
    cv_metrics, permutation = document["cv"]["metrics"], document.get("permutation")
    final_model, final_fit = final
    spec = method_spec(config["method"])
    return {
        "model_id": run_id,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fpstore_version": fpstore.__version__,
        "libraries": _library_versions(),
        "marker": config["marker"],
        "method": config["method"],
        "inputs": spec.inputs,
        "settings": final_model.describe(),
        "score_range": score_range,
        "pool": config["pool"],
        "patches_per_patient": config["patches"],  # drawn from the stored ones; None: all
        "encoder": encoder,
        "training": {
            "cohort": config["cohort"],
            **data.summary(),
            "sites": _sites(data.bags, data.y),
            "split": config["split"],
            "folds": config["folds"],
            "seed": config["seed"],
            # The final model: every group but group 0 trains, group 0 early-stops (the
            # run's fold_assignment says who is in which group).
            "final_fit": {k: v for k, v in final_fit.items() if k != "fold"},
        },
        "performance": {
            "cv": _auc_block(cv_metrics),
            "permutation_p": None if permutation is None else permutation["p_value"],
            "permutations": None if permutation is None else permutation["n_permutations"],
            "external": external,
        },
    }


def _cell(value) -> str:
    return "—" if value is None else str(value)


def card_page(card: dict) -> str:
    """The model card as a short Markdown page (README.md of the model folder)."""
    t, perf, enc = card["training"], card["performance"], card["encoder"]
    cv = perf["cv"] or {}
    lines = [
        f"# fpstore model {card['model_id']}",
        "",
        f"Predicts **{card['marker']}** status per patient from H&E "
        + ("fingerprints" if enc else "patch pixels")
        + f" with `{card['method']}` (pool `{card['pool']}`, "
        + (
            f"{card['patches_per_patient']} patches per patient"
            if card["patches_per_patient"]
            else "every stored patch"
        )
        + f"). Scores range over {card['score_range']}; higher means positive.",
        "",
        "| | |",
        "|---|---|",
        f"| training cohort | {t['cohort']}: {t['patients']} patients ({t['positive']} positive, "
        f"{t['negative']} negative), {t['patches']} patches, {len(t['sites'])} sites |",
        f"| cross-validation | {t['folds']} groups by {t['split']}, seed {t['seed']} |",
        f"| CV AUC [95% CI] | {cv.get('auc', 0):.3f} [{cv.get('ci_low', 0):.3f}, "
        f"{cv.get('ci_high', 0):.3f}] (n = {cv.get('n')}) |"
        if cv
        else "| CV AUC | — |",
        f"| permutation p | {_cell(perf['permutation_p'])} "
        f"({_cell(perf['permutations'])} shuffles) |",
    ]
    if perf["external"]:
        e = perf["external"]
        lines.append(
            f"| external AUC [95% CI] | {e['cohort']}: {e['auc']:.3f} [{e['ci_low']:.3f}, "
            f"{e['ci_high']:.3f}] (n = {e['n']}) |"
        )
    if enc:
        lines += [
            f"| encoder | {enc['id']}, hash {enc['hash']}, weights {enc['weights_hash']} |",
            f"| extraction | {enc['precision']}, stain normalisation {enc['stain_norm']}, "
            f"{enc['patch_um']} um -> {enc['out_px']} px, {enc['extracted_patches']} patches "
            "per patient |",
            f"| build the encoder | `{json.dumps(enc['spec'])}` |",
        ]
    lines += [
        f"| fpstore | {card['fpstore_version']} ({card['created']}) |",
        f"| saved models | {', '.join(card['models'])} |",
        "",
        "## Sites",
        "",
        "| site | patients | positive | negative |",
        "|---|---|---|---|",
        *(
            f"| {s} | {v['patients']} | {v['positive']} | {v['negative']} |"
            for s, v in t["sites"].items()
        ),
        "",
        "## Use",
        "",
        "```",
        f"fpstore predict --model {card['model_id']} --cohort NAME   # a cohort of the store",
        f"fpstore predict --model PATH/{card['model_id']} --slides 'scans/*.svs'  # new slides",
        "```",
        "",
        f"Classifier settings: `{json.dumps(card['settings'], sort_keys=True)}`",
        "",
    ]
    return "\n".join(lines)


def save_models(store, run_id: str, card: dict, final_model, fold_models: list) -> Path:
    """Write the run's final model (and fold models) with its card under models/classify/."""
    card = {**card, "models": ["final"] + [f"fold-{k}" for k in range(len(fold_models))]}
    states = {"final": final_model.get_state()}
    states.update({f"fold-{k}": m.get_state() for k, m in enumerate(fold_models)})
    return write_model(StoreLayout.of(store).model_dir(run_id), card, states, card_page(card))


@dataclass
class SavedModel:
    """A saved model's folder and card; ``estimator`` rebuilds a fitted model from it."""

    folder: Path
    card: dict

    @property
    def id(self) -> str:
        return self.card["model_id"]

    def estimator(self, which: str = "final", images=None):
        """The fitted ``final`` model or a ``fold-<k>`` model, ready to score."""
        if which not in self.card["models"]:
            raise ClassifyError(
                f"model {self.id} has no {which!r} model; saved: {', '.join(self.card['models'])}"
                + ("" if which == "final" else " (classify with --save-models all saves folds)")
            )
        method = self.card["method"]
        spec = method_spec(method)
        dropped = set(spec.settings) | {"seed", "method"}
        dropped |= set(getattr(estimator_class(method), "training_only", ()))
        fields = estimator_class(method).config_class.__dataclass_fields__
        settings = {
            k: v for k, v in self.card["settings"].items() if k in fields and k not in dropped
        }
        model = create_classifier(method, self.card["settings"].get("seed", 0), images, **settings)
        state = read_state(self.folder, which)
        try:
            return model.set_state(state)
        except (ClassifyError, KeyError, ValueError, IndexError, TypeError, RuntimeError) as error:
            reason = f"no array {error}" if isinstance(error, KeyError) else str(error)
            raise ClassifyError(
                f"saved {which!r} model of {str(self.folder)!r} does not fit its card "
                f"({method}: {' '.join(reason.split())}); save it again with `fpstore classify`"
            ) from None


def load_model(store, ref: str | Path) -> SavedModel:
    """A model by id (in ``store``) or by the path of a model folder (shipped anywhere)."""
    folder = model_folder(store, ref)
    return SavedModel(folder, read_card(folder))


def model_rows(store) -> list[dict]:
    """One row per saved model of the store (`fpstore models list`)."""
    rows = []
    for model_id in list_models(store):
        card = read_card(StoreLayout.of(store).model_dir(model_id))
        cv = card["performance"]["cv"] or {}
        rows.append(
            {
                "model": model_id,
                "marker": card["marker"],
                "method": card["method"],
                "encoder": (card["encoder"] or {}).get("id", "pixels"),
                "pool": card["pool"],
                "patches": card["patches_per_patient"] or "all",
                "trained on": card["training"]["cohort"],
                "patients": card["training"]["patients"],
                "cv_auc": cv.get("auc"),
                "ci_low": cv.get("ci_low"),
                "ci_high": cv.get("ci_high"),
                "models": len(card["models"]),
            }
        )
    return rows
