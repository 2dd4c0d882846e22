"""Keep every nucleus exactly once across tile seams.

The rule: a nucleus found in tile ``t`` is kept by ``t`` if and only if its
mask centroid lies in ``t``'s core. Cores partition the image, so exactly one
tile can keep any given centroid, and each tile decides alone, so the result
does not depend on the order in which tiles are processed. The rule is exact
when the tile that owns a nucleus sees all of it: true whenever the nucleus
reaches less than ``overlap / 2`` from its centroid, since every core has
that much halo. A kept nucleus that touches an interior edge of its tile is
cut off and cannot be exact: that raises :class:`NucleusTooLargeError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detections import TileDetections
from .tiling import Tile, TileGrid


class NucleusTooLargeError(Exception):
    """A nucleus reaches further than the tile overlap allows."""


@dataclass
class Nucleus:
    """A stitched nucleus in model-pixel coordinates of the whole slide."""

    id: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 half-open
    mask: np.ndarray  # bool crop over box
    label: int  # 0-based class index
    score: float
    centroid: tuple[float, float]  # x, y
    tile: int

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_centroid(mask: np.ndarray, x0: float, y0: float) -> tuple[float, float]:
    """Centroid (x, y) of a boolean crop whose top-left pixel is at (x0, y0), in pixel-centre coordinates."""
    ys, xs = np.nonzero(mask)
    return (x0 + float(xs.mean()) + 0.5, y0 + float(ys.mean()) + 0.5)


class Stitcher:
    """Turns per-tile detections into slide nuclei with ids 1, 2, ... in tile order."""

    def __init__(self, grid: TileGrid, on_oversize: str = "error"):
        if on_oversize not in ("error", "drop"):
            raise ValueError("on_oversize must be 'error' or 'drop'")
        self.grid = grid
        self.on_oversize = on_oversize
        self.next_id = 1
        self.dropped_oversize = 0

    def select(self, tile: Tile, det: TileDetections) -> list[Nucleus]:
        """The nuclei ``tile`` owns, without ids; pure function of (tile, detections)."""
        cx0, cy0, cx1, cy1 = tile.core
        # interior window edges: a nucleus touching one of these is cut off
        W, H = self.grid.width, self.grid.height
        left = tile.x > 0
        top = tile.y > 0
        right = tile.x + tile.size < W
        bottom = tile.y + tile.size < H
        out = []
        for i in range(len(det)):
            bx0, by0, bx1, by1 = (int(v) for v in det.boxes[i])
            m = det.masks[i]
            if m.size == 0 or not m.any():
                continue
            gx0, gy0 = tile.x + bx0, tile.y + by0
            cx, cy = mask_centroid(m, gx0, gy0)
            if not (cx0 <= cx < cx1 and cy0 <= cy < cy1):
                continue
            cut = (left and bx0 <= 0) or (top and by0 <= 0) or (right and bx1 >= tile.size) or (bottom and by1 >= tile.size)
            if cut:
                if self.on_oversize == "error":
                    raise NucleusTooLargeError(
                        f"a nucleus of {bx1 - bx0}x{by1 - by0} px centred at model pixel ({cx:.0f}, {cy:.0f}) "
                        f"reaches the edge of tile {tile.index}: it extends more than overlap/2 = {self.grid.halo} px "
                        f"from its centre, so it cannot be stitched exactly. Increase --overlap (now "
                        f"{self.grid.overlap}) to at least twice the largest nucleus radius, or pass "
                        f"--on-oversize drop to discard such objects."
                    )
                self.dropped_oversize += 1
                continue
            out.append(Nucleus(0, (gx0, gy0, tile.x + bx1, tile.y + by1), m, int(det.labels[i]),
                               float(det.scores[i]), (cx, cy), tile.index))
        return out

    def add(self, tile: Tile, det: TileDetections) -> list[Nucleus]:
        """Kept nuclei of ``tile``, numbered."""
        kept = self.select(tile, det)
        for n in kept:
            n.id = self.next_id
            self.next_id += 1
        return kept


def segment_array(image: np.ndarray, predictor, tile_size: int, overlap: int, batch_size: int = 4,
                  on_oversize: str = "drop") -> tuple[np.ndarray, dict[int, int], dict[int, float]]:
    """Segment an in-memory RGB image at the model's resolution with the same tiling and stitching as slides.

    Returns an instance label image, instance id -> 0-based class, and instance id -> score.
    """
    from .tiling import make_grid

    h, w = image.shape[:2]
    grid = make_grid(w, h, tile_size, overlap)
    st = Stitcher(grid, on_oversize=on_oversize)
    nuclei: list[Nucleus] = []
    tiles = list(grid.tiles)
    for i in range(0, len(tiles), batch_size):
        batch = tiles[i : i + batch_size]
        px = np.full((len(batch), tile_size, tile_size, 3), 255, np.uint8)
        for k, t in enumerate(batch):
            sub = image[t.y : t.y + tile_size, t.x : t.x + tile_size]
            px[k, : sub.shape[0], : sub.shape[1]] = sub
        for t, det in zip(batch, predictor.predict(px)):
            nuclei.extend(st.add(t, det))
    labels = np.zeros((h, w), np.int32)
    for n in sorted(nuclei, key=lambda n: -n.score):
        x0, y0, x1, y1 = n.box
        view = labels[y0:min(y1, h), x0:min(x1, w)]
        m = n.mask[: view.shape[0], : view.shape[1]] & (view == 0)
        view[m] = n.id
    return labels, {n.id: n.label for n in nuclei}, {n.id: n.score for n in nuclei}
