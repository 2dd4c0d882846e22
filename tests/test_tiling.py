from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import synthetic_he, write_pyramid_tiff
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.slide import SlideError, open_slide
from wsiseg.tiling import (
    axis_bounds,
    axis_starts,
    make_grid,
    plan_resolution,
    plan_slide,
    read_model_region,
    stream_tiles,
)
from wsiseg.tissue import TissueMask


@settings(max_examples=300, deadline=None)
@given(extent=st.integers(1, 5000), size=st.integers(8, 600), overlap_half=st.integers(0, 200))
def test_axis_cores_partition_and_sit_inside_tiles(extent, size, overlap_half):
    overlap = 2 * overlap_half
    if overlap >= size:
        with pytest.raises(ValueError):
            axis_bounds(extent, size, overlap)
        return
    b = axis_bounds(extent, size, overlap)
    stride = size - overlap
    assert b[0] == 0 and b[-1] == extent
    assert all(b1 > b0 for b0, b1 in zip(b, b[1:])), "cores are non-empty and ordered"
    for k in range(len(b) - 1):
        lo, hi = k * stride, k * stride + size  # tile window
        assert lo <= b[k] and b[k + 1] <= hi, "core inside its tile"
        if k > 0:
            assert b[k] - lo >= overlap // 2, "left halo"
        if k < len(b) - 2:
            assert hi - b[k + 1] >= overlap // 2, "right halo"


@settings(max_examples=300, deadline=None)
@given(extent=st.integers(1, 5000), size=st.integers(8, 600), overlap_half=st.integers(0, 150))
def test_windows_hold_core_and_halo_and_only_neighbours_meet(extent, size, overlap_half):
    overlap = 2 * overlap_half
    if 2 * overlap > size:
        return
    b, s = axis_bounds(extent, size, overlap), axis_starts(extent, size, overlap)
    assert len(s) == len(b) - 1
    for k, lo in enumerate(s):
        hi = lo + size
        assert lo >= 0 and lo <= b[k] and b[k + 1] <= hi, "core inside its window"
        if k > 0:
            assert b[k] - lo >= overlap // 2, "halo before the core"
        if k < len(s) - 1:
            assert hi - b[k + 1] >= overlap // 2, "halo after the core"
        if k >= 2:
            assert lo >= s[k - 2] + size, "windows two apart never meet (the stitching rule's locality)"
    if len(s) >= 2:
        # the last window ends at the image's end when it can, and never pads more than it did at k * stride
        padding = s[-1] + size - extent
        assert 0 <= padding <= (len(s) - 1) * (size - overlap) + size - extent
        if extent - size >= (len(s) - 3) * (size - overlap) + size:
            assert padding == 0


def test_a_small_image_gets_a_small_tile_not_padding():
    grid = make_grid(256, 256, 512, 64)
    assert grid.tile_size == 256 and len(grid) == 1
    assert make_grid(1000, 1000, 512, 64).tile_size == 512
    grid = make_grid(1000, 1000, 256, 64)
    assert [t.x for t in grid if t.row == 0] == [0, 192, 384, 576, 744]  # the last one ends at the edge


