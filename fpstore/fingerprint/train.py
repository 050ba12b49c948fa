"""Training the fingerprint network.

Patches are random crops of the LEFT halves of the training cores; the class is the
physical core (the same core in every serial section). Accuracy on fixed crops of the RIGHT
halves is monitored every ``eval_every`` steps; training stops when it has not improved for
``patience`` evaluations, or when ``max_minutes`` of training are spent, and the best weights
are kept. With restyled copies (stain invariance) each crop comes with its twin from a
restyled copy and the paper's pair loss is used (``fpstore.fingerprint.losses``).

Objectives (``TrainConfig.objective``): ``paper`` (the default) is the paper's linear head
and cross entropy; ``cosface`` puts a cosine head with an additive margin under the same loss,
so that the fingerprints are trained in the cosine space the matching game uses; ``sets`` keeps
the paper's head and CE and draws batches of classes x 2 regions x 2 crops (``SetStream``),
adding a contrast between the mean fingerprints of two regions of each class
(``fpstore.fingerprint.losses.set_contrast``): what the matching game compares. Measured
against each other on the matching game in docs/results.md.

Crops are resized to the network's input side before augmentation, so that stain jitter and
the photometric augmentations work on out_px pixels, not patch_px.

Precision ``auto`` (``fpstore.encoders.base.resolve_precision``): bf16 autocast on GPUs with
bf16 units and on CPUs with native bf16 (AMX, AVX-512 BF16), fp32 elsewhere (bf16 autocast
measured several times slower on CPUs without native bf16); the choice and why are printed
and kept in the result (and so in the checkpoint). channels_last on CUDA and with bf16;
threads as torch sets them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from fpstore.config import (
    DEVICES,
    FINGERPRINT_ARCHS,
    TRAIN_PRECISIONS,
    check_choice,
    check_range,
    set_backend_flags,
)
from fpstore.encoders.base import PrecisionChoice, resolve_precision
from fpstore.encoders.fingerprint_net import FingerprintNet, to_input
from fpstore.errors import ConfigError, TrainingError
from fpstore.fingerprint.augment import AugmentConfig, augment_pair
from fpstore.fingerprint.data import (
    REGIONS,
    SET_CROPS,
    CoreSet,
    CropStream,
    SetStream,
    class_ids,
    fixed_crops,
    gather,
)
from fpstore.fingerprint.losses import DEFAULT_GAMMA, Margin, fingerprint_loss, set_loss
from fpstore.slides.stain import StainAugmentConfig, stain_jitter

PRECISIONS = ("auto", *TRAIN_PRECISIONS)
# objective -> the network's head (fpstore.encoders.fingerprint_net.HEADS)
OBJECTIVES = {"paper": "linear", "cosface": "cosine", "sets": "linear"}


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet34"
    patch_px: int = 224  # crop side in cache pixels (0.5 um/px: 112 um)
    out_px: int = 224  # network input side; smaller than patch_px = downsampled crops
    batch_size: int = 64
    max_steps: int = 20_000
    # training minutes (evaluations excluded): the run stops when they are spent and its
    # learning-rate schedule runs over whichever of steps and minutes ends first, so a slow
    # CPU trains fewer steps, each on the schedule's full course (None: steps alone)
    max_minutes: float | None = None
    eval_every: int = 500
    patience: int = 6  # evaluations without improvement before stopping
    min_delta: float = 0.002  # an improvement smaller than this does not reset patience
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    gamma: float = DEFAULT_GAMMA
    label_smoothing: float = 0.0  # of the cross entropies: targets (1 - e) on the class, e spread
    bn_neck: bool = False  # a batch-norm neck before the head; the fingerprint is read after it
    objective: str = "paper"  # "cosface": a cosine head with an additive margin; "sets": below
    scale: float = 16.0  # cosface: logits = scale * (cos - margin on the true class)
    margin: float = 0.2
    set_temperature: float = 0.1  # sets: the region contrast's temperature and weight beside CE
    set_weight: float = 1.0
    eval_per_half: int = 8  # monitoring crops per right half
    num_workers: int = 6
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where the device has bf16 units, else fp32
    compile: bool = False  # torch.compile on CUDA (a minute of compiling, ~30% faster steps)
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # H&E stain jitter (Tellez et al. 2019): each crop is seen as two independent jitters, the
    # pair loss pulls their fingerprints together (``train-fingerprint --stain hed``)
    stain_jitter: StainAugmentConfig | None = None

    def __post_init__(self):
        check_choice("TrainConfig", "arch", self.arch, FINGERPRINT_ARCHS)
        check_range("TrainConfig", "patch_px", self.patch_px, 16, 1600)
        check_range("TrainConfig", "out_px", self.out_px, 16, 1600)
        check_range("TrainConfig", "batch_size", self.batch_size, 2, 4096)
        check_range("TrainConfig", "max_steps", self.max_steps, 1)
        if self.max_minutes is not None:
            check_range("TrainConfig", "max_minutes", self.max_minutes, 0.01, 100_000.0)
        check_range("TrainConfig", "eval_every", self.eval_every, 1)
        check_range("TrainConfig", "patience", self.patience, 1)
        check_range("TrainConfig", "lr", self.lr, 1e-7, 10.0)
        check_range("TrainConfig", "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("TrainConfig", "warmup_steps", self.warmup_steps, 0)
        check_range("TrainConfig", "gamma", self.gamma, 0.0, 100.0)
        check_range("TrainConfig", "label_smoothing", self.label_smoothing, 0.0, 0.5)
        check_choice("TrainConfig", "objective", self.objective, tuple(OBJECTIVES))
        check_range("TrainConfig", "scale", self.scale, 1.0, 128.0)
        check_range("TrainConfig", "margin", self.margin, 0.0, 1.0)
        check_range("TrainConfig", "set_temperature", self.set_temperature, 0.01, 10.0)
        check_range("TrainConfig", "set_weight", self.set_weight, 0.0, 100.0)
        per_set = REGIONS * SET_CROPS
        if self.objective == "sets" and self.batch_size % per_set:
            raise ConfigError(
                f"TrainConfig.batch_size {self.batch_size}: the sets objective draws classes x "
                f"{REGIONS} regions x {SET_CROPS} crops; give a multiple of {per_set}"
            )
        check_range("TrainConfig", "eval_per_half", self.eval_per_half, 1, 256)
        check_range("TrainConfig", "num_workers", self.num_workers, 0, 64)
        check_choice("TrainConfig", "device", self.device, DEVICES)
        check_choice("TrainConfig", "precision", self.precision, PRECISIONS)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def loss_margin(self) -> Margin | None:
        return Margin(self.scale, self.margin) if self.head == "cosine" else None


# demo: minutes on 2 CPU cores (resnet10-slim, 112 um crops seen at 112 px = 1 um/px, a
# batch-norm neck; its steps, learning rate and neck measured on the matching game:
# docs/results.md, issue 22). A CPU
# with native bf16 trains the 1,440 steps in 3.5-4.5 minutes; an AVX2-only one (fp32) stops
# at 5 minutes with fewer steps, so that the demo stays within its quarter hour there.
# full: the paper's setting for a GPU (resnet34, 224 px at 0.5 um/px).
CONFIGS = {
    "demo": TrainConfig(
        arch="resnet10-slim",
        patch_px=224,
        out_px=112,
        batch_size=32,
        max_steps=1440,
        max_minutes=5.0,
        eval_every=240,
        lr=3e-3,
        bn_neck=True,
        patience=3,
        warmup_steps=20,
        eval_per_half=2,
        num_workers=0,
    ),
    "full": TrainConfig(eval_per_half=4),
}


def get_config(name: str, **overrides) -> TrainConfig:
    """The configuration ``name`` with the ``overrides`` that are not None."""
    if name not in CONFIGS:
        check_choice("train", "config", name, sorted(CONFIGS))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "max_steps" in overrides:  # steps asked for are trained, unless minutes are asked too
        overrides.setdefault("max_minutes", None)
    return replace(CONFIGS[name], **overrides)


def resolve_device(device: str) -> torch.device:
    check_choice("train", "device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


@dataclass
class TrainResult:
    model: FingerprintNet
    preprocessing: dict
    classes: list[str]
    class_patients: list[str]
    best_accuracy: float
    best_step: int
    steps: int
    stopped: str  # "plateau", "max_steps" or "max_minutes"
    seconds: float
    images_per_s: float
    history: list[dict]
    precision: PrecisionChoice = PrecisionChoice("fp32", "asked for")

    def summary(self) -> dict:
        return {
            "precision": self.precision.precision,
            "precision_reason": self.precision.reason,
            "best_right_half_accuracy": self.best_accuracy,
            "best_step": self.best_step,
            "steps": self.steps,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
            "images_per_s": round(self.images_per_s, 1),
            "n_classes": len(self.classes),
        }


def _source(array):
    """A memory-mapped array travels to DataLoader workers as its path."""
    if isinstance(array, np.memmap) and array.filename:
        return array.filename
    return array


def channel_stats(
    left: np.ndarray,
    tissue: np.ndarray,
    rows: np.ndarray,
    patch_px: int,
    n: int = 256,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of random training crops (the network's normalisation)."""
    stream = CropStream(left, rows, np.zeros(len(rows)), tissue[rows], patch_px, n, seed=seed)
    x = next(iter(stream))["x1"].numpy().reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(axis=0).round(5).tolist(), np.maximum(x.std(axis=0), 1e-3).round(5).tolist()


