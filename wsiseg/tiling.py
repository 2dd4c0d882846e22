"""Resolution planning, the overlapping tile grid, and tile streaming.

All grid coordinates are *model pixels*: the slide resampled to the model's
microns per pixel. Along each axis the grid has ``n`` tiles of ``size`` pixels
placed every ``stride = size - overlap`` pixels. Tile ``k`` owns the core
``[b_k, b_{k+1})`` with ``b_0 = 0``, ``b_n = extent`` and
``b_k = k * stride + overlap // 2`` otherwise, so the cores partition the
image and every core sits inside its tile with a halo of at least
``overlap // 2`` pixels on each interior side.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .slide import Slide
from .tissue import TissueMask


@dataclass(frozen=True)
class ReadPlan:
    """How model pixels map onto a slide level.

    ``scale`` is model pixels per pixel of ``level``; it is > 1 when the slide
    is coarser than the model (tiles are upsampled).
    """

    level: int
    level_downsample: float
    slide_mpp: float
    model_mpp: float
    scale: float

    @property
    def level_mpp(self) -> float:
        return self.slide_mpp * self.level_downsample

    @property
    def level0_per_model_px(self) -> float:
        """Level-0 pixels spanned by one model pixel."""
        return self.level_downsample / self.scale

    @property
    def level0_mpp(self) -> float:
        """Microns per level-0 pixel, as the model's grid measures it (the slide's mpp)."""
        return self.model_mpp / self.level0_per_model_px

    def model_size(self, level0_dimensions: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the slide in model pixels."""
        f = self.level0_per_model_px
        return (max(1, int(math.floor(level0_dimensions[0] / f))), max(1, int(math.floor(level0_dimensions[1] / f))))


MAX_UPSAMPLE = 4.0  # a slide coarser than this many times the model's mpp shows no nuclei worth finding
MAX_TILES = 2_000_000  # about 45 cm² of tissue at 0.25 µm/px in 256 px tiles: beyond any real slide


def plan_resolution(
    slide_mpp: float,
    level_downsamples: Sequence[float],
    model_mpp: float,
    tolerance: float = 0.02,
) -> ReadPlan:
    """Choose the level to read for a model at ``model_mpp``.

    The coarsest level that is at least as fine as the model (within
    ``tolerance``) is read and resampled; when even level 0 is coarser, level 0
    is upsampled. A level within ``tolerance`` of the model mpp is read as is.
    """
    if not (math.isfinite(slide_mpp) and slide_mpp > 0 and math.isfinite(model_mpp) and model_mpp > 0):
        raise ValueError(f"mpp must be a positive number (slide {slide_mpp}, model {model_mpp})")
    if slide_mpp > MAX_UPSAMPLE * model_mpp:
        raise ValueError(f"the slide's resolution ({slide_mpp:g} µm/px) is more than {MAX_UPSAMPLE:g}x coarser than "
                         f"the model's ({model_mpp:g} µm/px): nuclei cannot be seen at it (is the mpp right?)")
    level = 0
    for i, ds in enumerate(level_downsamples):
        if slide_mpp * ds <= model_mpp * (1 + tolerance):
            level = i
    ds = float(level_downsamples[level])
    scale = slide_mpp * ds / model_mpp
    effective = model_mpp
    if abs(scale - 1.0) <= tolerance:
        scale, effective = 1.0, slide_mpp * ds
    return ReadPlan(level=level, level_downsample=ds, slide_mpp=slide_mpp, model_mpp=effective, scale=scale)


@dataclass(frozen=True)
class Tile:
    """One tile: its window (origin ``x, y`` and ``size``) and the core it owns, in model pixels."""

    index: int
    row: int
    col: int
    x: int
    y: int
    size: int
    core: tuple[int, int, int, int]  # x0, y0, x1, y1 (half-open)

    @property
    def window(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)


