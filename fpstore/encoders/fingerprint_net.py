"""The fingerprint network: a randomly initialised ResNet whose penultimate 512-D vector is
the fingerprint, plus a head over core classes.

Backbones: torchvision's ResNet34 (the paper's) and ResNet18, and ``resnet10-slim``, a ResNet
of one basic block per stage at half ResNet18's first width (32, 64, 128, 256 channels) with a
linear map of its pooled 256 features to the 512-D fingerprint. On two CPU cores it trains 4-5x
as many images a minute as ResNet18 (docs/results.md, issue 22), which in the demo's budget
buys the steps that teach it to tell patients apart; the paper's setting stays ResNet34.

Two heads: ``linear`` (the paper's: logits = W fp + b) and ``cosine`` (logits are the cosines
between the L2-normalised fingerprint and L2-normalised class weights; the loss scales them
and subtracts a margin from the true class, CosFace / AM-softmax). The cosine head trains the
fingerprint in the space the matching game and similarity search use (cosine), which is why
it learns to tell unseen patients apart in fewer steps. The head only matters in training.

An optional batch-norm neck (``neck=True``; BNNeck, Luo et al. 2019, from person
re-identification, which asks what the matching game asks: the same identity seen by another
camera) standardises the backbone's 512-D output before the head, with a learned scale and no
shift. The fingerprint is then the neck's output, while the pair loss compares the two
stainings before it (where BNNeck puts its metric loss). Without the neck the fingerprint is
the backbone's output. Measured on the matching game in docs/results.md (issue 22).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from fpstore.config import FINGERPRINT_ARCHS
from fpstore.errors import unknown_name

HEADS = ("linear", "cosine")
FINGERPRINT_DIM = 512
SLIM_WIDTHS = (32, 64, 128, 256)


class SlimResNet(nn.Module):
    """ResNet stem, one basic block per stage at ``SLIM_WIDTHS``, average pooling and a linear
    map to the 512-D fingerprint."""

    def __init__(self):
        super().__init__()
        first = SLIM_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, first, 7, 2, 3, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, width_in = [], first
        for stage, width in enumerate(SLIM_WIDTHS):
            stride = 1 if stage == 0 else 2
            shortcut = None
            if stride != 1 or width_in != width:
                shortcut = nn.Sequential(
                    nn.Conv2d(width_in, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks.append(BasicBlock(width_in, width, stride, shortcut))
            width_in = width
        self.stages = nn.Sequential(*blocks)
        self.project = nn.Linear(width_in, FINGERPRINT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _backbone(arch: str) -> nn.Module:
    """The architecture without a classifier: images -> [N, FINGERPRINT_DIM]."""
    if arch == "resnet10-slim":
        return SlimResNet()
    backbone = getattr(torchvision.models, arch)(weights=None)
    backbone.fc = nn.Identity()  # both torchvision ResNets pool to 512 features
    return backbone


class CosineHead(nn.Module):
    """cos(fingerprint, class weight) per class, in [-1, 1] (scale and margin: the loss's)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, fp: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            nn.functional.normalize(fp.float(), dim=1),
            nn.functional.normalize(self.weight.float(), dim=1),
        )


class FingerprintNet(nn.Module):
    """ResNet backbone (fc removed) [-> batch-norm neck] -> 512-D fingerprint -> head."""

    def __init__(
        self, n_classes: int, arch: str = "resnet34", head: str = "linear", neck: bool = False
    ):
        super().__init__()
        if arch not in FINGERPRINT_ARCHS:
            raise unknown_name("architecture", arch, FINGERPRINT_ARCHS)
        if head not in HEADS:
            raise unknown_name("head", head, HEADS)
        self.arch, self.head_kind = arch, head
        self.dim = FINGERPRINT_DIM
        self.backbone = _backbone(arch)
        self.neck = nn.BatchNorm1d(self.dim) if neck else nn.Identity()
        if neck:
            self.neck.bias.requires_grad_(False)  # a scale only: standardised, not shifted
        self.head = (
            nn.Linear(self.dim, n_classes) if head == "linear" else CosineHead(self.dim, n_classes)
        )

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    @property
    def has_neck(self) -> bool:
        return isinstance(self.neck, nn.BatchNorm1d)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fingerprints [N, 512] of normalised images [N, 3, H, W]."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the vectors the pair loss compares: the backbone's, before any neck; logits) from
        one pass through the backbone."""
        fp = self.backbone(x)
        return fp, self.head(self.neck(fp))


def to_input(
    batch: torch.Tensor,
    mean,
    std,
    out_px: int | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC (or float NCHW in [0, 1]) on any device -> normalised float NCHW.

    Normalisation runs on the batch's device so that only uint8 crosses the bus.
    """
    x = batch.permute(0, 3, 1, 2).float().div_(255.0) if batch.dtype == torch.uint8 else batch
    if out_px is not None and x.shape[-1] != out_px:
        x = nn.functional.interpolate(
            x, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False
        )
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
