"""The encoder contract: patch pixels in, one feature vector per patch out.

An :class:`Encoder` carries its preprocessing (mean, std, patch size in microns and pixels),
its output dimension and a hash of its weights and preprocessing, so that call sites never
re-type them and the store can tell whether two extractions are comparable. Encoders are
built by name through :mod:`fpstore.encoders.registry`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fpstore.config import DEVICES, PRECISIONS, check_choice, check_range, set_backend_flags
from fpstore.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "auto" resolves to one of PRECISIONS (``resolve_precision``) before anything runs.
PRECISION_CHOICES = ("auto", *PRECISIONS)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (Linux /proc/cpuinfo names) of native bf16 arithmetic: AMX tiles and AVX-512 BF16.
# Without them bf16 is emulated and several times slower than fp32 (benchmarks/README.md).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Preprocessing:
    """What an encoder expects: ``patch_um`` squares resized to ``out_px``, then (x/255-mean)/std."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_um: float = 112.0
    out_px: int = 224

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise EncoderError(
                f"preprocessing needs 3 channel means and stds, got {self.mean}, {self.std}"
            )
        for s in self.std:
            check_range("Preprocessing", "std", s, 1e-6)
        check_range("Preprocessing", "patch_um", self.patch_um, 1.0, 10_000.0)
        check_range("Preprocessing", "out_px", self.out_px, 8, 4096)

    def to_dict(self) -> dict:
        return asdict(self)


def stain_normalised_id(encoder_id: str, method: str | None) -> str:
    """The encoder id of fingerprints extracted with ``--stain-norm method`` (None: as is)."""
    return encoder_id if method is None else f"{encoder_id}+{method}"


