"""One exception hierarchy for everything fpstore raises on purpose.

Every message names the offending value and, where there is one, the fix
(the flag to pass, the column to add). The CLI prints ``str(error)`` on one
line and exits non-zero; ``--debug`` shows the traceback.
"""


class FpstoreError(Exception):
    """Base class: an error the user can act on."""

    exit_code = 1


class ConfigError(FpstoreError, ValueError):
    """An invalid setting: a value out of range, an unknown name."""

    exit_code = 2


class SlideError(FpstoreError):
    """A slide that cannot be opened or read."""


class MppMissingError(SlideError):
    """A slide without microns-per-pixel in its metadata and no override."""


class StainError(FpstoreError):
    """Stains that cannot be estimated: an image or a slide's sample without enough tissue."""


class TmaError(SlideError):
    """A tissue microarray whose cores cannot be found or numbered."""


class CohortError(FpstoreError):
    """A cohort definition that does not fit: clinical table, slide list, mapping."""


class StoreError(FpstoreError):
    """The feature store: missing tables, schema or metadata mismatches, locks."""


class EncoderError(FpstoreError):
    """An encoder that cannot be built: unknown name, missing or wrong weights."""


class TrainingError(FpstoreError):
    """Training that cannot start or go on: too few classes, empty data."""


class ClassifyError(FpstoreError):
    """Classification that cannot run: too few labelled patients, a missing marker."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    """The standard error for a name that is not in a registry."""
    listing = ", ".join(sorted(valid))
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {listing}")
