"""Patient-level early stopping shared by the MIL head and the patch CNN."""

from __future__ import annotations

import copy

import numpy as np


class BestEpoch:
    """Keeps the weights of the best epoch on the early-stopping group; says when patience ran out."""

    def __init__(self, net, patience: int):
        self.net, self.patience = net, patience
        self.score, self.epoch, self.state = -np.inf, 0, copy.deepcopy(net.state_dict())

    def keep_last(self, epoch: int) -> None:
        """Without an early-stopping group the last epoch is the one kept."""
        self.score, self.epoch, self.state = float(epoch), epoch, self.net.state_dict()

    def stop_after(self, value: float, epoch: int) -> bool:
        """Record this epoch's early-stopping score; True when training should stop."""
        if value > self.score:
            self.score, self.epoch, self.state = value, epoch, copy.deepcopy(self.net.state_dict())
            return False
        return epoch - self.epoch >= self.patience

    def restore(self) -> None:
        self.net.load_state_dict(self.state)
        self.net.eval()
