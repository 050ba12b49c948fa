"""Tissue types per patch (background, epithelium, stroma, fat): label-free rules on pixels,
trained classifiers on fingerprints or pixel features, evaluation against truth masks.

``predict_tissue(store, cohort, method)`` (fpstore.tissue.type_patches) writes the tissue table.
"""


def predict_tissue(store, cohort, method="rules", **options):
    """See ``fpstore.tissue.type_patches.predict_tissue`` (imported on call: no numpy at import)."""
    from fpstore.tissue.type_patches import predict_tissue as run

    return run(store, cohort, method, **options)
