"""Gated attention MIL (ABMIL; Ilse, Tomczak and Welling, ICML 2018), the head peers ship.

Per patch: standardised features -> Linear(dim, hidden), ReLU -> h. Gated attention:
a = softmax over the patient's patches of w . (tanh(V h) * sigmoid(U h)). Patient logit:
c . (sum_i a_i h_i) + b. Trained with class-balanced binary cross-entropy on the logit; early
stopping keeps the epoch with the best patient-level AUC on the early-stopping group, as the
paper's MIL head does.

Patch outputs, for heatmaps and the run's tables: ``patch_attention`` is a_i (sums to 1 per
patient: where the head looked) and ``patch_scores`` is each patch's share of the logit,
n a_i (c . h_i + b), whose mean over the patient's n patches is the patient's logit (the
linear classifier commutes with the attention sum), so the CV harness's "patient = mean of
its patches" holds and the heatmap shows which patches pushed the call which way.

Speed: as in the MIL head, all patches live in one tensor shuffled by bag once per fit; a
batch is a contiguous slice, and the per-patient softmax and sum are segment operations
(``scatter_reduce_`` for the max, ``index_add_`` for the sums): no padding, no per-bag loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from fpstore.classify.bags import Bags
from fpstore.classify.earlystop import BestEpoch
from fpstore.classify.metrics import auc
from fpstore.classify.mil import (
    TorchBagHead,
    _auto_threads,
    _bag_weights,
    _batch_cuts,
    _moments,
    _Threads,
    check_bag_training,
)
from fpstore.config import check_range
from fpstore.errors import ClassifyError

_CHUNK_BAGS = 256  # patients per forward pass at prediction time


@dataclass(frozen=True)
class ABMILConfig:
    hidden: int = 64  # the patch embedding
    attention: int = 32  # the gated attention's inner size
    dropout: float = 0.1  # on the embedding, while training
    lr: float = 1e-3
    # Stronger than the MIL head's: the embedding has 8x its weights and overfits a few
    # hundred patients within a few epochs otherwise.
    weight_decay: float = 1e-2
    batch_bags: int = 16
    max_epochs: int = 100
    patience: int = 10
    class_weight: str = "balanced"
    standardize: bool = True
    threads: int = 0  # 0: one thread for small problems, two for large (as the MIL head)
    seed: int = 0

    def __post_init__(self):
        check_range("ABMILConfig", "hidden", self.hidden, 1, 4096)
        check_range("ABMILConfig", "attention", self.attention, 1, 4096)
        check_range("ABMILConfig", "dropout", self.dropout, 0.0, 0.9)
        check_bag_training("ABMILConfig", self)


class ABMILNet(nn.Module):
    """Patches of consecutive bags -> (patient logits, attention, patch logits).

    Standardisation is folded into the first layer (W / std, b - W mean / std), as in
    ``MILNet``: no scaled copy of the patches.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self, dim: int, hidden: int, attention: int, dropout: float = 0.0, mean=None, std=None
    ):
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.gate_v = nn.Linear(hidden, attention)
        self.gate_u = nn.Linear(hidden, attention)
        self.attend = nn.Linear(attention, 1)
        self.classify = nn.Linear(hidden, 1)
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean))
        self.register_buffer(
            "inv_std", torch.ones(dim) if std is None else 1 / torch.as_tensor(std)
        )

    def forward(self, x: torch.Tensor, bag: torch.Tensor, n_bags: int):
        """``bag``: (N,) index of each patch's patient in 0..n_bags-1."""
        weight = self.embed.weight * self.inv_std
        h = torch.relu(nn.functional.linear(x, weight, self.embed.bias - weight @ self.mean))
        h = self.drop(h)
        gate = torch.tanh(self.gate_v(h)) * torch.sigmoid(self.gate_u(h))
        raw = self.attend(gate).squeeze(-1)
        top = torch.full((n_bags,), -torch.inf).scatter_reduce_(0, bag, raw.detach(), "amax")
        e = torch.exp(raw - top[bag])
        a = e / torch.zeros(n_bags).index_add_(0, bag, e)[bag]
        patch_logit = self.classify(h).squeeze(-1)  # c . h_i + b
        patient = torch.zeros(n_bags).index_add_(0, bag, a * patch_logit)
        return patient, a, patch_logit


def _es_value(y: np.ndarray, logits: np.ndarray) -> float:
    """Patient-level AUC on the early-stopping group (minus the log-loss if one class)."""
    if len(np.unique(y)) == 2:
        return auc(y, logits)
    p = 1 / (1 + np.exp(-np.clip(logits, -30, 30)))
    return float(np.mean(np.log(np.where(y == 1, p, 1 - p) + 1e-12)))