class Encoder(torch.nn.Module):
    """A backbone with its preprocessing: ``encode(uint8 NHWC) -> float32 [N, dim]``.

    Pixels travel as uint8 and are normalised on the encoder's device (a quarter of the bytes
    of float32 through the PCIe bus and the DataLoader's shared memory). The permuted NHWC
    batch is already channels_last in memory, which the convolutions prefer.
    """

    def __init__(
        self,
        id: str,
        backbone: torch.nn.Module,
        dim: int,
        preprocessing: Preprocessing,
        weights_hash: str,
        description: str = "",
    ):
        super().__init__()
        self.id = id
        self.backbone = backbone.eval()
        self.dim = int(dim)
        self.preprocessing = preprocessing
        self.weights_hash = weights_hash
        self.description = description
        # How to build it again: {"name": registry name, "options": {...}} (create_encoder
        # sets it); saved with fingerprints so a trained classifier can extract new slides.
        self.spec: dict = {}
        std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
        mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        # (x/255 - mean)/std as one multiply-add: x*scale + shift.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.precision = "fp32"
        self.channels_last = True  # the layout batches reach the backbone in (see encode)
        self._forward = self.backbone
        self.calibration: dict | None = None  # int8 only: agreement with fp32
        self.stain_norm = None  # a per-patch StainNormalizer applied before the backbone

    @property
    def hash(self) -> str:
        """Weights, preprocessing and stain normalisation together: what makes two
        extractions comparable."""
        settings = {"weights": self.weights_hash, "pre": self.preprocessing.to_dict()}
        if self.stain_norm is not None:
            settings["stain_norm"] = self.stain_norm.digest
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def stain_norm_key(self) -> str:
        """'none', or the normaliser's method and digest (settings and target image)."""
        if self.stain_norm is None:
            return "none"
        return f"{self.stain_norm.config.method}:{self.stain_norm.digest}"

    def with_stain_norm(self, normaliser) -> Encoder:
        """Normalise every batch's stains before the backbone, patch by patch, with a
        ``fpstore.slides.stain.StainNormalizer`` (``per="patch"``: a patch's features depend
        on its own pixels only, whichever slides share its batch); the id gains ``+<method>``
        (``stain_normalised_id``), so both settings can share a store. Returns self."""
        if normaliser.config.per != "patch":
            raise EncoderError(
                f"encoder {self.id}: stain normalisation in the encoder is per patch (batches "
                f"mix slides); got per={normaliser.config.per!r}"
            )
        self.stain_norm = normaliser
        self.id = stain_normalised_id(self.id, normaliser.config.method)
        return self

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def prepare(
        self,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
    ) -> Encoder:
        """Move to ``device`` and choose the arithmetic; returns self.

        ``precision`` bf16/fp16 runs the backbone under autocast (outputs stay float32);
        int8 (CPU only) needs :meth:`calibrate` before the first batch.
        ``compile`` wraps the backbone in torch.compile (pays off on CUDA, for long runs).
        """
        check_choice("Encoder", "precision", precision, PRECISIONS)
        device = torch.device(device)
        if precision == "fp16" and device.type != "cuda":
            raise EncoderError("precision 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
        if precision == "int8" and (device.type != "cpu" or compile):
            raise EncoderError(
                f"precision 'int8' is a CPU path without --compile (got device "
                f"{device.type}, compile={compile}); on CUDA use 'bf16'"
            )
        set_backend_flags(device.type)
        self.to(device)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.precision = precision
        self._forward = torch.compile(self.backbone) if compile else self.backbone
        self.calibration = None
        return self

    def calibrate(self, pixels: torch.Tensor) -> dict:
        """int8: quantize the backbone statically, with activation ranges from the even
        patches of ``pixels`` (uint8 NHWC); returns the cosine agreement with fp32 on the odd
        ones, which the quantized model never saw."""
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        if self.precision != "int8":
            raise EncoderError(f"calibrate() is for precision 'int8', not {self.precision!r}")
        if len(pixels) < 4:
            raise EncoderError(
                f"int8 calibration needs at least 4 tissue patches, got {len(pixels)}"
            )
        with torch.inference_mode():
            x = self.normalise(pixels)
        fit, held_out = x[0::2], x[1::2]
        # torch.ao's FX quantization warns that torchao succeeds it; the pinned torch ships it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                observed = prepare_fx(
                    copy.deepcopy(self.backbone).to(memory_format=torch.contiguous_format),
                    get_default_qconfig_mapping("x86"),
                    (fit[:1],),
                )
            except Exception as error:  # FX cannot trace every backbone (timm's dynamic ones)
                raise EncoderError(
                    f"encoder {self.id} cannot be quantized to int8 ({error}); use --precision fp32"
                ) from error
            with torch.inference_mode():
                for start in range(0, len(fit), 32):
                    observed(fit[start : start + 32])
                quantized = convert_fx(observed)
                reference = self.backbone(held_out).float().flatten(1)
                approx = quantized(held_out).float().flatten(1)
        cosine = torch.nn.functional.cosine_similarity(approx, reference).numpy()
        self._forward = quantized
        self.calibration = {
            "n_fit": len(fit),
            "n_check": len(held_out),
            "min_cosine": round(float(cosine.min()), 6),
            "median_cosine": round(float(np.median(cosine)), 6),
        }
        return self.calibration

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] normalised, channels_last strides (the
        stains first, when ``with_stain_norm`` set a normaliser)."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise EncoderError(
                f"encoder {self.id} takes uint8 batches [N, H, W, 3], got {batch.dtype} "
                f"{tuple(batch.shape)}"
            )
        batch = batch.to(self.device, non_blocking=True)
        if self.stain_norm is not None:  # the whole batch at once, on the encoder's device
            batch = self.stain_norm.transform_tensor(batch)
        x = batch.permute(0, 3, 1, 2).float()
        return torch.addcmul(self.shift, x, self.scale)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a uint8 NHWC batch: float32 [N, dim] on the encoder's device."""
        x = self.normalise(batch)
        if not self.channels_last:  # else a channels_last input makes the convolutions so
            x = x.contiguous()
        if self.precision == "int8" and self.calibration is None:
            raise EncoderError("precision 'int8': call calibrate() with tissue patches first")
        if self.precision in ("fp32", "int8"):
            out = self._forward(x)
        else:
            with torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision]):
                out = self._forward(x)
        return out.float().flatten(1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.encode(batch)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "dim": self.dim,
            "hash": self.hash,
            "weights_hash": self.weights_hash,
            "preprocessing": self.preprocessing.to_dict(),
            "stain_norm": None if self.stain_norm is None else self.stain_norm.describe(),
            "description": self.description,
            "spec": self.spec,
        }


