"""The paper's MIL head: Linear(dim, 8), ReLU, Linear(8, 1), tanh per patch; patient = mean.

Trained on bags (patients) with labels mapped to {-1, +1}. Loss: mean squared error between
the patient's mean patch score and its label, weighted so both classes count equally. MSE
matches the tanh output range and the paper's ±1 targets; the class weights keep a head on an
imbalanced marker (Her2 is ~15% positive) from collapsing onto the majority class. Early
stopping keeps the epoch with the best patient-level AUC on the early-stopping group.

Speed: all training patches live in one tensor, shuffled by bag once per fit; a batch of bags
is a contiguous slice and one ``index_add_`` (segment sum), so an epoch copies no patches and
costs two thin matrix products over them (forward and backward of the 512 x 8 layer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from fpstore.classify.bags import Bags, PatchMeanScores
from fpstore.classify.earlystop import BestEpoch
from fpstore.classify.metrics import auc
from fpstore.config import check_choice, check_range
from fpstore.errors import ClassifyError

_CHUNK = 65536  # patches per forward pass at prediction time


@dataclass(frozen=True)
class MILConfig:
    hidden: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_bags: int = 32
    max_epochs: int = 100
    patience: int = 10
    class_weight: str = "balanced"
    standardize: bool = True
    threads: int = 0  # 0: one thread for small problems, two for large (see _auto_threads)
    seed: int = 0

    def __post_init__(self):
        check_range("MILConfig", "hidden", self.hidden, 1, 4096)
        check_bag_training("MILConfig", self)


def check_bag_training(owner: str, cfg) -> None:
    """The checks on the training settings the torch bag heads share (lr, weight_decay,
    batch_bags, max_epochs, patience, threads, class_weight)."""
    check_range(owner, "lr", cfg.lr, 1e-7, 1.0)
    check_range(owner, "weight_decay", cfg.weight_decay, 0.0, 1.0)
    check_range(owner, "batch_bags", cfg.batch_bags, 1, 10**6)
    check_range(owner, "max_epochs", cfg.max_epochs, 1, 10**5)
    check_range(owner, "patience", cfg.patience, 1, 10**5)
    check_range(owner, "threads", cfg.threads, 0, 256)
    check_choice(owner, "class_weight", cfg.class_weight, ("balanced", "none"))


class MILNet(nn.Module):
    """Patch -> score in [-1, 1]: the paper's 512 x 8 linear, ReLU, 8 x 1 linear, tanh.

    Inputs are standardised with fixed per-feature ``mean`` / ``std`` buffers, folded into the
    first layer's weights at each call (W / std, b - W mean / std): the same function and
    gradients as scaling the inputs, without a scaled copy of every patch.
    """

    mean: torch.Tensor  # buffers, registered in __init__; declared here for their type
    inv_std: torch.Tensor

    def __init__(self, dim: int, hidden: int = 8, mean=None, std=None):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Tanh()
        )
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean))
        self.register_buffer(
            "inv_std", torch.ones(dim) if std is None else 1 / torch.as_tensor(std)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = cast(nn.Linear, self.layers[0])  # indexing a Sequential gives a Module
        weight = first.weight * self.inv_std
        hidden = nn.functional.linear(x, weight, first.bias - weight @ self.mean)
        return self.layers[1:](hidden).squeeze(-1)


def _auto_threads(threads: int, n_values: int) -> int:
    """Two threads only pay when a batch is large: on tiny tensors OpenMP's synchronisation
    costs more than the arithmetic (and far more on a shared, oversubscribed machine)."""
    if threads:
        return threads
    return 1 if n_values < 1_000_000 else min(2, os.cpu_count() or 1)


class _Threads:
    """Run torch with a fixed thread count, restoring the caller's afterwards."""

    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _moments(features: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training patches (chunked: no float64 copy of all)."""
    dim = features.shape[1]
    if not standardize:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    total, squares = np.zeros(dim), np.zeros(dim)
    for start in range(0, len(features), _CHUNK):
        chunk = features[start : start + _CHUNK]
        total += chunk.sum(axis=0, dtype=np.float64)
        squares += np.einsum("ij,ij->j", chunk, chunk, dtype=np.float64)
    mean = total / len(features)
    std = np.sqrt(np.maximum(squares / len(features) - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _early_stopping_value(bags: Bags, y, patch_scores: np.ndarray) -> float:
    """Patient-level AUC on the early-stopping group (minus the MSE if it has one class)."""
    y = np.asarray(y)
    sums = np.bincount(bags.bag_index, weights=patch_scores, minlength=bags.n_patients)
    scores = sums / np.maximum(bags.n_patches(), 1)
    if len(np.unique(y)) == 2:
        return auc(y, scores)
    return -float(np.mean((scores - np.where(y == 1, 1.0, -1.0)) ** 2))


def _batch_cuts(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch's batches of ``size`` consecutive bags of ``n``, cut at a random offset:
    batch b is bags cuts[b]:cuts[b + 1]."""
    offset = rng.integers(1, size + 1) if n > size else n
    return np.unique(np.r_[0, np.arange(offset, n, size), n])


def _bag_weights(y: np.ndarray, class_weight: str) -> torch.Tensor:
    """Each bag's weight in the loss: 1, or "balanced" (each class weighs half)."""
    if class_weight == "balanced":
        weight = np.where(y == 1, len(y) / (2 * (y == 1).sum()), len(y) / (2 * (y == 0).sum()))
    else:
        weight = np.ones(len(y))
    return torch.from_numpy(weight.astype(np.float32))


class TorchBagHead:
    """What the torch heads over bags share: their config, the checks on the training labels,
    and the thread count for the batch size (``_fit`` is each head's own)."""

    config_class: type
    head_name: str
    _fit: Callable[..., None]

    def __init__(self, config=None):
        self.config = config

    @property
    def settings(self):
        return self.config or self.config_class()

    def fit(self, bags: Bags, y, eval_set: tuple[Bags, np.ndarray] | None = None):
        cfg = self.settings
        y = np.asarray(y)
        if len(y) != bags.n_patients:
            raise ClassifyError(f"{len(y)} labels for {bags.n_patients} bags")
        if len(np.unique(y)) != 2:
            raise ClassifyError(f"{self.head_name} needs training patients of both classes")
        batch_values = cfg.batch_bags * float(np.mean(bags.n_patches())) * bags.dim
        self.threads_ = _auto_threads(cfg.threads, int(batch_values))
        with _Threads(self.threads_):
            self._fit(bags, y, eval_set, cfg)
        return self


class MILHead(TorchBagHead, PatchMeanScores, ClassifierMixin, BaseEstimator):
    """scikit-learn-style estimator over ``Bags``: fit(bags, y, eval_set=(bags_es, y_es)).
    A patient's score is the mean of its patches' scores, in [-1, 1]."""

    config_class = MILConfig
    score_low = -1.0

    head_name = "the MIL head"

    def _fit(self, bags: Bags, y: np.ndarray, eval_set, cfg: MILConfig) -> None:
        self.mean_, self.std_ = _moments(bags.features, cfg.standardize)
        rng = np.random.default_rng(cfg.seed)
        # Shuffle the bags once (one copy of the patches, scaled on the way); each epoch then
        # cuts the shuffled sequence at a random offset into batches of consecutive bags, so a
        # batch is a view of contiguous rows and an epoch copies no patches.
        perm = rng.permutation(bags.n_patients)
        shuffled = bags.subset(perm)
        x = torch.from_numpy(shuffled.features)
        y = y[perm]
        counts = shuffled.n_patches()
        starts = np.concatenate([[0], np.cumsum(counts)])
        bag_index = torch.from_numpy(shuffled.bag_index)
        inv_counts = torch.from_numpy(1.0 / np.maximum(counts, 1).astype(np.float32))
        target = torch.from_numpy(np.where(y == 1, 1.0, -1.0).astype(np.float32))
        weight = _bag_weights(y, cfg.class_weight)
        if eval_set is not None:
            eval_bags, eval_y = eval_set
            eval_x = torch.from_numpy(eval_bags.features)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = MILNet(bags.dim, cfg.hidden, self.mean_, self.std_)
        optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best = BestEpoch(net, cfg.patience)
        self.history_ = []
        n, size = bags.n_patients, cfg.batch_bags
        for epoch in range(1, cfg.max_epochs + 1):
            net.train()
            cuts = _batch_cuts(n, size, rng)
            for b in rng.permutation(len(cuts) - 1):
                lo, hi = cuts[b], cuts[b + 1]
                scores = net(x[starts[lo] : starts[hi]])
                local = bag_index[starts[lo] : starts[hi]] - lo
                patient = torch.zeros(hi - lo).index_add_(0, local, scores) * inv_counts[lo:hi]
                w = weight[lo:hi]
                loss = (w * (patient - target[lo:hi]) ** 2).sum() / w.sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            if eval_set is None:
                best.keep_last(epoch)
                continue
            net.eval()
            with torch.no_grad():
                patch = net(eval_x).numpy()
            value = _early_stopping_value(eval_bags, eval_y, patch)
            self.history_.append(value)
            if best.stop_after(value, epoch):
                break
        best.restore()
        self.net_ = net
        self.best_epoch_ = best.epoch
        self.es_score_ = None if eval_set is None else best.score
        self.classes_ = np.array([0, 1])

    def patch_scores(self, bags: Bags) -> np.ndarray:
        """(N,) score in [-1, 1] per patch."""
        if not hasattr(self, "net_"):
            raise ClassifyError("the MIL head is not fitted; call fit first")
        if bags.dim != len(self.mean_):
            raise ClassifyError(
                f"features have dim {bags.dim}; the head was trained on {len(self.mean_)}"
            )
        out = np.empty(len(bags.bag_index), dtype=np.float32)
        with (
            torch.no_grad(),
            _Threads(_auto_threads(self.settings.threads, min(len(out), _CHUNK) * bags.dim)),
        ):
            for start in range(0, len(out), _CHUNK):
                chunk = torch.from_numpy(bags.features[start : start + _CHUNK])
                out[start : start + _CHUNK] = self.net_(chunk).numpy()
        return out

    def describe(self) -> dict:
        return {"method": "mil", **asdict(self.settings)}

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted network's weights and standardisation, as arrays."""
        if not hasattr(self, "net_"):
            raise ClassifyError("the MIL head is not fitted; call fit first")
        state = {k: v.numpy() for k, v in self.net_.state_dict().items()}
        return {**state, "std": self.std_}

    def set_state(self, state: dict[str, np.ndarray]) -> MILHead:
        """A fitted head from ``get_state``'s arrays (the config must match: hidden units)."""
        std = np.asarray(state["std"], np.float32)
        weights = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k != "std"}
        net = MILNet(len(std), self.settings.hidden)
        try:
            net.load_state_dict(weights)
        except RuntimeError as error:
            raise ClassifyError(
                f"saved MIL weights do not fit the head's config: {' '.join(str(error).split())}"
            ) from None
        self.net_ = net.eval()
        self.mean_, self.std_ = weights["mean"].numpy(), std
        self.classes_ = np.array([0, 1])
        return self
