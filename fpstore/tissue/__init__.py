"""Tissue types per patch (background, epithelium, stroma, fat): label-free rules on pixels,
trained classifiers on fingerprints or pixel features, evaluation against truth masks.

``predict_tissue(store, cohort, method)`` (fpstore.tissue.predict) writes the tissue table.
"""


def predict_tissue(store, cohort, method="rules", **options):
    """See ``fpstore.tissue.predict.predict_tissue`` (imported on call: no numpy at import)."""
    from fpstore.tissue.predict import predict_tissue as run

    return run(store, cohort, method, **options)