def test_odd_overlap_is_refused():
    with pytest.raises(ValueError, match="even"):
        axis_bounds(100, 32, 7)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(50, 1500), h=st.integers(50, 1500), size=st.sampled_from([64, 128, 256]),
    overlap=st.sampled_from([0, 16, 32]), seed=st.integers(0, 10_000), f=st.sampled_from([1.0, 2.0, 3.5, 8.0]),
)
def test_tissue_tiles_cover_tissue_exactly_once(w, h, size, overlap, seed, f):
    rng = np.random.default_rng(seed)
    mh, mw = int(np.ceil(h / f)), int(np.ceil(w / f))
    mask = np.zeros((mh, mw), bool)
    for _ in range(3):
        y0, x0 = rng.integers(0, mh), rng.integers(0, mw)
        mask[y0 : y0 + rng.integers(1, mh + 1), x0 : x0 + rng.integers(1, mw + 1)] = True
    grid = make_grid(w, h, size, overlap, tissue=TissueMask(mask, downsample=1.0), model_px_per_mask_px=f)
    cover = np.zeros((h, w), np.int32)
    for t in grid:
        x0, y0, x1, y1 = t.core
        cover[y0:y1, x0:x1] += 1
    assert cover.max() <= 1, "cores never overlap"
    tissue_model = np.kron(mask, np.ones((int(np.ceil(f)),) * 2, bool)) if f == int(f) else None
    if tissue_model is not None:
        tissue_model = tissue_model[:h, :w]
        assert (cover[tissue_model] == 1).all(), "every tissue pixel in exactly one core"
    # every kept tile touches tissue; every dropped tile touches none
    for t in grid:
        x0, y0, x1, y1 = t.core
        sub = mask[int(y0 // f) : int(np.ceil(y1 / f)), int(x0 // f) : int(np.ceil(x1 / f))]
        assert sub.any()
    full = make_grid(w, h, size, overlap)
    kept = {t.core for t in grid}
    for t in full:
        if t.core not in kept:
            x0, y0, x1, y1 = t.core
            assert not mask[int(y0 // f) : int(np.ceil(y1 / f)), int(x0 // f) : int(np.ceil(x1 / f))].any()


def test_owner_matches_core():
    grid = make_grid(1000, 700, 256, 32)
    for t in grid:
        x0, y0, x1, y1 = t.core
        for x, y in [(x0, y0), (x1 - 0.01, y1 - 0.01), ((x0 + x1) / 2, (y0 + y1) / 2)]:
            assert grid.owner(x, y) == (t.row, t.col)


@pytest.mark.parametrize(
    "slide_mpp, downsamples, model_mpp, level, scale",
    [
        (0.25, (1, 4, 16), 0.5, 0, 0.5),  # 40x, 4x pyramid, 20x model: downsample level 0
        (0.25, (1, 2, 4), 0.5, 1, 1.0),  # exact level exists
        (0.5, (1, 4), 0.25, 0, 2.0),  # 20x slide, 40x model: upsample
        (0.499, (1,), 0.5, 0, 1.0),  # within tolerance: read as is
        (0.2527, (1, 4.0003, 16.001), 1.0, 1, 1.0109 / 1.0),
    ],
)
def test_plan_resolution(slide_mpp, downsamples, model_mpp, level, scale):
    p = plan_resolution(slide_mpp, downsamples, model_mpp)
    assert p.level == level
    assert p.scale == pytest.approx(scale, rel=0.02)
    assert p.level0_per_model_px * slide_mpp == pytest.approx(p.model_mpp, rel=1e-6)


def test_upsampled_tiles_are_at_model_resolution(tmp_path):
    # a 0.5 mpp slide for a 0.25 mpp model: every tile pixel is half a slide pixel
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, :, 0] = np.arange(300)[None, :] % 256
    img[:, :, 1] = np.arange(200)[:, None]
    path = write_pyramid_tiff(tmp_path / "ramp.tif", img, 0.5, levels=1, compression="zlib")
    s = open_slide(path)
    p = plan_resolution(s.require_mpp(), s.level_downsamples, 0.25)
    assert p.scale == 2.0 and p.model_size(s.dimensions) == (600, 400)
    t = read_model_region(s, p, 100, 60, 64, 64).astype(float)
    # model pixel u has centre (u + 0.5) / 2 - 0.5 in slide pixels
    u = np.arange(100, 164)
    np.testing.assert_allclose(t[0, 1:-1, 0], ((u + 0.5) / 2 - 0.5)[1:-1], atol=1.0)
    # the same model pixel read through two different windows is identical
    a = read_model_region(s, p, 100, 60, 64, 64)
    b = read_model_region(s, p, 132, 92, 64, 64)
    np.testing.assert_array_equal(a[32:, 32:], b[:32, :32])


def test_downsampled_windows_agree(tmp_path):
    img, _ = synthetic_he(512, 512, n_nuclei=80)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.25, levels=1, compression="zlib")
    s = open_slide(path)
    p = plan_resolution(0.25, (1.0,), 0.4)
    a = read_model_region(s, p, 40, 40, 100, 100)
    b = read_model_region(s, p, 90, 70, 100, 100)
    assert np.abs(a[30:, 50:].astype(int) - b[:70, :50].astype(int)).max() <= 1


class CountingSlide:
    """Wraps a slide and records the most reads in flight at once."""

    def __init__(self, slide, fail_at=None):
        self.slide, self.fail_at = slide, fail_at
        self.lock = threading.Lock()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.slide, name)

    def read_region(self, loc, level, size):
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.fail_at is not None and n == self.fail_at:
            raise SlideError(f"{self.slide.path}: cannot read region at {loc}")
        return self.slide.read_region(loc, level, size)


def test_stream_is_ordered_bounded_and_complete(tmp_path):
    img, _ = synthetic_he(700, 900, n_nuclei=100)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.25, levels=1, compression="zlib")
    s = open_slide(path)
    plan = plan_resolution(0.25, (1.0,), 0.25)
    grid = make_grid(900, 700, 128, 16)
    cs = CountingSlide(s)
    seen = []
    gen = stream_tiles(cs, plan, grid, workers=2, prefetch=3)
    first = next(gen)
    # the consumer has taken one tile; at most prefetch more may have been requested
    assert cs.calls <= 1 + 3
    seen.append(first)
    seen.extend(gen)
    assert [t.index for t, _ in seen] == list(range(len(grid)))
    for t, px in seen:
        x, y = t.x, t.y
        h, w = min(700 - y, 128), min(900 - x, 128)
        np.testing.assert_array_equal(px[:h, :w], img[y : y + h, x : x + w])
        assert (px[h:, :] == 255).all() and (px[:, w:] == 255).all()


def test_stream_raises_read_errors(tmp_path):
    img, _ = synthetic_he(512, 512)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.25, levels=1, compression="zlib")
    cs = CountingSlide(open_slide(path), fail_at=5)
    grid = make_grid(512, 512, 128, 16)
    with pytest.raises(SlideError, match="s.tif"):
        list(stream_tiles(cs, plan_resolution(0.25, (1.0,), 0.25), grid, workers=2, prefetch=4))


def test_plan_real_slide(slides_dir):
    s = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    sp = plan_slide(s, 0.25, 512, 64)
    assert sp.plan.scale == pytest.approx(1.996)
    assert (sp.grid.width, sp.grid.height) == (4431, 5922)
    assert 0 < len(sp.grid) < sp.grid.shape[0] * sp.grid.shape[1]  # background tiles skipped
    assert 0.3 < sp.tissue.area_mm2(s.mpp) < 1.2  # the section covers about a third of 1.64 mm²
