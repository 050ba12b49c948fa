"""Validated configuration dataclasses shared across stages.

Each dataclass checks itself in ``__post_init__`` and raises ConfigError naming
the field, the bad value and the accepted range, so that a bad flag fails before
any slide is opened.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from fpstore.errors import ConfigError

MARKERS = ("ER", "PR", "Her2")
TISSUE_TYPES = ("background", "epithelium", "stroma", "fat")
# The pools the CLI offers (any "+"-joined set of tissue types is accepted) and the CV splits:
# here, beside the markers, so that the CLI's choice lists import no numpy.
POOLS = ("all", "epithelium", "stroma", "fat", "epithelium+stroma")
SPLITS = ("patient", "site")
# Where a network runs ("auto": CUDA when one is visible) and the number formats it runs in:
# here, like the lists above, so that every CLI option offers the library's own list.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # an encoder's inference
FINGERPRINT_ARCHS = ("resnet10-slim", "resnet18", "resnet34")  # fpstore.encoders.fingerprint_net
TRAIN_PRECISIONS = ("fp32", "bf16")  # training: fp16 would need loss scaling; int8 does not train
CLINICAL_FORMATS = ("tcga", "csv")  # `cohort add --format`: a TCGA Biotab file or a CSV/TSV
SYNTH_PARTS = ("tcga", "external", "tma")  # what `fpstore synth` writes, alone or together
# One resampling method everywhere a patch is resized (reader, TMA crops, cache):
# area averaging when shrinking (no aliasing of nuclei), bilinear when enlarging.
RESAMPLING = "area-down/bilinear-up"


def set_backend_flags(device: str) -> None:
    """The backend settings every model on ``device`` runs with, set in this one place so
    that the product runs as the benchmarks measure: on CUDA, cuDNN times its convolution
    algorithms once per input shape and keeps the fastest (batches keep one shape), and
    float32 matrix products use TF32 as cuDNN's convolutions already do by default.
    Nothing changes on the CPU."""
    if device != "cuda":
        return
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


@contextmanager
def full_float32_matmul():
    """float32 matrix products in full precision inside, whatever ``set_backend_flags`` chose.

    For pixel arithmetic that must give the CPU's 8-bit values (the GPU's area resize and
    stain normalisation): TF32's 10-bit mantissa moves 1-3% of their pixels by one level.
    The models keep TF32; the setting is restored on the way out."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def check_range(owner: str, name: str, value, low=None, high=None) -> None:
    """Raise ConfigError unless low <= value <= high (either bound optional)."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{owner}.{name}={value!r} is out of range {bounds}")


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"{owner}.{name}={value!r}; choose one of: {', '.join(map(str, choices))}"
        )


@dataclass(frozen=True)
class PatchSpec:
    """A square patch of ``patch_um`` microns on the slide, resized to ``out_px`` pixels.

    The paper: 112 um squares resized to 224 px (0.5 um/px), kept where at least
    ``min_tissue`` of the square is tissue.
    """

    patch_um: float = 112.0
    out_px: int = 224
    min_tissue: float = 0.5

    def __post_init__(self):
        check_range("PatchSpec", "patch_um", self.patch_um, 1.0, 10_000.0)
        check_range("PatchSpec", "out_px", self.out_px, 8, 4096)
        check_range("PatchSpec", "min_tissue", self.min_tissue, 0.0, 1.0)

    @property
    def out_mpp(self) -> float:
        """Microns per pixel of the resized patch."""
        return self.patch_um / self.out_px
