"""Training throughput of the fingerprint network (images/s), end to end beside model only.

Same machine, same run:
  model_fp32       forward + backward + AdamW step on random tensors already on the device
  model_fast       the same with what training uses on this device (precision auto): bf16
                   autocast where the device has bf16 units (GPUs, CPUs with AMX or AVX-512
                   BF16), channels_last with bf16 and on CUDA; fp32 elsewhere
  model_compiled   model_fast under torch.compile (CUDA, with --compile)
  loader           the data path alone: random crops of memory-mapped core halves from the
                   on-disk cache (the format `prepare_cores` writes), DataLoader workers, pinned
  pipeline         the real training step (fpstore.fingerprint.train.Stepper): loader -> device
                   -> augmentation on the device -> normalise -> model_fast step; with
                   --stain hed the demo's step (each crop as two H&E jitters, both counted)
and the ratio pipeline / model_fast (the issue asks for >= 0.7). On the CPU it also prints
the FLOP ceiling: the model's forward + backward FLOPs per image (torch's FlopCounterMode)
times each rate, against the best rate of a large matrix product in the same precision on
the same threads (what the CPU's kernels reach; a nominal peak needs the boost clock, which
virtual machines do not report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpstore.config import FINGERPRINT_ARCHS, set_backend_flags  # noqa: E402
from fpstore.encoders.base import resolve_precision  # noqa: E402
from fpstore.encoders.fingerprint_net import FingerprintNet  # noqa: E402
from fpstore.fingerprint.data import CropStream, tissue_grid  # noqa: E402
from fpstore.fingerprint.experiment import HED_AUGMENT, HED_JITTER  # noqa: E402
from fpstore.fingerprint.train import Stepper, TrainConfig  # noqa: E402


def train_flops_per_image(arch: str, px: int) -> float:
    """FLOPs of one image's forward + backward (convolutions and matmuls, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = FingerprintNet(1000, arch)
    x = torch.randn(2, 3, px, px)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def gemm_ceiling_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """The best rate of one large n x n matrix product on this CPU's threads: what its
    kernels can reach (a nominal peak needs the boost clock, which virtual machines hide)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_rate(arch, px, batch, steps, warmup, device, fast, compiled=False) -> float:
    torch.manual_seed(0)
    model = FingerprintNet(1000, arch).to(device)
    cuda = device.type == "cuda"
    bf16 = fast and resolve_precision("auto", device).precision == "bf16"
    channels_last = fast and (cuda or bf16)  # as fpstore.fingerprint.train.Stepper
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, px, px, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def make_cache(folder: Path, n: int, h: int, w: int, seed: int = 0) -> Path:
    """A memory-mapped left-halves file like the prepared cache: blocky random textures."""
    rng = np.random.default_rng(seed)
    path = folder / "left.npy"
    left = np.lib.format.open_memmap(path, "w+", np.uint8, (n, h, w, 3))
    for i in range(n):
        small = rng.integers(60, 230, (h // 8, w // 8, 3), dtype=np.uint8)
        left[i] = np.repeat(np.repeat(small, 8, 0), 8, 1)
    left.flush()
    return path


def loader_for(path, n, tissue, px, batch, workers, pin):
    stream = CropStream(str(path), np.arange(n), np.arange(n) % 100, tissue, px, batch, seed=0)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def loader_rate(loader, steps, warmup, batch) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def pipeline_rate(loader, arch, px, out_px, batch, steps, warmup, device, compiled, hed) -> float:
    """Images a second through the real step; with ``hed`` (the demo's `--stain hed`) each crop
    is seen as two H&E jitters and both count, as the model sees both."""
    cfg = TrainConfig(
        arch=arch,
        patch_px=px,
        out_px=out_px,
        batch_size=batch,
        num_workers=0,
        device=device.type,
        compile=compiled,
        warmup_steps=1,
        **({"stain_jitter": HED_JITTER, "augment": HED_AUGMENT} if hed else {}),
    )
    stepper = Stepper(
        FingerprintNet(100, arch, head=cfg.head), cfg, [0.7, 0.6, 0.7], [0.15, 0.15, 0.15], device
    )
    it = iter(loader)
    for _ in range(warmup):
        stepper(next(it))
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        stepper(next(it))
    sync(device)
    return steps * batch * (2 if hed else 1) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--arch", default="resnet34", choices=FINGERPRINT_ARCHS)
    ap.add_argument("--px", type=int, default=224, help="crop side (cache px at 0.5 um/px)")
    ap.add_argument("--out-px", type=int, default=None, help="network input side (default --px)")
    ap.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 16 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--cores", type=int, default=64, help="core halves in the synthetic cache")
    ap.add_argument("--half", default="1600x800", help="half size HxW")
    ap.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default cores - 2)"
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    ap.add_argument(
        "--stain",
        choices=["none", "hed"],
        default="none",
        help="hed: the demo's step (two H&E jitters a crop; model-only then runs 2 x --batch)",
    )
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 16)
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 2) - 2)
    out_px = args.out_px or args.px
    hed = args.stain == "hed"
    seen = batch * (2 if hed else 1)  # images through the model a step
    h, w = (int(v) for v in args.half.split("x"))
    set_backend_flags(device.type)  # what every fpstore command runs with
    result = {
        "precision": resolve_precision("auto", device).describe(),
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu x{torch.get_num_threads()} threads",
        "arch": args.arch,
        "px": args.px,
        "out_px": out_px,
        "batch": batch,
        "stain": args.stain,
        "steps": steps,
        "workers": workers,
        "torch": torch.__version__,
    }
    result["model_fp32"] = model_rate(args.arch, out_px, seen, steps, warmup, device, fast=False)
    result["model_fast"] = model_rate(args.arch, out_px, seen, steps, warmup, device, fast=True)
    if args.compile and cuda:
        result["model_compiled"] = model_rate(
            args.arch, out_px, seen, steps, warmup + 5, device, True, True
        )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = make_cache(Path(tmp), args.cores, h, w)
        tissue = tissue_grid(np.load(path, mmap_mode="r"))
        result["cache_seconds"] = time.perf_counter() - t
        loader = loader_for(path, args.cores, tissue, args.px, batch, workers, cuda)
        result["loader"] = loader_rate(loader, steps * 2, warmup, batch)
        result["pipeline"] = pipeline_rate(
            loader, args.arch, args.px, out_px, batch, steps, warmup, device, False, hed
        )
        if args.compile and cuda:
            result["pipeline_compiled"] = pipeline_rate(
                loader, args.arch, args.px, out_px, batch, steps, warmup + 5, device, True, hed
            )
        del loader
    result["pipeline_vs_model_fast"] = result["pipeline"] / result["model_fast"]
    if "pipeline_compiled" in result:
        result["pipeline_compiled_vs_model_compiled"] = (
            result["pipeline_compiled"] / result["model_compiled"]
        )
    if not cuda:
        flops = train_flops_per_image(args.arch, out_px)
        result["train_gflop_per_image"] = flops / 1e9
        ceilings = {"model_fp32": gemm_ceiling_gflops(torch.float32)}
        bf16 = resolve_precision("auto", device).precision == "bf16"
        ceilings["model_fast"] = ceilings["pipeline"] = (
            gemm_ceiling_gflops(torch.bfloat16) if bf16 else ceilings["model_fp32"]
        )
        result["gemm_fp32_gflops"] = ceilings["model_fp32"]
        if bf16:
            result["gemm_bf16_gflops"] = ceilings["model_fast"]
        for name, ceiling in ceilings.items():
            result[f"{name}_gflops"] = result[name] * flops / 1e9
            result[f"{name}_share_of_gemm"] = result[f"{name}_gflops"] / ceiling
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    for k, v in result.items():
        print(f"{k:>36}: {v}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
