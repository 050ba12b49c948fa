"""Does the GPU's JPEG decoder read Aperio's R,G,B tiles right? (issue 27, item 3)

Aperio SVS tiles hold R, G, B components, not YCbCr; fpstore's reader splices an Adobe APP14
marker into each tile (``fpstore.slides.readers``) so that libjpeg-turbo decodes them without
a colour conversion (without it CMU-1-Small-Region differs by ~48 levels on average). Whether
nvJPEG honours that marker decides whether such slides take the GPU path or fall back to the
readers (named, per slide: correct either way, slower without). This decodes CMU's first
scanned tile with and without the marker, and a YCbCr copy's, on ``--device`` and prints one
JSON line:

    python benchmarks/check_nvjpeg.py                 # cuda (nvJPEG)
    python benchmarks/check_nvjpeg.py --device cpu    # libjpeg-turbo: honoured, as reference

``aperio``: "gpu path" (the marker is honoured: mean difference to the reader within
``AGREEMENT``), "falls back: marker ignored" (with and without it alike, both off),
"falls back: decoder error" (the decoder refused the tile), or "falls back" (off for
another reason). The differences are mean levels (0-255), or the decoder's error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpstore.extract.decode import AGREEMENT, TileDecoder  # noqa: E402
from fpstore.slides.readers import _ADOBE_RGB  # noqa: E402
from fpstore.slides.slide import open_slide  # noqa: E402
from tests._mixed_slides import CMU, rewrite_cmu  # noqa: E402


def check(device: str) -> dict:
    decoder = TileDecoder(device)

    def difference(stream: bytes, pixels) -> float | str:
        """Mean absolute difference to the reader's decoding, or the decoder's error."""
        try:
            return round(decoder.agrees(stream, pixels)[1], 2)
        except Exception as error:  # the decoder refused the tile: report, do not stop
            return f"{type(error).__name__}: {' '.join(str(error).split())}"

    with open_slide(CMU) as slide:
        stream, pixels = slide.jpeg_sample(224.4, 224)
    with_marker = difference(stream, pixels)
    without = difference(stream.replace(_ADOBE_RGB, b""), pixels)
    with (
        tempfile.TemporaryDirectory() as folder,
        open_slide(rewrite_cmu(Path(folder) / "ycbcr.tiff", "jpeg")) as slide,
    ):
        ycbcr = difference(*slide.jpeg_sample(224.4, 224))
    if isinstance(with_marker, float) and with_marker <= AGREEMENT:
        verdict = "gpu path"
    elif isinstance(with_marker, float) and isinstance(without, float):
        ignored = abs(with_marker - without) < 1.0
        verdict = "falls back: marker ignored" if ignored else "falls back"
    else:
        verdict = "falls back: decoder error"
    return {
        "device": device,
        "aperio": verdict,
        "aperio_with_marker": with_marker,
        "aperio_without_marker": without,
        "ycbcr": ycbcr,
        "agreement": AGREEMENT,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    print(json.dumps(check(parser.parse_args().device)), flush=True)
