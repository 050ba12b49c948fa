"""CycleGAN style transfer between the two sites of the training array (Zhu et al. 2017):
ResNet generators, 70x70 PatchGAN discriminators, least-squares GAN loss, cycle and
identity losses, Adam(2e-4, betas 0.5/0.999), a pool of 50 past fakes per discriminator.

Trained on random crops of the cores of each site; the generators are fully
convolutional, so they restyle whole core halves afterwards (``fpstore.fingerprint.stain``).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fpstore.config import check_range
from fpstore.errors import TrainingError


@dataclass(frozen=True)
class CycleGANConfig:
    ngf: int = 32  # generator width (the original: 64)
    ndf: int = 32  # discriminator width (the original: 64)
    n_blocks: int = 6  # residual blocks (the original: 9 at 256 px)
    crop_px: int = 128
    batch_size: int = 4
    steps: int = 2000
    lr: float = 2e-4
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # times lambda_cycle, as in the original code
    pool_size: int = 50
    seed: int = 0

    def __post_init__(self):
        check_range("CycleGANConfig", "ngf", self.ngf, 4, 256)
        check_range("CycleGANConfig", "ndf", self.ndf, 4, 256)
        check_range("CycleGANConfig", "n_blocks", self.n_blocks, 1, 32)
        check_range("CycleGANConfig", "crop_px", self.crop_px, 16, 1024)
        check_range("CycleGANConfig", "batch_size", self.batch_size, 1, 256)
        check_range("CycleGANConfig", "steps", self.steps, 1)
        check_range("CycleGANConfig", "lambda_cycle", self.lambda_cycle, 0.0, 1000.0)
        check_range("CycleGANConfig", "lambda_identity", self.lambda_identity, 0.0, 100.0)

    def to_dict(self) -> dict:
        return asdict(self)


CYCLEGAN_CONFIGS = {
    "demo": CycleGANConfig(ngf=16, ndf=16, n_blocks=3, crop_px=96, batch_size=2, steps=150),
    "full": CycleGANConfig(),
}


class ResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
        )

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 downsamplings, n residual blocks, two upsamplings, c7s1-3, tanh.
    Input and output in [-1, 1]; sides should be multiples of 4."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(3, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1
                ),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN: one real/fake score per overlapping 70 px patch."""

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ImagePool:
    """Past generated images, so the discriminator does not chase only the latest generator."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.images, self.rng = size, [], rng

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                k = self.rng.randrange(self.size)
                out.append(self.images[k])
                self.images[k] = image
            else:
                out.append(image)
        return torch.stack(out)


def to_unit(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return batch_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@dataclass
class CycleGAN:
    g_ab: ResnetGenerator  # site A style -> site B style
    g_ba: ResnetGenerator
    config: CycleGANConfig
    history: list[dict]
    sites: tuple[str, str]

    def state(self) -> dict:
        return {
            "g_ab": self.g_ab.state_dict(),
            "g_ba": self.g_ba.state_dict(),
            "config": self.config.to_dict(),
            "history": self.history,
            "sites": list(self.sites),
        }

    def save(self, path) -> None:
        torch.save(self.state(), path)

    @staticmethod
    def load(path) -> CycleGAN:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg = CycleGANConfig(**blob["config"])
        gens = []
        for name in ("g_ab", "g_ba"):
            g = ResnetGenerator(cfg.ngf, cfg.n_blocks)
            g.load_state_dict(blob[name])
            gens.append(g.eval())
        return CycleGAN(gens[0], gens[1], cfg, blob["history"], tuple(blob["sites"]))


def train_cyclegan(
    stream_a, stream_b, cfg: CycleGANConfig, sites=("A", "B"), device="cpu", progress: bool = True
) -> CycleGAN:
    """Train on two iterators of uint8 NHWC crops (site A, site B); returns the generators."""
    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    g_ab, g_ba = (
        ResnetGenerator(cfg.ngf, cfg.n_blocks).to(device),
        ResnetGenerator(cfg.ngf, cfg.n_blocks).to(device),
    )
    d_a, d_b = PatchDiscriminator(cfg.ndf).to(device), PatchDiscriminator(cfg.ndf).to(device)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(
        list(g_ab.parameters()) + list(g_ba.parameters()), lr=cfg.lr, betas=betas
    )
    opt_d = torch.optim.Adam(
        list(d_a.parameters()) + list(d_b.parameters()), lr=cfg.lr, betas=betas
    )
    # The original schedule: constant, then linear decay to zero over the second half.
    decay = torch.optim.lr_scheduler.LambdaLR
    sched = [decay(o, lambda s: min(1.0, 2.0 * (1 - s / cfg.steps))) for o in (opt_g, opt_d)]
    rng = random.Random(cfg.seed)
    pool_a, pool_b = ImagePool(cfg.pool_size, rng), ImagePool(cfg.pool_size, rng)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    lam, lam_id = cfg.lambda_cycle, cfg.lambda_cycle * cfg.lambda_identity
    history = []
    start = time.perf_counter()
    for step in tqdm(
        range(1, cfg.steps + 1),
        desc="train cyclegan",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    ):
        real_a = to_unit(next(stream_a).to(device))
        real_b = to_unit(next(stream_b).to(device))
        fake_b, fake_a = g_ab(real_a), g_ba(real_b)
        for d in (d_a, d_b):
            d.requires_grad_(False)
        pred_fb, pred_fa = d_b(fake_b), d_a(fake_a)
        loss_gan = mse(pred_fb, torch.ones_like(pred_fb)) + mse(pred_fa, torch.ones_like(pred_fa))
        loss_cycle = l1(g_ba(fake_b), real_a) + l1(g_ab(fake_a), real_b)
        loss_id = (
            l1(g_ab(real_b), real_b) + l1(g_ba(real_a), real_a)
            if lam_id
            else torch.zeros((), device=device)
        )
        loss_g = loss_gan + lam * loss_cycle + lam_id * loss_id
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        for d in (d_a, d_b):
            d.requires_grad_(True)
        loss_d = 0.0
        for d, real, fake in (
            (d_b, real_b, pool_b.query(fake_b)),
            (d_a, real_a, pool_a.query(fake_a)),
        ):
            pr, pf = d(real), d(fake.detach())
            loss_d = loss_d + 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        for s in sched:
            s.step()
        if step % max(1, cfg.steps // 20) == 0 or step == cfg.steps:
            history.append(
                {
                    "step": step,
                    "gan": round(loss_gan.item(), 4),
                    "cycle": round(loss_cycle.item(), 4),
                    "identity": round(loss_id.item(), 4),
                    "d": round(loss_d.item(), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    if not history:
        raise TrainingError("CycleGAN training ran no steps")
    return CycleGAN(g_ab.eval().cpu(), g_ba.eval().cpu(), cfg, history, tuple(sites))


@torch.no_grad()
def restyle(
    generator: ResnetGenerator, images: np.ndarray, device="cpu", batch_size: int = 4
) -> np.ndarray:
    """Apply a generator to uint8 images [n, H, W, 3] (sides padded to a multiple of 4)."""
    device = torch.device(device)
    generator = generator.to(device).eval()
    n, h, w, _ = images.shape
    ph, pw = (-h) % 4, (-w) % 4
    out = np.empty_like(images)
    for start in range(0, n, batch_size):
        x = to_unit(torch.from_numpy(np.array(images[start : start + batch_size])).to(device))
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = generator(x).float()
        out[start : start + batch_size] = from_unit(y[:, :, :h, :w]).cpu().numpy()
    return out
