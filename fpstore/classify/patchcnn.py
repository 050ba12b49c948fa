"""The paper's control: a CNN trained directly on labelled patches.

Each patch gets its patient's label; training minimises the patch-level cross-entropy; early
stopping uses the patient-level AUC of the early-stopping group, a patient's score being the
mean of its patches' probabilities (the paper: ResNet34; resnet18 by default, about 2.5x
faster on CPUs; the architecture is a setting). Patches come at 224 px whatever the encoders
resize to (``fpstore.classify.data.PIXELS_PX``). Precision ``auto``: bf16
autocast where the device has bf16 units (GPUs, CPUs with AMX or AVX-512 BF16), else fp32
(``fpstore.encoders.base.resolve_precision``); the fitted model says which and why.

Images come from a callable ``images(patch_ids) -> uint8 (n, H, W, 3)`` (the LMDB patch cache
in practice, see ``fpstore.classify.data.cache_images``), so the estimator needs no store.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn
from tqdm import tqdm

from fpstore.classify.bags import Bags, PatchMeanScores
from fpstore.classify.earlystop import BestEpoch
from fpstore.classify.metrics import auc
from fpstore.config import DEVICES, TRAIN_PRECISIONS, check_choice, check_range, set_backend_flags
from fpstore.encoders.base import resolve_precision
from fpstore.errors import ClassifyError

ARCHS = ("resnet18", "resnet34")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# (x / 255 - mean) / std as one multiply-add on uint8 pixels x
_SCALE, _SHIFT = 1 / (255 * _STD), -_MEAN / _STD


@dataclass(frozen=True)
class PatchCNNConfig:
    arch: str = "resnet18"
    weights: str | None = None  # a torchvision state dict to start from; None = random init
    max_epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where the device has bf16 units, else fp32
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        check_choice("PatchCNNConfig", "arch", self.arch, ARCHS)
        check_choice("PatchCNNConfig", "device", self.device, DEVICES)
        check_choice("PatchCNNConfig", "precision", self.precision, ("auto", *TRAIN_PRECISIONS))
        check_range("PatchCNNConfig", "max_epochs", self.max_epochs, 1, 10_000)
        check_range("PatchCNNConfig", "patience", self.patience, 1, 10_000)
        check_range("PatchCNNConfig", "batch_size", self.batch_size, 1, 4096)
        check_range("PatchCNNConfig", "lr", self.lr, 1e-8, 1.0)
        check_range("PatchCNNConfig", "threads", self.threads, 1, 256)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ClassifyError(
                f"patch-cnn weights {self.weights!r} not found; give a torchvision "
                f"{self.arch} state dict file, or none for random initialisation"
            )


def build_network(arch: str, weights: str | None) -> nn.Module:
    """A torchvision ResNet with one output logit; weights only from a local file."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net.load_state_dict(state, strict=False)
    net.fc = nn.Linear(net.fc.in_features, 1)
    return net


def _patch_ids(bags: Bags) -> np.ndarray:
    if bags.patch_ids is None:
        raise ClassifyError("patch-cnn needs patch ids in the bags")
    return bags.patch_ids


