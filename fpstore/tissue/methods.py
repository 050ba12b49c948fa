"""The tissue-typing methods and what each reads: light (no numpy), so the CLI's choice
lists come from here."""

from __future__ import annotations

# method -> what it reads: "pixels" (patch images re-read from the slides) or "fingerprints"
METHODS = {
    "rules": "pixels",  # label-free thresholds on pixel features; the default
    "fingerprint-logreg": "fingerprints",
    "fingerprint-knn": "fingerprints",
    "pixel-logreg": "pixels",
}
TRAINED_METHODS = tuple(m for m in METHODS if m != "rules")
FINGERPRINT_METHODS = tuple(m for m, reads in METHODS.items() if reads == "fingerprints")
PIXEL_METHODS = tuple(m for m, reads in METHODS.items() if reads == "pixels")
