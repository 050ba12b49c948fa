"""JPEG tiles decoded in batches by the main process (the GPU path), run on the CPU.

torchvision decodes JPEG with libjpeg-turbo on the CPU and with nvJPEG on CUDA through the
same call, so everything but nvJPEG itself is checked here: handing tiles over, assembling
patches from tile mosaics, glass outside the slide, resizing as the readers do, the
per-slide check that a decoder reads a slide's colours as the reader does, and the pinned
batch ring's bookkeeping. tests/test_gpu.py runs the CUDA side where there is a GPU.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from fpstore.errors import SlideError
from fpstore.extract.decode import TileDecoder, area_weights, choose_decoder, tiles_payload
from fpstore.extract.local import PinnedBatches
from fpstore.slides.readers import _ADOBE_RGB
from fpstore.slides.slide import open_slide

DATA = Path(__file__).parent / "data" / "slides"


@pytest.fixture(scope="module")
def cmu():
    with open_slide(DATA / "CMU-1-Small-Region.svs") as slide:
        yield slide


@pytest.mark.parametrize(
    "size_px, out_px",
    [(224.4, 224), (224.4, 112), (224.4, 300), (443.2, 224), (1000.0, 224)],
    ids=["at-size", "halved", "enlarged", "40x-like", "coarse"],
)
def test_tiles_decoded_in_batches_give_the_readers_pixels(cmu, size_px, out_px):
    rng = np.random.default_rng(0)
    # Patches anywhere, some hanging over the slide's edges (glass there).
    xy = np.stack(
        [rng.integers(-100, cmu.info.width, 24), rng.integers(-100, cmu.info.height, 24)], 1
    )
    xy[0] = (cmu.info.width - 50, cmu.info.height - 50)
    reference = cmu.read_patches(xy, size_px, out_px)
    tiles = cmu.jpeg_tiles(xy, size_px, out_px)
    # Each tile handed over once, however many patches share it.
    assert len(tiles.offsets) - 1 == len(np.unique(tiles.tiles[tiles.tiles >= 0]))
    decoded = TileDecoder("cpu").decode(tiles_payload(tiles))
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == reference.shape
    difference = np.abs(decoded.numpy().astype(int) - reference.astype(int))
    assert difference.max() <= 1  # rounding of the resize, nothing more
    assert (decoded[0, -10:, -10:].numpy() == 255).all()  # beyond the slide: glass


def test_a_decoder_that_reads_a_slides_colours_otherwise_is_caught(cmu):
    stream, pixels = cmu.jpeg_sample(224.4, 224)
    assert TileDecoder("cpu").agrees(stream, pixels) == (True, 0.0)
    # Aperio's tiles hold R, G, B components; without the Adobe segment that says so a
    # decoder converts them from YCbCr: wrong colours, which the check must refuse.
    bare = stream.replace(_ADOBE_RGB, b"")
    same, difference = TileDecoder("cpu").agrees(bare, pixels)
    assert not same and difference > 10


def test_slides_without_jpeg_tiles_are_left_to_the_readers():
    with (
        open_slide(DATA / "openslide-boxes.tiff", mpp=0.5) as slide,  # deflate tiles
        pytest.raises(SlideError, match="not JPEG; read it with read_patches"),
    ):
        slide.jpeg_tiles(np.zeros((1, 2), int), 10, 10)
    decoder, why = choose_decoder("cpu", "auto")
    assert decoder is None and "reader processes" in why


def test_area_weights_average_what_each_output_pixel_covers():
    weights = area_weights(443, 224)
    torch.testing.assert_close(weights.sum(1), torch.ones(224))
    halves = area_weights(4, 2)
    torch.testing.assert_close(halves, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))


def test_the_pinned_ring_gathers_pads_and_reuses_its_buffers_in_turn():
    ring = PinnedBatches((6, 2, 2, 3), depth=2, pin=False)  # pinned only where CUDA is
    parts = [
        torch.full((2, 2, 2, 3), 1, dtype=torch.uint8),
        torch.full((3, 2, 2, 3), 2, dtype=torch.uint8),
    ]
    first = ring.gather(parts, 6)  # padded to the batch size (compiled models: one shape)
    assert (
        first.shape[0] == 6
        and first[:2].eq(1).all()
        and first[2:5].eq(2).all()
        and first[5:].eq(0).all()
    )
    ring.done()
    second = ring.gather(parts[:1], 2)
    assert second.data_ptr() != first.data_ptr()
    ring.done()
    third = ring.gather(parts[1:], 3)
    assert third.data_ptr() == first.data_ptr() and third.eq(2).all()


def test_host_batches_bound_for_a_gpu_are_copied_once_into_the_pinned_ring():
    """The loader pins nothing: a host batch, one chunk or several, is copied once, into
    the ring; beside GPU-decoded parts (``meta`` standing in for CUDA) the host parts are
    uploaded from the ring and the batch is joined on the device, padded when compiled."""
    from types import SimpleNamespace

    from fpstore.extract.local import _Loop

    loop = _Loop.__new__(_Loop)
    loop.job, loop.batch_size = SimpleNamespace(config=SimpleNamespace(compile=False)), 8
    loop.staging = PinnedBatches((8, 2, 2, 3), depth=2, pin=False)
    part = torch.full((5, 2, 2, 3), 3, dtype=torch.uint8)
    batch, staged = loop._join([part], 5)
    assert staged and batch.data_ptr() == loop.staging.buffers[0].data_ptr() and batch.eq(3).all()
    loop.staging.done()
    decoded = torch.empty((2, 2, 2, 3), dtype=torch.uint8, device="meta")
    batch, staged = loop._join([decoded, part, decoded], 9)
    assert staged and batch.device.type == "meta" and tuple(batch.shape) == (9, 2, 2, 3)
    assert loop.staging.buffers[1][:5].eq(3).all()  # the host part went through the ring
    loop.job = SimpleNamespace(config=SimpleNamespace(compile=True))
    batch, staged = loop._join([decoded, part[:1]], 3)
    assert batch.device.type == "meta" and len(batch) == 8


def test_pixel_products_run_without_tf32_and_restore_it(monkeypatch):
    """TF32 (on for the models on a GPU) moved 1-3% of resized and stain-normalised pixels by
    one level against the CPU's: those products switch it off, and back on after."""
    import fpstore.extract.decode as decode
    import fpstore.slides.stain_batch as stain_batch
    from fpstore.config import full_float32_matmul

    matmul, seen = torch.backends.cuda.matmul, []

    class Recorded:  # area weights that note the flag when multiplied
        def __init__(self, weights):
            self.weights, self.T = weights, weights.T

        def __matmul__(self, other):
            seen.append(matmul.allow_tf32)
            return self.weights @ other

    def normalised(part, normaliser):
        seen.append(matmul.allow_tf32)
        return part

    monkeypatch.setattr(decode, "area_weights", lambda *a: Recorded(area_weights(*a)))
    monkeypatch.setattr(stain_batch, "_normalise", normalised)
    on_gpu = torch.empty((3, 8, 8, 3), dtype=torch.uint8, device="meta")  # not the CPU path
    saved, matmul.allow_tf32 = matmul.allow_tf32, True  # a property: monkeypatch cannot set it
    try:
        decode._resize(torch.zeros((1, 3, 448, 448), dtype=torch.uint8), 224)
        assert stain_batch.normalise_batch(on_gpu, None).shape == on_gpu.shape
        assert seen == [False, False] and matmul.allow_tf32
        with pytest.raises(RuntimeError), full_float32_matmul():
            raise RuntimeError("restored on the way out too")
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = saved


def test_backend_flags_are_set_for_cuda_in_one_place_and_left_alone_on_the_cpu():
    from fpstore.classify.patchcnn import PatchCNN, PatchCNNConfig
    from fpstore.config import set_backend_flags
    from fpstore.encoders.registry import create_encoder

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, matmul.allow_tf32
    try:
        cudnn.benchmark = matmul.allow_tf32 = False
        create_encoder("random-resnet34").prepare("cpu")
        PatchCNN(PatchCNNConfig(device="cpu"))._device()
        assert not cudnn.benchmark and not matmul.allow_tf32
        set_backend_flags("cuda")  # what Encoder.prepare and the patch CNN call on a GPU
        assert cudnn.benchmark and matmul.allow_tf32
    finally:
        cudnn.benchmark, matmul.allow_tf32 = saved