def _lr_factor(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Linear warm-up, then a cosine decay whose progress is the larger of the steps' share
    and ``time_used``, the share of ``max_minutes`` spent."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(progress, time_used))))


@torch.no_grad()
def evaluate(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    pre: dict,
    device,
    channels_last: bool,
    batch_size: int = 128,
    bf16: bool | None = None,
) -> float:
    """Patch accuracy of predicting the core class from uint8 crops (``bf16`` autocast;
    None: on CUDA)."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        x = to_input(batch, pre["mean"], pre["std"], pre["out_px"], channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x).argmax(dim=1).cpu().numpy()
        correct += int((pred == labels[start : start + batch_size]).sum())
    model.train()
    return correct / max(1, len(images))


def _classes(cores: CoreSet, rows, style):
    """(rows, class id per row, class keys, {class key: patient}) with the checks a run needs."""
    rows = np.arange(len(cores)) if rows is None else np.asarray(rows, np.int64)
    if len(rows) == 0:
        raise TrainingError("no training cores selected")
    if style is not None and style not in cores.restyled:
        raise TrainingError(
            f"no restyled copies {style!r} in the cores (have: {sorted(cores.restyled) or 'none'})"
        )
    labels, classes = class_ids(cores.key[rows])
    if len(classes) < 2:
        raise TrainingError(f"training needs at least 2 cores to tell apart, got {len(classes)}")
    patients = {str(k): str(p) for k, p in zip(cores.key[rows], cores.patient_id[rows])}
    return rows, labels, classes, patients


def _preprocessing(cores: CoreSet, rows: np.ndarray, cfg: TrainConfig) -> dict:
    """What the checkpoint's encoder needs to see patches as training saw them."""
    mean, std = channel_stats(
        _source(cores.left), cores.tissue_left, rows, cfg.patch_px, seed=cfg.seed
    )
    return {
        "mean": mean,
        "std": std,
        "patch_um": float(cores.mpp) * cfg.patch_px,
        "out_px": cfg.out_px,
        "mpp": float(cores.mpp) * cfg.patch_px / cfg.out_px,
    }


def _monitoring_set(cores: CoreSet, rows, labels, cfg: TrainConfig):
    """Fixed crops of the right halves and their classes: what early stopping watches."""
    crops = fixed_crops(
        cores.tissue_right[rows], cores.half_shape, cfg.patch_px, cfg.eval_per_half, cfg.seed
    )
    images = gather(cores.right, [(int(rows[i]), y, x) for i, y, x in crops], cfg.patch_px)
    return images, labels[[i for i, _, _ in crops]]


def _loader(cores: CoreSet, rows, labels, cfg: TrainConfig, style, pin: bool):
    args = (_source(cores.left), rows, labels, cores.tissue_left[rows], cfg.patch_px)
    kwargs = {
        "seed": cfg.seed,
        "restyled": _source(cores.restyled[style]) if style else None,
    }
    if cfg.objective == "sets":
        stream = SetStream(*args, cfg.batch_size, cores.patient_id[rows], **kwargs)
    else:
        stream = CropStream(*args, cfg.batch_size, **kwargs)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers else None,
    )


