"""What an extraction run is asked to do, and what it reports."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from fpstore.config import check_choice, check_range
from fpstore.encoders.base import PRECISION_CHOICES
from fpstore.errors import ConfigError

DECODES = ("auto", "cpu")


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. ``patches=None`` means every tissue patch."""

    encoder: str = "fingerprint"
    encoder_options: dict = field(default_factory=dict)  # checkpoint=PATH, weights=PATH, seed=...
    patches: int | None = 120
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    batch_size: int = 0  # 0: 32 on CPU, 256 on CUDA
    num_workers: int = -1  # -1: 1 on a machine of <= 4 cores, else cores - 2 (max 16)
    chunk_size: int = 32  # patches per read task
    min_tissue: float = 0.5
    seed: int = 0
    force: bool = False
    compile: bool = False
    channels_last: bool = True
    decode: str = "auto"  # JPEG tiles: auto = on the GPU when the device is CUDA; cpu = readers
    encoder_id: str | None = None  # the store's name of the fingerprints (default: encoder's)
    stain_norm: str | None = None  # macenko | vahadane | reinhard: patches normalised first
    stain_target: str | None = None  # the image the normaliser fits (default: tiatoolbox's)

    def __post_init__(self):
        if self.patches is not None:
            check_range("ExtractConfig", "patches", self.patches, 1)
        check_choice("ExtractConfig", "device", self.device, ("auto", "cpu", "cuda"))
        check_choice("ExtractConfig", "precision", self.precision, PRECISION_CHOICES)
        check_choice("ExtractConfig", "decode", self.decode, DECODES)
        check_range("ExtractConfig", "batch_size", self.batch_size, 0, 65536)
        check_range("ExtractConfig", "num_workers", self.num_workers, -1, 256)
        check_range("ExtractConfig", "chunk_size", self.chunk_size, 1, 4096)
        check_range("ExtractConfig", "min_tissue", self.min_tissue, 0.0, 1.0)
        if self.encoder_id is not None:
            from fpstore.store.layout import check_partition_value

            check_partition_value("--encoder-id", self.encoder_id)
        if self.stain_norm is not None:
            from fpstore.slides.stain import STAIN_METHODS

            check_choice("ExtractConfig", "stain_norm", self.stain_norm, STAIN_METHODS)
        elif self.stain_target is not None:
            raise ConfigError(
                f"--stain-target {self.stain_target}: add --stain-norm macenko|vahadane|reinhard"
            )

    def build_encoder(self):
        """The encoder this run extracts with: with its stain normaliser (``stain_norm``; the
        id then ends in ``+<method>``, so both settings can share a store), under
        ``encoder_id`` when one is given."""
        from fpstore.encoders.registry import create_encoder

        encoder = create_encoder(self.encoder, **self.encoder_options)
        if self.stain_norm is not None:
            from fpstore.slides.stain import StainNormalizer, StainNormConfig

            config = StainNormConfig(self.stain_norm, per="patch", target=self.stain_target)
            encoder.with_stain_norm(StainNormalizer(config))
        if self.encoder_id is not None:
            encoder.id = self.encoder_id
        return encoder

    def resolved_batch_size(self, device: str) -> int:
        return self.batch_size or (256 if device == "cuda" else 32)

    def resolved_workers(self) -> int:
        if self.num_workers >= 0:
            return self.num_workers
        cores = os.cpu_count() or 1
        return 1 if cores <= 4 else min(16, cores - 2)


@dataclass
class SlideResult:
    slide_id: str
    # ok; skipped (already done, verified); elsewhere (another process did it, verified after
    # its claim was released); no-patient (the cohort has no patient for it); failed
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    # With a GPU JPEG decoder: "gpu", or why the reader processes decoded this slide instead
    decode: str = ""


@dataclass
class ExtractSummary:
    cohort: str
    encoder: str
    encoder_hash: str
    device: str
    precision: str
    slides: list[SlideResult]
    seconds: float
    # claim, plan, read, encode, write: from the first claim to the last file (no model build)
    loop_seconds: float = 0.0
    int8_agreement: dict | None = None  # int8: cosine with fp32 on held-out calibration patches
    notes: list[str] = field(default_factory=list)  # what the run decided for the user
    precision_reason: str = ""  # "asked for", or why auto chose ``precision``
    decode: str = ""  # where JPEG tiles were decoded, and why
    first_patch_seconds: float | None = None  # from the start of the run to the first encoded batch

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.slides)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.slides if r.status == "ok")

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.slides if r.status == "failed"]

    @property
    def decode_fallbacks(self) -> list[SlideResult]:
        """Slides a GPU decoder was at hand for that the readers decoded, each saying why."""
        return [r for r in self.slides if r.decode not in ("", "gpu")]

    def to_dict(self) -> dict:
        return {
            "cohort": self.cohort,
            "encoder": self.encoder,
            "encoder_hash": self.encoder_hash,
            "device": self.device,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "decode": self.decode,
            "decode_fallbacks": len(self.decode_fallbacks),
            "ok": self.count("ok"),
            "skipped": self.count("skipped"),
            "elsewhere": self.count("elsewhere"),
            "no_patient": self.count("no-patient"),
            "failed": self.count("failed"),
            "patches": self.n_patches,
            "seconds": round(self.seconds, 3),
            "patches_per_s": round(self.patches_per_s, 2),
            "loop_seconds": round(self.loop_seconds, 3),
            "loop_patches_per_s": round(self.n_patches / self.loop_seconds, 2)
            if self.loop_seconds
            else 0.0,
            "first_patch_seconds": None
            if self.first_patch_seconds is None
            else round(self.first_patch_seconds, 3),
            "int8_agreement": self.int8_agreement,
            "notes": self.notes,
            "slides": [asdict(r) for r in self.slides],
        }