def axis_bounds(extent: int, size: int, overlap: int) -> list[int]:
    """Core boundaries ``b_0 = 0 < b_1 < ... < b_n = extent`` along one axis."""
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    if overlap < 0 or overlap % 2 or overlap >= size:
        raise ValueError(f"overlap must be even and in [0, tile size), got {overlap} for tile size {size}")
    stride = size - overlap
    n = max(1, math.ceil((extent - overlap) / stride))
    return [0] + [k * stride + overlap // 2 for k in range(1, n)] + [extent]


def axis_starts(extent: int, size: int, overlap: int) -> list[int]:
    """Window start of each core of :func:`axis_bounds`: ``k * (size - overlap)``, except the last window,
    which moves back toward the image's end (less padding beyond it) as far as it can without reaching
    the window two before it, so that only neighbouring windows ever overlap."""
    stride = size - overlap
    n = len(axis_bounds(extent, size, overlap)) - 1
    starts = [k * stride for k in range(n)]
    if n >= 2:
        two_before_end = (n - 3) * stride + size if n >= 3 else 0
        starts[-1] = max(min(starts[-1], extent - size), two_before_end)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """The tiles that cover the tissue of one slide."""

    width: int
    height: int
    tile_size: int
    overlap: int
    x_bounds: tuple[int, ...]
    y_bounds: tuple[int, ...]
    tiles: tuple[Tile, ...]

    @property
    def halo(self) -> int:
        return self.overlap // 2

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid, tissue or not."""
        return (len(self.y_bounds) - 1, len(self.x_bounds) - 1)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def owner(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the core that holds model point (x, y), whether or not that tile is in the grid."""
        col = int(np.searchsorted(self.x_bounds, x, side="right")) - 1
        row = int(np.searchsorted(self.y_bounds, y, side="right")) - 1
        return (min(max(row, 0), self.shape[0] - 1), min(max(col, 0), self.shape[1] - 1))


def make_grid(
    width: int,
    height: int,
    tile_size: int,
    overlap: int,
    tissue: TissueMask | None = None,
    model_px_per_mask_px: float | None = None,
) -> TileGrid:
    """Tiles over a ``width`` x ``height`` model-pixel image, keeping those whose core touches tissue.

    ``model_px_per_mask_px`` maps tissue-mask pixels to model pixels; without
    a mask every tile is kept.
    """
    # an image smaller than a tile gets a tile just large enough (whole multiples of 32 px), not padding
    tile_size = min(tile_size, max(-(-max(width, height) // 32) * 32, 2 * overlap + 32))
    xb, yb = axis_bounds(width, tile_size, overlap), axis_bounds(height, tile_size, overlap)
    xs, ys = axis_starts(width, tile_size, overlap), axis_starts(height, tile_size, overlap)
    ii = None
    if tissue is not None:
        if model_px_per_mask_px is None:
            raise ValueError("model_px_per_mask_px is required with a tissue mask")
        ii = tissue.integral()
        mh, mw = tissue.mask.shape
    tiles = []
    for r in range(len(yb) - 1):
        for c in range(len(xb) - 1):
            core = (xb[c], yb[r], xb[c + 1], yb[r + 1])
            if ii is not None:
                f = model_px_per_mask_px
                mx0 = min(mw, int(math.floor(core[0] / f)))
                my0 = min(mh, int(math.floor(core[1] / f)))
                mx1 = min(mw, max(mx0 + 1, int(math.ceil(core[2] / f))))
                my1 = min(mh, max(my0 + 1, int(math.ceil(core[3] / f))))
                if ii[my1, mx1] - ii[my0, mx1] - ii[my1, mx0] + ii[my0, mx0] == 0:
                    continue
            tiles.append(Tile(len(tiles), r, c, xs[c], ys[r], tile_size, core))
    return TileGrid(width, height, tile_size, overlap, tuple(xb), tuple(yb), tuple(tiles))


def read_model_region(slide: Slide, plan: ReadPlan, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the slide at the model's resolution, origin (x, y) in model pixels.

    Pixel centres are mapped exactly, so the same model pixel gets the same
    value in every tile that holds it.
    """
    import cv2

    level, ds, f = plan.level, plan.level_downsample, plan.scale
    if f == 1.0:
        return slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
    # model pixel centre u + 0.5 sits at level coordinate (u + 0.5) / f
    sx0 = (x + 0.5) / f - 0.5
    sy0 = (y + 0.5) / f - 0.5
    margin = 2 + (int(math.ceil(1.0 / f)) if f < 1 else 0)
    lx0 = int(math.floor(sx0)) - margin
    ly0 = int(math.floor(sy0)) - margin
    lw = int(math.ceil(w / f)) + 2 * margin + 1
    lh = int(math.ceil(h / f)) + 2 * margin + 1
    src = slide.read_region((int(round(lx0 * ds)), int(round(ly0 * ds))), level, (lw, lh))
    if f < 1:
        sigma = 0.5 * math.sqrt(max(1.0 / f**2 - 1.0, 0.0))
        src = cv2.GaussianBlur(src, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    m = np.array([[1.0 / f, 0.0, sx0 - lx0], [0.0, 1.0 / f, sy0 - ly0]], dtype=np.float64)
    return cv2.warpAffine(
        src, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255)
    )


def read_tile(slide: Slide, plan: ReadPlan, tile: Tile, extent: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of ``tile``; parts beyond ``extent`` (model width, height) are white."""
    img = read_model_region(slide, plan, tile.x, tile.y, tile.size, tile.size)
    if extent is not None:
        w, h = extent
        if tile.x + tile.size > w:
            img[:, max(0, w - tile.x) :] = 255
        if tile.y + tile.size > h:
            img[max(0, h - tile.y) :, :] = 255
    return img


def stream_tiles(
    slide: Slide,
    plan: ReadPlan,
    grid: TileGrid,
    workers: int = 2,
    prefetch: int = 8,
) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield ``(tile, pixels)`` in grid order, read by ``workers`` threads at most ``prefetch`` tiles ahead.

    Memory stays bounded by ``prefetch`` tiles whatever the slide size. A read
    error stops the stream and is raised in the consumer.
    """
    if workers < 1 or prefetch < 1:
        raise ValueError("workers and prefetch must be >= 1")
    extent = (grid.width, grid.height)
    if workers == 1 and prefetch == 1:
        for t in grid.tiles:
            yield t, read_tile(slide, plan, t, extent)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsiseg-read") as pool:
        it = iter(grid.tiles)
        try:
            for t in it:
                pending.append((t, pool.submit(read_tile, slide, plan, t, extent)))
                if len(pending) >= prefetch:
                    break
            while pending:
                t, fut = pending.popleft()
                pixels = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read_tile, slide, plan, nxt, extent)))
                yield t, pixels
        finally:
            for _, fut in pending:
                fut.cancel()


@dataclass(frozen=True)
class SlidePlan:
    """Everything decided before reading pixels: resolution, tissue and tiles."""

    plan: ReadPlan
    tissue: TissueMask
    grid: TileGrid

    @property
    def model_px_per_mask_px(self) -> float:
        return self.tissue.downsample / self.plan.level0_per_model_px


def plan_slide(
    slide: Slide,
    model_mpp: float,
    tile_size: int,
    overlap: int,
    tissue: TissueMask | None = None,
) -> SlidePlan:
    """Plan the analysis of ``slide``: choose the level, detect tissue (unless given), lay the grid."""
    from .tissue import detect_tissue

    plan = plan_resolution(slide.require_mpp(), slide.level_downsamples, model_mpp)
    if tissue is None:
        tissue = detect_tissue(slide)
    width, height = plan.model_size(slide.dimensions)
    f = tissue.downsample / plan.level0_per_model_px
    if width * height / max(1, tile_size - overlap) ** 2 > MAX_TILES * 4:
        raise ValueError(f"{slide.path}: {width} x {height} px at the model's resolution is far larger than any "
                         "slide (is the mpp right?)")
    grid = make_grid(width, height, tile_size, overlap, tissue=tissue, model_px_per_mask_px=f)
    if len(grid) > MAX_TILES:
        raise ValueError(f"{slide.path}: {len(grid)} tiles planned, more than {MAX_TILES} (is the mpp right?)")
    return SlidePlan(plan=plan, tissue=tissue, grid=grid)
