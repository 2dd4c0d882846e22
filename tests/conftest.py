from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSISEG_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"

# A suite started with '&' by a non-interactive shell inherits SIGINT ignored, and so would every subprocess
# it starts; the tests that interrupt a run need SIGINT to reach it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    if not SLIDES.is_dir():
        pytest.skip(f"real slide files not found at {SLIDES} (set WSISEG_DATA)")
    return SLIDES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA} (set WSISEG_DATA)")
    return DATA


def synthetic_he(height: int, width: int, seed: int = 0, n_nuclei: int = 40, radius: tuple[int, int] = (5, 9)):
    """A pink image with dark purple discs; returns (rgb, instance labels)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (236, 170, 200)
    labels = np.zeros((height, width), np.int32)
    placed = 0
    tries = 0
    while placed < n_nuclei and tries < n_nuclei * 50:
        tries += 1
        r = int(rng.integers(radius[0], radius[1] + 1))
        cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        disc = np.zeros_like(labels, np.uint8)
        cv2.ellipse(disc, (cx, cy), (r, int(r * rng.uniform(0.7, 1.0))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        grown = cv2.dilate(disc, np.ones((5, 5), np.uint8))
        if (labels[grown > 0] > 0).any():
            continue
        placed += 1
        labels[disc > 0] = placed
        img[disc > 0] = (40, 18, 90)
    return img, labels


def write_pyramid_tiff(path: Path, img: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256,
                       compression: str = "jpeg") -> Path:
    """A tiled pyramidal TIFF (SubIFDs) like the ones scanners write, via tifffile."""
    import cv2
    import tifffile

    kwargs = {}
    if mpp is not None:
        kwargs = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    opts = dict(tile=(tile, tile), photometric="rgb", compression=compression)
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(img, **opts, **kwargs)
        cur = img
        for i in range(1, levels):
            cur = cv2.resize(cur, (cur.shape[1] // 2, cur.shape[0] // 2), interpolation=cv2.INTER_AREA)
            lkw = {}
            if mpp is not None:
                m = mpp * 2**i
                lkw = dict(resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER")
            tif.write(cur, subfiletype=1, **opts, **lkw)
    return path
