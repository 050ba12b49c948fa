"""Model files: saved classifier models, one folder each (below), in a store or wherever a
user copies one; the store's trained fingerprint network that ``--encoder fingerprint``
defaults to (``stored_fingerprint_checkpoint``, ``models/fingerprint/*.pt``); and the
pickle-free npz reader (``read_npz``) that classifier states and tissue models
(``models/tissue/<method>.npz``, ``fpstore.tissue.trained``) are loaded with.

    <model>/final.npz       the final model's learned arrays (trained on the whole cohort)
    <model>/fold-<k>.npz    the cross-validation fold models, where they were saved
    <model>/README.md       the model card as a short page
    <model>/card.json       the model card: what the model is, how it was trained, how to
                            rebuild it (``fpstore.classify.saved_models`` writes it)

A model folder is filled aside and moved into place in one step, so a folder with a
card.json holds a whole model; in a store it counts once its run exists too.

The arrays are plain numpy ``.npz`` files read with ``allow_pickle=False``: loading a model
someone sent runs none of their code. In a store, ``models/classify/<model_id>/``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from fpstore.errors import StoreError
from fpstore.store.io import (
    staged_folder,
    write_json_atomic,
    write_npz_atomic,
    write_text_atomic,
)
from fpstore.store.layout import StoreLayout, visible_files

MODEL_FORMAT = 1
CARD = "card.json"
PAGE = "README.md"


def state_file(name: str) -> str:
    """``final`` -> final.npz, ``fold-0`` -> fold-0.npz."""
    return f"{name}.npz"


def write_model(folder, card: dict, states: dict[str, dict], page: str) -> Path:
    """Write a model folder: its states (``{name: {array name: array}}``), the page, the card,
    filled aside and moved into place in one step."""
    folder = Path(folder)
    if (folder / CARD).exists():
        raise StoreError(f"{folder} holds a model already; models are written once")
    with staged_folder(folder) as staged:
        for name, arrays in states.items():
            write_npz_atomic(arrays, staged / state_file(name))
        write_text_atomic(page, staged / PAGE)
        write_json_atomic({**card, "format": MODEL_FORMAT}, staged / CARD)
    return folder


def _stored(layout: StoreLayout, model_id: str) -> bool:
    """A store's model is whole once its card exists and complete once its run does (the
    run's commit comes last, ``store.runs.write_run``)."""
    return (layout.model_dir(model_id) / CARD).is_file() and (
        layout.run_dir(model_id) / "run.json"
    ).is_file()


def list_models(store) -> list[str]:
    """The ids of the store's saved models, oldest first (ids start with a UTC time)."""
    layout = StoreLayout.of(store)
    folder = layout.models_dir
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _stored(layout, p.name))


def model_folder(store, ref: str | Path) -> Path:
    """A model folder from a path to one (a shipped model) or a model id in the store."""
    path = Path(ref)
    if (path / CARD).is_file():
        return path
    in_store = store is not None and path.name == str(ref)  # a bare id, not a path
    if in_store and _stored(StoreLayout.of(store), str(ref)):
        return StoreLayout.of(store).model_dir(str(ref))
    known = list_models(store) if store is not None else []
    raise StoreError(
        f"no model {str(ref)!r}: not a model folder (with a {CARD}) nor a model of store "
        f"{str(store)!r}; models there: "
        f"{', '.join(known[-10:]) or 'none, run `fpstore classify` first'}"
    )


def stored_fingerprint_checkpoint(store):
    """The store's one trained fingerprint network (``models/fingerprint/*.pt``): the
    checkpoint ``--encoder fingerprint`` uses when none is named."""
    layout = StoreLayout.of(store)
    found = sorted(visible_files(layout.fingerprint_models_dir, "*.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise StoreError(
            f"encoder 'fingerprint' needs a checkpoint: {layout} holds no trained network "
            f"({layout.fingerprint_models_dir}/*.pt). Train one with `fpstore train-fingerprint "
            "--store STORE ...`, or give --checkpoint PATH"
        )
    names = ", ".join(p.name for p in found)
    raise StoreError(
        f"{layout} holds {len(found)} trained fingerprint networks ({names}): name one with "
        f"--checkpoint {layout.fingerprint_models_dir}/NAME.pt"
    )


def read_card(folder) -> dict:
    path = Path(folder) / CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError included
        raise StoreError(f"cannot read model card {str(path)!r}: {error}") from None
    if card.get("format") != MODEL_FORMAT:
        raise StoreError(
            f"{str(path)!r} is model format {card.get('format')!r}; this fpstore reads "
            f"{MODEL_FORMAT}: load it with the fpstore version named in the card "
            f"({card.get('fpstore_version', '?')})"
        )
    return card


def read_state(folder, name: str) -> dict[str, np.ndarray]:
    """The arrays of one saved model of a folder (``final`` or ``fold-<k>``)."""
    path = Path(folder) / state_file(name)
    if not path.is_file():
        saved = sorted(p.stem for p in Path(folder).glob("*.npz"))
        raise StoreError(
            f"model folder {str(folder)!r} has no {name!r} model; saved: {', '.join(saved)}"
            + ("" if name == "final" else "; classify with --save-models all saves fold models")
        )
    return read_npz(path, "model weights")


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an npz file (never pickles); StoreError in one line for a truncated,
    empty or foreign file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        reason = " ".join(str(error).split()) or "empty file"
        raise StoreError(
            f"cannot read {what} {str(path)!r} ({reason}): it is truncated or not an npz "
            "file; save it again"
        ) from None
    if not arrays:
        raise StoreError(f"{what} {str(path)!r} holds no arrays; save it again")
    return arrays