class ABMILHead(TorchBagHead, ClassifierMixin, BaseEstimator):
    """scikit-learn-style estimator over ``Bags``: fit(bags, y, eval_set=(bags_es, y_es))."""

    config_class = ABMILConfig

    head_name = "the ABMIL head"

    def _fit(self, bags: Bags, y: np.ndarray, eval_set, cfg: ABMILConfig) -> None:
        self.mean_, self.std_ = _moments(bags.features, cfg.standardize)
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(bags.n_patients)
        shuffled = bags.subset(perm)
        x = torch.from_numpy(shuffled.features)
        y = y[perm]
        starts = np.concatenate([[0], np.cumsum(shuffled.n_patches())])
        bag_index = torch.from_numpy(shuffled.bag_index)
        target = torch.from_numpy(y.astype(np.float32))
        weight = _bag_weights(y, cfg.class_weight)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = ABMILNet(bags.dim, cfg.hidden, cfg.attention, cfg.dropout, self.mean_, self.std_)
            optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            best = BestEpoch(net, cfg.patience)
            self.history_ = []
            n, size = bags.n_patients, cfg.batch_bags
            for epoch in range(1, cfg.max_epochs + 1):
                net.train()
                cuts = _batch_cuts(n, size, rng)
                for b in rng.permutation(len(cuts) - 1):
                    lo, hi = cuts[b], cuts[b + 1]
                    local = bag_index[starts[lo] : starts[hi]] - lo
                    logit, _, _ = net(x[starts[lo] : starts[hi]], local, int(hi - lo))
                    w = weight[lo:hi]
                    loss = (
                        nn.functional.binary_cross_entropy_with_logits(
                            logit, target[lo:hi], weight=w, reduction="sum"
                        )
                        / w.sum()
                    )
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                if eval_set is None:
                    best.keep_last(epoch)
                    continue
                self.net_ = net.eval()
                value = _es_value(np.asarray(eval_set[1]), self._forward(eval_set[0])[0])
                self.history_.append(value)
                if best.stop_after(value, epoch):
                    break
        best.restore()
        self.net_ = net
        self.best_epoch_ = best.epoch
        self.es_score_ = None if eval_set is None else best.score
        self.classes_ = np.array([0, 1])

    def _forward(self, bags: Bags) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P,) patient logits, (N,) attention, (N,) patch logits c . h_i + b (eval mode)."""
        if not hasattr(self, "net_"):
            raise ClassifyError("the ABMIL head is not fitted; call fit first")
        if bags.dim != len(self.mean_):
            raise ClassifyError(
                f"features have dim {bags.dim}; the head was trained on {len(self.mean_)}"
            )
        patient = np.zeros(bags.n_patients, np.float32)
        attention = np.empty(len(bags.bag_index), np.float32)
        patch = np.empty(len(bags.bag_index), np.float32)
        starts = np.concatenate([[0], np.cumsum(bags.n_patches())])
        threads = _auto_threads(
            self.settings.threads, int(np.mean(bags.n_patches()) * _CHUNK_BAGS * bags.dim)
        )
        with torch.no_grad(), _Threads(threads):
            for lo in range(0, bags.n_patients, _CHUNK_BAGS):
                hi = min(lo + _CHUNK_BAGS, bags.n_patients)
                a, b = starts[lo], starts[hi]
                if a == b:
                    continue
                local = torch.from_numpy(bags.bag_index[a:b] - lo)
                p, att, pl = self.net_(torch.from_numpy(bags.features[a:b]), local, int(hi - lo))
                patient[lo:hi], attention[a:b], patch[a:b] = p.numpy(), att.numpy(), pl.numpy()
        return patient, attention, patch

    def patch_attention(self, bags: Bags) -> np.ndarray:
        """(N,) attention per patch; each patient's sum to 1."""
        return self._forward(bags)[1]

    def patch_scores(self, bags: Bags) -> np.ndarray:
        """(N,) each patch's share of its patient's logit, n a_i (c . h_i + b): their mean
        over a patient is its logit."""
        _, attention, patch = self._forward(bags)
        n = bags.n_patches()[bags.bag_index].astype(np.float32)
        return n * attention * patch

    def decision_function(self, bags: Bags) -> np.ndarray:
        """(P,) patient logit (0 for a patient without patches)."""
        return self._forward(bags)[0].astype(np.float64)

    def predict_proba(self, bags: Bags) -> np.ndarray:
        p = 1 / (1 + np.exp(-self.decision_function(bags)))
        return np.column_stack([1 - p, p])

    def predict(self, bags: Bags) -> np.ndarray:
        return (self.decision_function(bags) > 0).astype(np.int8)

    def describe(self) -> dict:
        return {"method": "abmil", **asdict(self.settings)}

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted network's weights and standardisation, as arrays."""
        if not hasattr(self, "net_"):
            raise ClassifyError("the ABMIL head is not fitted; call fit first")
        state = {k: v.numpy() for k, v in self.net_.state_dict().items()}
        return {**state, "std": self.std_}

    def set_state(self, state: dict[str, np.ndarray]) -> ABMILHead:
        """A fitted head from ``get_state``'s arrays (the config must match its sizes)."""
        cfg = self.settings
        std = np.asarray(state["std"], np.float32)
        weights = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k != "std"}
        net = ABMILNet(len(std), cfg.hidden, cfg.attention)
        try:
            net.load_state_dict(weights)
        except RuntimeError as error:
            raise ClassifyError(
                f"saved ABMIL weights do not fit the head's config: {error}"
            ) from None
        self.net_ = net.eval()
        self.mean_, self.std_ = weights["mean"].numpy(), std
        self.classes_ = np.array([0, 1])
        return self
