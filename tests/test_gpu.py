"""The GPU path: extraction on CUDA against the CPU, nvJPEG decoding, pinned batches, AMP
training steps. Marked ``gpu`` (``pytest -m gpu``) and skipped where CUDA is not visible;
benchmarks/gpu_check.sh runs them first on a GPU machine."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fpstore.cohort.cohorts import add_cohort
from fpstore.extract.config import ExtractConfig
from fpstore.extract.decode import TileDecoder, tiles_payload
from fpstore.extract.local import PinnedBatches
from fpstore.extract.run import extract
from fpstore.slides.slide import open_slide
from tests._mixed_slides import mixed_cohort, rewrite_cmu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DATA = Path(__file__).parent / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"


def ycbcr_slide(tmp_path) -> Path:
    """CMU-1-Small-Region rewritten with YCbCr JPEG tiles (as scanners and fpstore synth
    write them; CMU's own tiles hold R, G, B components)."""
    return rewrite_cmu(tmp_path / "cmu-ycbcr.tiff", "jpeg")


def vectors(store, encoder="random-resnet34"):
    files = sorted((store / "fingerprints" / f"encoder={encoder}" / "cohort=c").glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    ids = [i for t in tables for i in t.column("patch_id").to_pylist()]
    vecs = np.concatenate(
        [np.stack(t.column("fingerprint").to_numpy(zero_copy_only=False)) for t in tables]
    )
    return ids, vecs


@pytest.mark.parametrize("which", ["aperio-rgb", "ycbcr"])
def test_a_slide_extracted_on_cuda_matches_its_cpu_fingerprints(tmp_path, which):
    slide = CMU if which == "aperio-rgb" else ycbcr_slide(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"patient_id,slide,ER,PR,Her2\nP1,{slide},Positive,Negative,Negative\n")
    store = tmp_path / "store"
    add_cohort(store, "c", clinical=labels, fmt="csv")
    common = {"encoder": "random-resnet34", "patches": None, "num_workers": 2}
    cpu = extract(store, "c", ExtractConfig(device="cpu", precision="fp32", **common), False)
    cpu_ids, cpu_vectors = vectors(store)
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table)
    gpu = extract(store, "c", ExtractConfig(device="cuda", **common), False)  # defaults
    gpu_ids, gpu_vectors = vectors(store)
    assert cpu.failed == [] and gpu.failed == [] and gpu_ids == cpu_ids and len(gpu_ids) > 40
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert gpu.precision == "bf16"
    if which == "ycbcr":  # the GPU decodes these tiles as the readers do: no fallback
        assert "on the GPU" in gpu.decode and "by the readers" not in gpu.decode
    cosine = np.sum(gpu_vectors * cpu_vectors, 1) / (
        np.linalg.norm(gpu_vectors, axis=1) * np.linalg.norm(cpu_vectors, axis=1)
    )
    assert cosine.min() >= 0.999, (gpu.decode, float(cosine.min()))


def test_nvjpeg_decodes_ycbcr_tiles_as_the_readers_do(tmp_path):
    with open_slide(ycbcr_slide(tmp_path)) as slide:
        rng = np.random.default_rng(0)
        xy = np.stack(
            [rng.integers(0, slide.info.width, 64), rng.integers(0, slide.info.height, 64)], 1
        )
        for size_px, out_px in [(224.4, 224), (443.2, 224)]:
            reference = slide.read_patches(xy, size_px, out_px)
            decoded = TileDecoder("cuda").decode(
                tiles_payload(slide.jpeg_tiles(xy, size_px, out_px))
            )
            assert decoded.device.type == "cuda" and tuple(decoded.shape) == reference.shape
            difference = np.abs(decoded.cpu().numpy().astype(int) - reference.astype(int))
            # torchvision's own nvJPEG-vs-libjpeg test allows a mean difference below 2.
            assert difference.mean() < 2, difference.mean()
        same, difference = TileDecoder("cuda").agrees(*slide.jpeg_sample(224.4, 224))
        assert same, difference


def test_batches_bound_for_the_gpu_stay_pinned():
    ring = PinnedBatches((8, 4, 4, 3), depth=2)
    parts = [
        torch.ones((3, 4, 4, 3), dtype=torch.uint8).pin_memory(),
        torch.ones((2, 4, 4, 3), dtype=torch.uint8),
    ]
    batch = ring.gather(parts, 8)
    assert batch.is_pinned() and batch[:5].eq(1).all() and batch[5:].eq(0).all()
    on_gpu = batch.to("cuda", non_blocking=True)
    ring.done()
    assert ring.events[0] is not None
    ring.gather(parts, 5)
    ring.done()
    again = ring.gather(parts, 5)  # waits for the copy that read this buffer
    torch.cuda.synchronize()
    assert again.data_ptr() == batch.data_ptr() and on_gpu[:5].eq(1).all()


def test_a_few_training_steps_with_amp():
    from fpstore.encoders.fingerprint_net import FingerprintNet
    from fpstore.fingerprint.train import Stepper, TrainConfig

    cfg = TrainConfig(
        arch="resnet18", patch_px=64, out_px=64, batch_size=8, num_workers=0, warmup_steps=1
    )
    stepper = Stepper(
        FingerprintNet(4, "resnet18", head=cfg.head),
        cfg,
        [0.7, 0.6, 0.7],
        [0.2, 0.2, 0.2],
        torch.device("cuda"),
    )
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert stepper.bf16 and stepper.precision.precision == "bf16"
    before = [p.detach().clone() for p in stepper.model.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = {
            "x1": torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=generator),
            "y": torch.randint(0, 4, (8,), generator=generator),
        }
        parts = stepper(batch)
        assert torch.isfinite(parts.total).item()
    changed = [not torch.equal(a, b) for a, b in zip(before, stepper.model.parameters())]
    assert all(p.dtype == torch.float32 for p in stepper.model.parameters()) and any(changed)


def test_a_mixed_cohort_with_a_corrupt_tile_extracts_on_cuda_as_on_the_cpu(tmp_path):
    """Aperio, YCbCr and deflate slides in one batch (GPU-decoded patches on the device
    beside the readers' from the pinned ring), and a slide whose corrupt tile fails it alone,
    named; the backend flags every command runs with are set."""
    store = mixed_cohort(tmp_path, corrupt=True)
    common = {"encoder": "random-resnet34", "patches": None, "num_workers": 2}
    cpu = extract(store, "c", ExtractConfig(device="cpu", precision="fp32", **common), False)
    cpu_ids, cpu_vectors = vectors(store)
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table)
    gpu = extract(store, "c", ExtractConfig(device="cuda", **common), False)
    gpu_ids, gpu_vectors = vectors(store)
    assert [r.slide_id for r in cpu.failed] == [r.slide_id for r in gpu.failed] == ["BADTILE"]
    assert "JPEG" in gpu.failed[0].error, gpu.failed[0].error
    decoded = {r.slide_id: r.decode for r in gpu.slides}
    assert decoded["YCBCR"] == "gpu" and "not JPEG" in decoded["DEFLATE"], decoded
    # Aperio R,G,B tiles: on the GPU if nvJPEG honours their Adobe marker, else named.
    assert decoded["APERIO"] == "gpu" or "differs by" in decoded["APERIO"], decoded
    assert gpu.to_dict()["decode_fallbacks"] == len(gpu.decode_fallbacks) >= 1
    assert gpu_ids == cpu_ids and len(gpu_ids) > 120
    cosine = np.sum(gpu_vectors * cpu_vectors, 1) / (
        np.linalg.norm(gpu_vectors, axis=1) * np.linalg.norm(cpu_vectors, axis=1)
    )
    assert cosine.min() >= 0.999, (gpu.decode, float(cosine.min()))
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
