"""The classifier registry: one ``MethodSpec`` per method, with every property fpstore needs.

A spec names its estimator class by import path, so this module imports nothing heavy: the
CLI builds its choice lists here without numpy or torch, and the estimator's module is
imported when a model is made. A new method is its estimator's module plus one spec: listed
below for a built-in method, or passed to ``register_method`` by a plugin's own module
(imported before use). No code elsewhere branches on a method's name.

The estimator protocol (scikit-learn's, over ``Bags``):

    Estimator(config=None)       ``config``: a frozen dataclass of the class's ``config_class``
                                 with a ``seed`` field; ``settings`` is the config in force.
                                 Methods reading pixels also take ``images=`` (a reader).
    fit(bags, y, eval_set=(bags_es, y_es)) -> self
    decision_function(bags)      (P,) patient score, higher = positive
    patch_scores(bags)           (N,) per patch, or None where the method has none
    patch_attention(bags)        optional: (N,) attention per patch (each patient's sum to 1),
                                 saved with the run beside the patch scores
    describe()                   its config and what fitting chose, saved with a run
    get_state() / set_state(d)   the learned arrays, for saved models (no pickle)

The CV harness copies an estimator per fold with scikit-learn's ``clone`` and sets the seed.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from fpstore.errors import ConfigError, unknown_name

INPUTS = ("fingerprints", "pixels")
# tanh: [-1, 1] (the MIL head); probability: [0, 1]; logit: symmetric around 0, its bound
# taken from the run's own scores (logistic-regression decision values).
SCORE_RANGES = ("tanh", "probability", "logit")
# What `classify` saves for `predict` (the CLI's choice list, kept light here): the final
# model (trained on the whole cohort); it and the fold models; nothing.
SAVE_MODELS = ("final", "all", "none")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    estimator: str  # "package.module:Class"
    inputs: str = "fingerprints"
    score_range: str = "probability"
    compare_default: bool = True  # run by `fpstore compare` when --methods is not given
    by_tissue: bool = False  # features per tissue type: needs tissue types, and two or more
    settings: dict = field(default_factory=dict)  # config fields the name fixes
    summary: str = ""  # one line for --help

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ConfigError(
                f"method name {self.name!r}: use lower-case letters, digits and '-' (a CLI choice)"
            )
        if ":" not in self.estimator:
            raise ConfigError(
                f"method {self.name!r}: estimator {self.estimator!r} must be 'module:Class'"
            )
        if self.inputs not in INPUTS:
            raise ConfigError(f"method {self.name!r}: inputs {self.inputs!r}; use one of {INPUTS}")
        if self.score_range not in SCORE_RANGES:
            raise ConfigError(
                f"method {self.name!r}: score_range {self.score_range!r}; use one of {SCORE_RANGES}"
            )


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; names are unique."""
    if spec.name in _REGISTRY:
        raise ConfigError(f"method {spec.name!r} is registered already; choose another name")
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    MethodSpec(
        "mil",
        "fpstore.classify.mil:MILHead",
        score_range="tanh",
        summary="the paper's head (512 x 8, ReLU, 8 x 1, tanh per patch; patient = mean)",
    ),
    MethodSpec(
        "abmil",
        "fpstore.classify.abmil:ABMILHead",
        score_range="logit",
        summary="gated attention MIL (Ilse et al. 2018): attention per patch, patient = "
        "attention-weighted embedding",
    ),
    MethodSpec(
        "logreg",
        "fpstore.classify.baselines:PooledLogReg",
        score_range="logit",
        summary="logistic regression on the patient's mean fingerprint",
    ),
    MethodSpec(
        "logreg-tissue",
        "fpstore.classify.baselines:PooledLogReg",
        score_range="logit",
        by_tissue=True,
        settings={"pooling": "tissue-mean"},
        summary="logistic regression on the mean fingerprint per tissue type",
    ),
    MethodSpec(
        "xgboost",
        "fpstore.classify.baselines:PooledXGBoost",
        summary="gradient-boosted trees on the mean fingerprint",
    ),
    MethodSpec(
        "xgboost-tissue",
        "fpstore.classify.baselines:PooledXGBoost",
        by_tissue=True,
        settings={"pooling": "tissue-mean"},
        summary="gradient-boosted trees on the mean fingerprint per tissue type",
    ),
    MethodSpec(
        "patch-cnn",
        "fpstore.classify.patchcnn:PatchCNN",
        inputs="pixels",
        compare_default=False,
        summary="the paper's control, a ResNet on patch pixels (slow on CPU)",
    ),
):
    register_method(_spec)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def compare_methods() -> tuple[str, ...]:
    """The methods `fpstore compare` runs by default."""
    return tuple(name for name, spec in _REGISTRY.items() if spec.compare_default)


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise unknown_name("method", name, _REGISTRY)
    return _REGISTRY[name]


def estimator_class(name: str):
    """The estimator class of a method (its module imported here, on first use)."""
    module, _, attribute = method_spec(name).estimator.partition(":")
    return getattr(importlib.import_module(module), attribute)


def create_classifier(method: str, seed: int = 0, images=None, **overrides):
    """A fresh, unfitted estimator for ``method``; ``overrides`` set its config fields
    (threads included: each method has its own sensible default)."""
    spec = method_spec(method)
    cls = estimator_class(method)
    if "seed" in overrides:
        raise ConfigError("the classifier's seed comes from --seed; drop seed from the settings")
    fixed = set(spec.settings) & set(overrides)
    if fixed:
        raise ConfigError(
            f"method {method!r} fixes {', '.join(sorted(fixed))}; drop it from the settings"
        )
    fields = set(cls.config_class.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"method {method!r} has no setting {unknown[0]!r}; its settings: "
            f"{', '.join(sorted(fields - set(spec.settings) - {'seed'}))}"
        )
    config = cls.config_class(**{**spec.settings, **overrides, "seed": seed})
    return cls(config, images=images) if spec.inputs == "pixels" else cls(config)