class PatchCNN(PatchMeanScores, ClassifierMixin, BaseEstimator):
    """fit(bags, y, eval_set) where bags carry patch_ids the ``images`` callable can read.
    A patient's score is the mean of its patches' probabilities."""

    config_class = PatchCNNConfig
    score_low = 0.0
    # Where training started from: a fitted model needs it no more (nor the file, elsewhere).
    training_only = ("weights",)

    def __init__(
        self,
        config: PatchCNNConfig | None = None,
        images: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.config = config
        self.images = images

    @property
    def settings(self) -> PatchCNNConfig:
        return self.config or PatchCNNConfig()

    def _device(self) -> torch.device:
        wanted = self.settings.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        set_backend_flags(wanted)
        return torch.device(wanted)

    def _batch(self, patch_ids: np.ndarray, augment: np.random.Generator | None) -> torch.Tensor:
        if self.images is None:
            raise ClassifyError("patch-cnn needs an image source (the patch cache); none given")
        array = np.asarray(self.images(patch_ids))
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ClassifyError(
                f"patch images must be uint8 (n, H, W, 3); got {array.dtype} {array.shape}"
            )
        # uint8 to the device (from pinned memory to a GPU: an asynchronous copy), turned
        # there while a quarter of float32's size, then normalised in one multiply-add.
        device = self._device()
        x = torch.from_numpy(array)
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
        if augment is not None:  # H&E has no orientation: flips and right-angle turns are free
            x = torch.rot90(x, int(augment.integers(4)), dims=(2, 3))
            if augment.random() < 0.5:
                x = x.flip(3)
        scale, shift = _SCALE.to(device), _SHIFT.to(device)
        return torch.addcmul(shift, x.float(), scale)

    def _logits(self, patch_ids: np.ndarray, augment: np.random.Generator | None):
        """float32 logits of the patches, under bf16 autocast when ``precision_`` is bf16."""
        x = self._batch(patch_ids, augment)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision_ == "bf16"):
            return self.net_(x).squeeze(1).float()

    def fit(self, bags: Bags, y, eval_set: tuple[Bags, np.ndarray] | None = None):
        cfg = self.settings
        y = np.asarray(y)
        patch_ids = _patch_ids(bags)
        if len(np.unique(y)) != 2:
            raise ClassifyError("patch-cnn needs training patients of both classes")
        old_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            self._fit(bags, patch_ids, y, eval_set, cfg)
        finally:
            torch.set_num_threads(old_threads)
        return self

    def _fit(
        self, bags: Bags, patch_ids: np.ndarray, y: np.ndarray, eval_set, cfg: PatchCNNConfig
    ) -> None:
        rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = build_network(cfg.arch, cfg.weights).to(self._device())
        self.net_ = net
        choice = resolve_precision(cfg.precision, self._device())
        self.precision_, self.precision_reason_ = choice.precision, choice.reason
        labels = torch.from_numpy(y[bags.bag_index].astype(np.float32))
        pos = float(labels.mean())
        # Weight positives so both classes count equally, as for the MIL head.
        loss_fn = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor((1 - pos) / max(pos, 1e-6)).to(self._device())
        )
        optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best = BestEpoch(net, cfg.patience)
        self.history_ = []
        for epoch in range(1, cfg.max_epochs + 1):
            net.train()
            order = rng.permutation(len(labels))
            batches = range(0, len(order), cfg.batch_size)
            for start in tqdm(
                batches,
                desc=f"patch-cnn epoch {epoch} ({self.precision_})",
                file=sys.stderr,
                leave=False,
                disable=len(batches) < 20,
            ):
                rows = order[start : start + cfg.batch_size]
                logits = self._logits(patch_ids[rows], rng)
                loss = loss_fn(logits, labels[rows].to(logits.device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            if eval_set is None:
                best.keep_last(epoch)
                continue
            es_bags, es_y = eval_set
            es_y = np.asarray(es_y)
            scores = self.decision_function(es_bags)
            value = (
                auc(es_y, scores)
                if len(np.unique(es_y)) == 2
                else -float(np.mean((scores - es_y) ** 2))
            )
            self.history_.append(value)
            if best.stop_after(value, epoch):
                break
        best.restore()
        self.best_epoch_ = best.epoch
        self.es_score_ = None if eval_set is None else best.score
        self.classes_ = np.array([0, 1])

    def patch_scores(self, bags: Bags) -> np.ndarray:
        """(N,) probability of the positive class per patch."""
        if not hasattr(self, "net_"):
            raise ClassifyError("patch-cnn is not fitted; call fit first")
        patch_ids = _patch_ids(bags)
        self.net_.eval()
        out = np.empty(len(bags.bag_index), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(out), self.settings.batch_size):
                ids = patch_ids[start : start + self.settings.batch_size]
                out[start : start + len(ids)] = torch.sigmoid(self._logits(ids, None)).cpu().numpy()
        return out

    def describe(self) -> dict:
        return {"method": "patch-cnn", **asdict(self.settings)}

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted network's state dict, as arrays."""
        if not hasattr(self, "net_"):
            raise ClassifyError("patch-cnn is not fitted; call fit first")
        return {k: v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}

    def set_state(self, state: dict[str, np.ndarray]) -> PatchCNN:
        net = build_network(self.settings.arch, None)
        try:
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        except RuntimeError as error:
            raise ClassifyError(
                f"saved patch-cnn weights do not fit a {self.settings.arch}: {error}"
            ) from None
        self.net_ = net.to(self._device()).eval()
        self.classes_ = np.array([0, 1])
        # Scores as a fitted model does: the precision its settings resolve to on this device.
        choice = resolve_precision(self.settings.precision, self._device())
        self.precision_, self.precision_reason_ = choice.precision, choice.reason
        return self
