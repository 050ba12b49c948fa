"""The settings that travel together through `classify` and `compare`, as frozen objects.

CVProtocol: how a method is validated (folds, split, seed, bootstrap resamples, label
permutations and, once drawn, the patient groups); every function of
``fpstore.classify.protocol`` and ``permutation_test`` takes one.
CohortRunConfig: what `classify` and `compare` share (marker, cohorts, the protocol's
settings, classifier overrides, patches per patient) and its checks; ``ClassifyConfig`` and
``CompareConfig`` (``fpstore.classify.pipeline``) extend it. Its fields stay flat, so a saved
run's ``config`` keeps its keys; ``.protocol`` gathers the protocol's.

A new setting is a field with a default and a check in ``__post_init__``; the CLI's option
for it goes in cli/classify.py's shared list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fpstore.config import MARKERS, SPLITS, check_choice, check_range
from fpstore.errors import ConfigError

FOLDS_RANGE = (3, 20)
N_BOOT_RANGE = (100, 100_000)
PERMUTATIONS_RANGE = (0, 100_000)


def check_protocol(owner: str, folds: int, split: str, n_boot: int) -> None:
    """The checks a protocol's settings pass wherever they are given (messages name ``owner``)."""
    check_choice(owner, "split", split, SPLITS)
    check_range(owner, "folds", folds, *FOLDS_RANGE)
    check_range(owner, "n_boot", n_boot, *N_BOOT_RANGE)


@dataclass(frozen=True)
class CVProtocol:
    """The paper's validation protocol: ``folds`` patient groups (by patient or by site),
    seeded; ``n_boot`` patient-bootstrap resamples for each CI; ``permutations`` label
    shuffles for a permutation test (0: none).

    ``groups`` (patient_id -> group) fixes the groups, e.g. so that every entry of a
    comparison sees each patient in the same role; None: drawn from the bags' own patients.
    """

    folds: int = 5
    split: str = "patient"
    seed: int = 0
    n_boot: int = 2000
    permutations: int = 0
    groups: Mapping[str, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_protocol("protocol", self.folds, self.split, self.n_boot)
        check_range("protocol", "permutations", self.permutations, *PERMUTATIONS_RANGE)

    def with_groups(self, groups: Mapping[str, int] | None) -> CVProtocol:
        """This protocol with its patient groups fixed (None: drawn again per call)."""
        return replace(self, groups=groups)


@dataclass(frozen=True)
class CohortRunConfig:
    """The settings `classify` and `compare` share: a marker predicted on ``cohort`` by
    cross-validation (and on ``external`` by the model trained on the whole cohort)."""

    marker: str
    cohort: str
    external: str | None = None
    folds: int = 5
    split: str = "patient"
    seed: int = 0
    n_boot: int = 2000
    classifier: dict = field(default_factory=dict)  # overrides of the method's config
    patches: int | None = None  # per patient, drawn from the stored ones (None: all of them)

    @property
    def owner(self) -> str:
        """The command named in this config's error messages."""
        return type(self).__name__.removesuffix("Config").lower()

    def __post_init__(self):
        check_choice(self.owner, "marker", self.marker, MARKERS)
        check_protocol(self.owner, self.folds, self.split, self.n_boot)
        if self.patches is not None:
            check_range(self.owner, "patches", self.patches, 1, 10**7)
        if self.external is not None and self.external == self.cohort:
            raise ConfigError(
                f"--external {self.external!r} is the training cohort; name another cohort"
            )

    @property
    def cohorts(self) -> tuple[str, ...]:
        """The training cohort, then the external one if any."""
        return tuple(filter(None, (self.cohort, self.external)))

    @property
    def protocol(self) -> CVProtocol:
        return CVProtocol(self.folds, self.split, self.seed, self.n_boot)
