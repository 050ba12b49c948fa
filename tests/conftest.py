"""Shared fixtures.

``ray_cluster``: one local Ray instance for the session (``s3_url``: a moto S3 server
started before it, so that Ray's workers see its endpoint).

``synth_small``: the ``small`` synthetic set (what ``fpstore synth --preset small --seed 0``
writes; layout in docs/ARCHITECTURE.md), made once per test session. Read what it holds
from ``synth_small / "manifest.json"`` and ``synth_small / "truth" / "truth.json"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    from fpstore.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "small"
    synthesize("small", out, seed=0, progress=False)
    return out


def _tiled_tiff(path: Path, pixels, mpp: float = 0.5) -> Path:
    """A tiled, JPEG-compressed RGB TIFF with its scale, as scanners write them."""
    import tifffile

    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    return path


@pytest.fixture
def blank_tiff(tmp_path) -> Path:
    """A 4000 x 3000 px scan of bare glass at 0.5 um/px: no tissue anywhere."""
    import numpy as np

    return _tiled_tiff(tmp_path / "blank.tiff", np.full((3000, 4000, 3), 242, np.uint8))


@pytest.fixture
def speck_tiff(tmp_path) -> Path:
    """2000 x 2000 px of glass at 0.5 um/px with one 120 x 120 um piece of the real CMU
    tissue centred on a corner of the 112-um grid: 1.6% of the slide is tissue, and every
    square it touches is about 31% tissue, so none reaches the default 50%."""
    import numpy as np
    import tifffile

    cmu = tifffile.imread(Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs")
    pixels = np.full((2000, 2000, 3), 240, np.uint8)
    pixels[552:792, 552:792] = cmu[2300:2540, 1000:1240]  # 672 = 3 squares of 224 px
    return _tiled_tiff(tmp_path / "speck.tiff", pixels)


@pytest.fixture(scope="session")
def s3_url():
    """moto's S3 server on loopback, started before Ray so that Ray's workers see its endpoint."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    from tests._s3server import s3_server

    with pytest.MonkeyPatch.context() as patch, s3_server(patch) as url:
        yield url


@pytest.fixture(scope="session")
def ray_cluster(s3_url):
    """A 2-CPU Ray instance on 127.0.0.1, started once for every test that asks for it (a
    start costs ~30 s on 2 busy cores) and stopped (all its processes) at the session's end."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fpstore[ray]'")
    # Loopback only (Ray's single-machine mode), no token file, and patience with a busy machine.
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_raylet_start_wait_time_s="120",
    )
    import ray._private.utils as ray_utils

    # The minimal dashboard agent starts in half the time; the tests need no metrics.
    if hasattr(ray_utils, "get_dashboard_dependency_error"):
        ray_utils.get_dashboard_dependency_error = lambda: ImportError(
            "fpstore tests: minimal agent"
        )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