@dataclass
class _Best:
    """The best monitored accuracy so far, with its step and weights, and patience."""

    min_delta: float
    patience: int
    acc: float = -1.0
    step: int = 0
    state: dict | None = None
    since: int = 0

    def update(self, acc: float, step: int, model: torch.nn.Module) -> bool:
        """Record one evaluation; True when the run has plateaued."""
        if self.state is None or acc > self.acc + self.min_delta:
            self.acc, self.step, self.since = acc, step, 0
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return False
        self.since += 1
        return self.since >= self.patience


Probe = Callable[[FingerprintNet, dict], dict]


def train_network(
    cores: CoreSet,
    cfg: TrainConfig,
    rows: np.ndarray | None = None,
    style: str | None = None,
    progress: bool = True,
    probe: Probe | None = None,
) -> TrainResult:
    """Train a FingerprintNet on ``cores`` (the items ``rows``, default all).

    ``style`` names the restyled copies in ``cores.restyled`` to pair with the originals
    (the pair loss); None trains with cross entropy alone. ``probe(model, preprocessing)``,
    when given, runs at every evaluation (e.g. the matching game on a test array) and its
    figures join that evaluation's history record; its time does not count as training.
    """
    from tqdm import tqdm

    rows, labels, classes, patients = _classes(cores, rows, style)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    pre = _preprocessing(cores, rows, cfg)
    eval_images, eval_labels = _monitoring_set(cores, rows, labels, cfg)
    loader = _loader(cores, rows, labels, cfg, style, pin=device.type == "cuda")
    model = FingerprintNet(len(classes), cfg.arch, head=cfg.head, neck=cfg.bn_neck)
    stepper = Stepper(model, cfg, pre["mean"], pre["std"], device)
    if progress:
        print(f"precision {stepper.precision.describe()}", file=sys.stderr, flush=True)
    history: list[dict] = []
    best = _Best(cfg.min_delta, cfg.patience)
    stopped, seen, trained = "max_steps", 0, 0.0
    bar = tqdm(
        total=cfg.max_steps,
        desc="train fingerprint",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    window = (time.perf_counter(), 0)
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    batches = iter(loader)
    for step in range(1, cfg.max_steps + 1):
        batch = next(batches)
        if budget is not None:
            stepper.time_used = (trained + time.perf_counter() - window[0]) / budget
        parts = stepper(batch)
        seen += len(batch["y"]) * (2 if stepper.paired(batch) else 1)
        bar.update(1)
        out_of_time = stepper.time_used >= 1.0
        if step % cfg.eval_every and step != cfg.max_steps and not out_of_time:
            continue
        stepper.synchronize()  # queued steps belong to this window
        elapsed = time.perf_counter() - window[0]
        trained += elapsed
        acc = evaluate(
            model, eval_images, eval_labels, pre, device, stepper.channels_last, bf16=stepper.bf16
        )
        record = {
            "step": step,
            "train_seconds": round(trained, 1),
            "loss": round(parts.total.item(), 4),
            "ce": round(parts.ce1.item(), 4),
            "se": None if parts.se is None else round(parts.se.item(), 4),
            "set_nce": None if parts.nce is None else round(parts.nce.item(), 4),
            "right_half_accuracy": round(acc, 4),
            "images_per_s": round((seen - window[1]) / max(1e-9, elapsed), 1),
            "lr": float(stepper.scheduler.get_last_lr()[0]),
        }
        if probe is not None:
            record.update(probe(model.eval(), pre))
            model.train()
        history.append(record)
        bar.set_postfix(
            loss=record["loss"], acc=f"{acc:.3f}", img_s=f"{record['images_per_s']:.0f}"
        )
        if best.update(acc, step, model) or out_of_time:
            stopped = "max_minutes" if out_of_time else "plateau"
            break
        window = (time.perf_counter(), seen)  # evaluation time does not count as training
    bar.close()
    if progress and stopped == "max_minutes":
        print(
            f"training stopped at step {step} of {cfg.max_steps}: its {cfg.max_minutes:g} minutes "
            "are spent (--max-minutes)",
            file=sys.stderr,
            flush=True,
        )
    del batches, loader  # stops the DataLoader workers now, not at garbage collection
    assert best.state is not None  # the last step always evaluates
    model.load_state_dict(best.state)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    rates = [h["images_per_s"] for h in history]
    return TrainResult(
        model=model,
        preprocessing=pre,
        classes=[str(c) for c in classes],
        class_patients=[patients[str(c)] for c in classes],
        best_accuracy=round(best.acc, 4),
        best_step=best.step,
        steps=step,
        stopped=stopped,
        seconds=trained,
        images_per_s=float(np.median(rates)) if rates else 0.0,
        history=history,
        precision=stepper.precision,
    )


class Stepper:
    """One optimisation step on a batch from ``CropStream``: upload uint8, resize to the
    network's input, augment on the device, normalise, forward (bf16 autocast per
    ``cfg.precision``; channels_last on CUDA and with bf16), loss, backward."""

    def __init__(self, model: FingerprintNet, cfg: TrainConfig, mean, std, device: torch.device):
        self.cfg, self.mean, self.std, self.device = cfg, mean, std, device
        self.cuda = device.type == "cuda"
        set_backend_flags(device.type)
        self.precision = resolve_precision(cfg.precision, device)
        self.bf16 = self.precision.precision == "bf16"
        self.channels_last = self.cuda or self.bf16
        if (model.head_kind, model.has_neck) != (cfg.head, cfg.bn_neck):
            raise TrainingError(
                f"the config trains a {cfg.head} head (objective {cfg.objective!r}) with "
                f"bn_neck={cfg.bn_neck}; the network has a {model.head_kind} one with "
                f"neck={model.has_neck}: build it with FingerprintNet(..., head={cfg.head!r}, "
                f"neck={cfg.bn_neck})"
            )
        self.margin = cfg.loss_margin
        self.model = model.to(device).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = _Both(self.model)
        if cfg.compile and self.cuda:
            self.forward = torch.compile(self.forward)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.time_used = 0.0  # share of cfg.max_minutes spent, set by the training loop
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, cfg, self.time_used)
        )
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.stain_generator = torch.Generator().manual_seed(cfg.seed + 1)  # draws on the CPU

    def paired(self, batch: dict) -> bool:
        """Whether each crop is seen twice (a restyled twin or a second stain jitter; the
        sets objective sees each once)."""
        if self.cfg.objective == "sets":
            return False
        return "x2" in batch or self.cfg.stain_jitter is not None

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _upload(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC crops -> float NCHW in [0, 1] at the network's input side."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.cfg.out_px:
            x = torch.nn.functional.interpolate(
                x, size=(self.cfg.out_px,) * 2, mode="bilinear", antialias=True
            ).clamp_(0.0, 1.0)
        return x

    def __call__(self, batch: dict):
        cfg = self.cfg
        y = batch["y"].to(self.device, non_blocking=True)
        x1 = self._upload(batch["x1"])
        jitter = cfg.stain_jitter
        if not self.paired(batch):
            x1 = x1 if jitter is None else stain_jitter(x1, jitter, self.stain_generator)
            fp, logits = self._forward(augment_pair(x1, None, cfg.augment, self.generator)[0])
            if cfg.objective == "sets":
                parts = set_loss(
                    logits,
                    y,
                    fp,
                    SET_CROPS,
                    cfg.set_temperature,
                    cfg.set_weight,
                    smoothing=cfg.label_smoothing,
                )
            else:
                parts = fingerprint_loss(
                    logits, y, margin=self.margin, smoothing=cfg.label_smoothing
                )
        else:
            if jitter is not None:  # two independent jitters of each crop
                x2 = stain_jitter(x1, jitter, self.stain_generator)
                x1 = stain_jitter(x1, jitter, self.stain_generator)
            else:
                x2 = self._upload(batch["x2"])
            x1, x2 = augment_pair(x1, x2, cfg.augment, self.generator)
            fp, logits = self._forward(torch.cat([x1, x2]))
            n = len(y)
            parts = fingerprint_loss(
                logits[:n],
                y,
                logits[n:],
                fp[:n],
                fp[n:],
                gamma=cfg.gamma,
                margin=self.margin,
                smoothing=cfg.label_smoothing,
            )
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        return parts

    def _forward(self, x: torch.Tensor):
        """(fingerprints, logits) of float NCHW images in [0, 1]."""
        x = to_input(x, self.mean, self.std, channels_last=self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.forward(x)


class _Both(torch.nn.Module):
    """(fingerprints, logits) as ``forward``, so that torch.compile sees the whole step."""

    def __init__(self, model: FingerprintNet):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_both(x)