def state_dict_hash(module: torch.nn.Module) -> str:
    """A content hash of a module's weights (names, shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict_file(path: Path, fix: str = "pass weights=PATH to a local file") -> dict:
    """A state dict from a safetensors file or a torch file (``weights_only``); errors are
    one line ending with ``fix``."""
    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist; {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's to fix
        # torch's weights_only refusal is a page that suggests weights_only=False: not ours
        # to pass on; a short reason (safetensors' header errors) is kept.
        first = (str(error).strip().splitlines() or [""])[0]
        first = first if 0 < len(first) <= 100 else type(error).__name__
        raise EncoderError(
            f"cannot read weights {path} ({first}): not a safetensors file or a torch state "
            f"dict; {fix}"
        ) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"weights {path} is not a state dict of tensors; {fix}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_state_dict(model: torch.nn.Module, state: dict, what: str, fix: str) -> None:
    """Refuse ``state`` unless its names and shapes are exactly ``model``'s (works on the
    ``meta`` device): one line, ``what`` (which file, which model), the differences, ``fix``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {expected[k]}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        found = [
            f"{label} {len(items)} (e.g. {', '.join(items[:3])})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape", shapes),
            )
            if items
        ]
        raise EncoderError(f"{what}: {'; '.join(found)}; {fix}")


def load_weights(model: torch.nn.Module, path: Path, arch: str) -> None:
    """Load ``path`` into ``model`` strictly; names and shapes are checked first, so a wrong
    file leaves the model untouched."""
    state = load_state_dict_file(path)
    check_state_dict(
        model, state, f"weights {path} do not fit {arch}", "pass the weights of that architecture"
    )
    model.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class PrecisionChoice:
    """The arithmetic a run uses and why: ``precision`` is one of PRECISIONS."""

    precision: str
    reason: str

    def describe(self) -> str:
        return f"{self.precision} ({self.reason})"


def native_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The NATIVE_BF16_FLAGS this CPU has (``cpuinfo``: the text of /proc/cpuinfo; read
    when None). Empty where there is no /proc/cpuinfo (macOS, Windows): fp32 there."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def resolve_precision(precision: str, device: str | torch.device) -> PrecisionChoice:
    """The precision to run on ``device`` ('cpu' or 'cuda'), with the reason.

    'auto': bf16 on a GPU with bf16 units (compute capability 8.0 and later) and on a CPU
    with native bf16 (AMX or AVX-512 BF16), where it runs 2x fp32 with fingerprints at
    cosine >= 0.9999 to fp32; fp32 elsewhere. int8 is never chosen: it is an explicit
    option. Any other value is the user's choice and is kept.
    """
    check_choice("precision", "precision", precision, PRECISION_CHOICES)
    if precision != "auto":
        return PrecisionChoice(precision, "asked for")
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", f"auto: {torch.cuda.get_device_name()} has bf16 units")
        return PrecisionChoice(
            "fp32", f"auto: {torch.cuda.get_device_name()} has no bf16 units (--precision fp16)"
        )
    flags = native_bf16_flags()
    if flags:
        return PrecisionChoice("bf16", f"auto: this CPU has native bf16 ({', '.join(flags)})")
    return PrecisionChoice(
        "fp32", "auto: this CPU has no native bf16 (no AMX or AVX-512 BF16); bf16 would be slower"
    )


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is an error."""
    check_choice("extract", "device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EncoderError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device
