"""JPEG tiles decoded in batches on the model's GPU instead of in the reader processes.

At ~15,000 patches/s a GPU needs ~45,000 JPEG tiles/s at 40x, more than 16 CPU cores
decode. With GPU decoding the readers only fetch compressed tiles (``Slide.jpeg_tiles``:
``os.pread``, no decoding), and the main process decodes each chunk's tiles in one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call (nvJPEG), assembles each patch from
its tile mosaic with one gather, whitens what lies outside the slide and resizes on the GPU
as ``resize_patch`` does on the CPU (area averaging down, bilinear up).

Used per slide only after a check (``TileDecoder.agrees``): the slide's first tile decoded
here must match the reader's own decoding, so a JPEG flavour the GPU decoder reads
differently (colour space, a missing table) falls back to the CPU readers, named. The same
code runs on the CPU (``device="cpu"``, libjpeg-turbo), which is how the tests check it
without a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from fpstore.config import full_float32_matmul

# Mean absolute difference (0-255) between two decoders of one tile below which they agree:
# IDCT and chroma upsampling differ by a level or two; a wrong colour space by tens.
AGREEMENT = 3.0


def tiles_payload(tiles) -> dict:
    """A ``JpegTiles`` as tensors, for the DataLoader's shared memory."""
    return {
        "data": torch.from_numpy(np.ascontiguousarray(tiles.data)),
        "offsets": torch.from_numpy(tiles.offsets),
        "tiles": torch.from_numpy(tiles.tiles),
        "origin": torch.from_numpy(tiles.origin),
        "inside": torch.from_numpy(tiles.inside),
        "geometry": torch.tensor([*tiles.tile_px, tiles.side, tiles.out_px], dtype=torch.int64),
    }


class TileDecoder:
    """Decodes ``tiles_payload`` dicts into uint8 NHWC patches on ``device``."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def _decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # torchvision's CUDA decoder writes its outputs on a stream of its own; let the
            # work queued on ours finish first, so that it cannot be handed memory that
            # work still reads (pytorch/vision#9606).
            torch.cuda.current_stream(self.device).synchronize()
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)

    def decode(self, payload: dict) -> torch.Tensor:
        tile_h, tile_w, side, out_px = (int(v) for v in payload["geometry"])
        tiles = payload["tiles"].to(self.device)
        n, ky, kx = tiles.shape
        offsets = payload["offsets"].tolist()
        data = payload["data"]
        streams = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        decoded = self._decode(streams) if streams else []
        for image in decoded:
            if tuple(image.shape) != (3, tile_h, tile_w):
                raise ValueError(
                    f"a JPEG tile decoded to {tuple(image.shape)}, not (3, {tile_h}, {tile_w})"
                )
        glass = torch.full((1, 3, tile_h, tile_w), 255, dtype=torch.uint8, device=self.device)
        stack = torch.cat([torch.stack(decoded), glass]) if decoded else glass
        # -1 (glass) is the last row of the stack.
        mosaic = stack[torch.where(tiles < 0, len(decoded), tiles).view(-1)]
        mosaic = mosaic.view(n, ky, kx, 3, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5)
        mosaic = mosaic.reshape(n, 3, ky * tile_h, kx * tile_w)
        origin = payload["origin"].tolist()
        windows = torch.stack(
            [mosaic[i, :, y : y + side, x : x + side] for i, (x, y) in enumerate(origin)]
        )
        inside = payload["inside"].to(self.device)
        steps = torch.arange(side, device=self.device)
        cols = (steps >= inside[:, 0:1]) & (steps < inside[:, 1:2])  # [n, side]
        rows = (steps >= inside[:, 2:3]) & (steps < inside[:, 3:4])
        windows = torch.where((rows[:, :, None] & cols[:, None, :])[:, None], windows, 255)
        return _resize(windows, out_px).permute(0, 2, 3, 1).contiguous()

    def agrees(self, stream: bytes, reference: np.ndarray) -> tuple[bool, float]:
        """(whether this decoder reads ``stream`` as the reader did, mean abs difference)."""
        image = self._decode([torch.frombuffer(bytearray(stream), dtype=torch.uint8)])[0]
        if tuple(image.shape) != (3, *reference.shape[:2]):
            return False, float("inf")
        difference = (image.permute(1, 2, 0).cpu().int() - torch.from_numpy(reference).int()).abs()
        mean = float(difference.float().mean())
        return mean <= AGREEMENT, mean


def _resize(windows: torch.Tensor, out_px: int) -> torch.Tensor:
    """uint8 [N, 3, side, side] -> [N, 3, out_px, out_px] as ``resize_patch``: area averaging
    when shrinking (OpenCV's INTER_AREA: each output pixel the coverage-weighted mean of the
    input pixels under it, as two matrix products), bilinear when enlarging, none at size."""
    side = windows.shape[-1]
    if side == out_px:
        return windows
    x = windows.float()
    if side > out_px:
        weights = area_weights(side, out_px, x.device)
        with full_float32_matmul():
            resized = weights @ x @ weights.T
    else:
        resized = torch.nn.functional.interpolate(
            x, size=(out_px, out_px), mode="bilinear", align_corners=False
        )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def area_weights(side: int, out_px: int, device=None) -> torch.Tensor:
    """[out_px, side]: row i holds the share of each input pixel in output pixel i's span
    [i * side / out_px, (i + 1) * side / out_px) (rows sum to 1)."""
    scale = side / out_px
    edges = torch.arange(out_px + 1, dtype=torch.float64) * scale
    start, stop = edges[:-1, None], edges[1:, None]
    pixel = torch.arange(side, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(stop, pixel + 1) - torch.maximum(start, pixel)).clamp_(min=0)
    return (overlap / scale).to(device=device, dtype=torch.float32)


def choose_decoder(device: str, decode: str) -> tuple[TileDecoder | None, str]:
    """(the GPU decoder, or None for the readers' CPU decoding, and why)."""
    if device != "cuda":
        return None, "JPEG tiles decoded by the reader processes (CPU device)"
    if decode == "cpu":
        return None, "JPEG tiles decoded by the reader processes (asked for: --decode cpu)"
    from torchvision.io import encode_jpeg

    probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
    decoder = TileDecoder(device)
    try:
        decoder._decode([probe])
    except Exception as error:  # torchvision built without nvJPEG, a driver that refuses it
        return None, (
            f"JPEG tiles decoded by the reader processes: torchvision cannot decode JPEG on "
            f"CUDA here ({type(error).__name__}: {error})"
        )
    return decoder, "JPEG tiles decoded on the GPU (torchvision, nvJPEG) in batches"
