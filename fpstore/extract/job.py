"""What an extraction run hands its engine: the settings one run shares from its first slide
to its last (``fpstore.extract.run`` builds them; ``LocalEngine`` and ``RayEngine`` read them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fpstore.config import PRECISIONS, PatchSpec, check_choice
from fpstore.errors import ConfigError
from fpstore.extract.config import ExtractConfig
from fpstore.extract.write import EncoderInfo
from fpstore.store.layout import StoreLayout


@dataclass(frozen=True)
class ExtractJob:
    """One run's extraction of one cohort with one built encoder.

    ``info``: what the writers record of ``encoder``; ``key``: the resume key every file of
    the run carries; ``spec``: the encoder's patch geometry and the run's tissue threshold;
    ``config``: with its precision resolved. What changes during the run (the slides left,
    the claims) travels beside the job, not in it.
    """

    layout: StoreLayout
    cohort: str
    encoder: Any  # fpstore.encoders.base.Encoder, prepared by the engine
    info: EncoderInfo
    key: dict
    spec: PatchSpec
    config: ExtractConfig
    progress: bool = True

    def __post_init__(self):
        # The engines prepare the model at this precision and the key records it: never 'auto'.
        check_choice("ExtractJob", "config.precision", self.config.precision, PRECISIONS)
        wanted = self.encoder.preprocessing
        if (self.spec.patch_um, self.spec.out_px, self.spec.min_tissue) != (
            wanted.patch_um,
            wanted.out_px,
            self.config.min_tissue,
        ):
            raise ConfigError(
                f"ExtractJob.spec={self.spec} differs from the encoder's patches "
                f"({wanted.patch_um} um, {wanted.out_px} px) or --min-tissue "
                f"{self.config.min_tissue}"
            )
        if not (self.info.id == self.key.get("encoder") == self.encoder.id):
            raise ConfigError(
                f"ExtractJob: info ({self.info.id!r}) and key ({self.key.get('encoder')!r}) "
                f"describe another encoder than {self.encoder.id!r}"
            )
