"""Patch scores as GeoJSON that QuPath imports (File > Import objects, or drag and drop).

One Polygon Feature per patch, in level-0 pixel coordinates with the origin at the top left
(QuPath's convention for every image). Properties follow QuPath's GeoJSON: ``objectType``,
``classification`` {name, color} (here the tissue type) and ``measurements`` {name: value}
(here the score, shown in QuPath's measurement tables and usable for colouring); ``score``
and ``tissue_type`` are repeated at the top level for other GeoJSON readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fpstore.config import check_choice
from fpstore.report.colors import TISSUE_COLORS, UNKNOWN_TISSUE
from fpstore.store.io import write_text_atomic

OBJECT_TYPES = ("annotation", "detection", "tile")


def patches_geojson(
    x, y, size_px, scores, tissue_types=None, patch_ids=None, object_type: str = "annotation"
) -> dict:
    """A FeatureCollection with one square per patch (level-0 px), score and tissue type."""
    check_choice("patches_geojson", "object_type", object_type, OBJECT_TYPES)
    # Plain Python lists up front: indexing numpy arrays element by element is the slow part.
    x = np.asarray(x, np.float64)
    xs, ys = x.tolist(), np.asarray(y, np.float64).tolist()
    sizes = np.broadcast_to(np.asarray(size_px, np.float64), x.shape).tolist()
    scores = np.asarray(scores, np.float64).tolist()
    types = [None] * len(xs) if tissue_types is None else list(tissue_types)
    ids = [None] * len(xs) if patch_ids is None else [str(p) for p in patch_ids]
    classes = {
        name: {
            "name": str(name).capitalize(),
            "color": list(TISSUE_COLORS.get(name, UNKNOWN_TISSUE)),
        }
        for name in set(types)
        if name is not None
    }
    features = []
    for x0, y0, s, score, tissue, pid in zip(xs, ys, sizes, scores, types, ids):
        properties = {
            "objectType": object_type,
            "measurements": {"score": score},
            "score": score,
            "tissue_type": tissue,
        }
        if tissue is not None:
            properties["classification"] = classes[tissue]
        feature = {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]],
            },
            "properties": properties,
        }
        if pid is not None:
            feature["id"] = pid
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}


def write_geojson(document: dict, path: Path) -> Path:
    return write_text_atomic(json.dumps(document, separators=(",", ":")), Path(path))
