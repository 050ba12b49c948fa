"""The tissue-typing methods as data: what each reads, whether it is trained, and which model
family fits and applies it. Light (no numpy), so the CLI's choice lists come from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TissueMethod:
    """One way of typing patches.

    ``reads``: "pixels" (patch images re-read from the slides) or "fingerprints" (stored
    vectors, no pixels). ``family``: "rules" (label-free, nothing fitted), "linear"
    (multinomial logistic regression) or "knn" (cosine nearest neighbours);
    ``pairwise``: the inputs are expanded with their pairwise products before the model.
    """

    name: str
    reads: str
    family: str
    pairwise: bool = False
    # What a user can expect of its epithelium at a site it never saw, as measured in
    # docs/results.md (the basis names where); None where that depends on the user's model.
    expected_epithelium_precision: float | None = None
    basis: str = ""

    @property
    def trained(self) -> bool:
        return self.family != "rules"


REGISTRY = {
    m.name: m
    for m in (
        # label-free H&E rules on per-slide stain estimates; the default
        TissueMethod(
            "rules",
            reads="pixels",
            family="rules",
            expected_epithelium_precision=0.68,
            basis="docs/results.md, issue 26: 0.97-0.98 on the synthetic demo's two unseen "
            "sites (seeds 0-2), 0.68 (13 of 19) on the hand-labelled real set, where "
            "prostate smooth muscle was typed epithelium; the lower is the one to expect",
        ),
        TissueMethod("fingerprint-logreg", reads="fingerprints", family="linear"),
        TissueMethod("fingerprint-knn", reads="fingerprints", family="knn"),
        # the rules' inputs with learned boundaries
        TissueMethod("pixel-logreg", reads="pixels", family="linear", pairwise=True),
    )
}
METHODS = tuple(REGISTRY)
TRAINED_METHODS = tuple(m.name for m in REGISTRY.values() if m.trained)
FINGERPRINT_METHODS = tuple(m.name for m in REGISTRY.values() if m.reads == "fingerprints")
PIXEL_METHODS = tuple(m.name for m in REGISTRY.values() if m.reads == "pixels")


def get_method(name: str) -> TissueMethod:
    """The registered method ``name``; an unknown name lists the valid ones."""
    from fpstore.errors import unknown_name

    if name not in REGISTRY:
        raise unknown_name("tissue method", name, REGISTRY)
    return REGISTRY[name]
