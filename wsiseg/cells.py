"""Cells: each stitched nucleus grown by a set distance into the cell around it, as QuPath's cell expansion does.

**Rule.** With ``R`` the expansion in model pixels, a pixel ``p`` belongs to the cell of nucleus ``n`` when
``d(p, n) <= R`` (Euclidean distance between pixel centres, to the nearest pixel of ``n``) and no other nucleus
is nearer, a tie going to the nucleus that comes first in reading order (``tie_key``: its centroid's y,
then x); and ``p`` lies in the analysed tissue (or region)
and in the image. A nucleus's own pixels always belong to its cell; of what remains, the cell keeps the part
connected to its nucleus.

**Properties.** The rule reads only the final nuclei (their pixels and centroids; not even their ids, which
depend on the tiling), never the order in which tiles arrive, so cells are the same in any tile order, tiling
or split of a slide into parts; cells are disjoint (a pixel
has one nearest nucleus under the tie rule), and a cell lies within ``R`` of its nucleus. Deciding ``p`` needs
the nuclei within ``R`` of it, so a cell needs the nuclei within ``2R`` of its nucleus: those of the tiles
whose windows come that near (``CellGrower`` waits for them). Distances are computed exactly inside a window
of ``2R`` around the nucleus: a competitor that matters is within ``R`` of a pixel that is within ``R`` of it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np

from .stitching import Nucleus
from .tiling import Tile, TileGrid

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]  # model-pixel centres (x, y) -> in tissue / region


def max_expansion_px(grid: TileGrid) -> int | None:
    """The largest expansion (model pixels) whose cells stay within the cores next to their nucleus's tile, as
    the label image's painting needs: a nucleus reaches half the overlap beyond its tile's core, its cell
    ``r`` further, and an inner core is ``tile_size - overlap`` wide. None: any (one tile each way)."""
    rows, cols = grid.shape
    if rows == 1 and cols == 1:
        return None
    return grid.tile_size - grid.overlap - grid.overlap // 2


def expansion_px(distance_um: float, model_mpp: float, grid: TileGrid) -> int:
    """The expansion in model pixels, checked against what the tiling allows (``max_expansion_px``)."""
    if not (math.isfinite(distance_um) and distance_um >= 0):
        raise ValueError(f"cell expansion must be a distance in µm >= 0, got {distance_um!r}")
    r = int(round(distance_um / model_mpp))
    top = max_expansion_px(grid)
    if top is not None and r > top:
        raise ValueError(f"cell expansion {distance_um:g} µm ({r} px at {model_mpp:g} µm/px) is too large for "
                         f"tiles of {grid.tile_size} px overlapping by {grid.overlap}: use at most "
                         f"{max(top, 0) * model_mpp:g} µm, or larger tiles")
    return r


def tie_key(n: Nucleus) -> tuple[float, float, int]:
    """Which of two equally near nuclei takes a pixel: the one whose centroid comes first, top to bottom, then
    left to right (two final nuclei never share a centroid; the id settles it if they did)."""
    return (n.centroid[1], n.centroid[0], n.id)


def grow_cell(n: Nucleus, candidates: list[Nucleus], r: int, width: int, height: int,
              inside: Inside | None = None) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The cell of ``n`` (box, boolean crop over it) among ``candidates`` (every final nucleus whose box
    comes within ``2r`` of ``n``'s; ``n`` may be among them)."""
    from scipy import ndimage

    x0, y0, x1, y1 = n.box
    vx0, vy0 = max(0, x0 - 2 * r), max(0, y0 - 2 * r)
    vx1, vy1 = min(width, x1 + 2 * r), min(height, y1 + 2 * r)
    shape = (vy1 - vy0, vx1 - vx0)
    lab = np.zeros(shape, np.int64)  # the others' pixels, as 1 + their rank in tie order
    others = sorted((m for m in candidates if m.id != n.id), key=tie_key)
    mine = sum(tie_key(m) < tie_key(n) for m in others)  # n's rank among them all
    for k, m in enumerate(others):
        rank = k + (k >= mine)
        bx0, by0, bx1, by1 = m.box
        ix0, iy0, ix1, iy1 = max(bx0, vx0), max(by0, vy0), min(bx1, vx1), min(by1, vy1)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        sub = m.mask[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
        lab[iy0 - vy0 : iy1 - vy0, ix0 - vx0 : ix1 - vx0][sub] = rank + 1
    own = np.zeros(shape, bool)
    own[y0 - vy0 : y1 - vy0, x0 - vx0 : x1 - vx0] = n.mask
    d_own = ndimage.distance_transform_edt(~own)
    cell = d_own <= r
    if (lab > 0).any():
        d_other, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        nearest = lab[iy, ix]
        cell &= (d_own < d_other) | ((d_own == d_other) & (mine + 1 < nearest))
        ties = cell & (d_own == d_other)
        if ties.any():  # several others at the same distance: the first in tie order among them all decides
            for k in range(mine):
                if (lab == k + 1).any():
                    d_m = ndimage.distance_transform_edt(lab != k + 1)
                    cell &= ~(ties & (d_m == d_own))
    if inside is not None:
        ys, xs = np.nonzero(cell & ~own)
        if len(ys):
            ok = inside(xs + vx0 + 0.5, ys + vy0 + 0.5)
            cell[ys[~ok], xs[~ok]] = False
    cell |= own
    comp, k = ndimage.label(cell, structure=np.ones((3, 3), bool))
    if k > 1:
        keep = np.unique(comp[own])
        cell = np.isin(comp, keep[keep > 0])
    ys, xs = np.nonzero(cell)  # the crop holds the nucleus's box too (a mask need not fill its box's edges)
    cy0, cy1 = min(ys.min(), y0 - vy0), max(ys.max() + 1, y1 - vy0)
    cx0, cx1 = min(xs.min(), x0 - vx0), max(xs.max() + 1, x1 - vx0)
    return (vx0 + int(cx0), vy0 + int(cy0), vx0 + int(cx1), vy0 + int(cy1)), cell[cy0:cy1, cx0:cx1]


class CellGrower:
    """Streams final nuclei tile by tile (in the order the stitcher finalises tiles) and returns them with
    their cells (``n.cell_box``, ``n.cell_mask``), in the same order, once every tile whose nuclei a cell may
    meet has arrived."""

    def __init__(self, grid: TileGrid, r: int, inside: Inside | None = None):
        self.grid, self.r, self.inside = grid, int(r), inside
        self._pos = {(t.row, t.col): t for t in grid.tiles}
        self._queue: deque = deque()  # (tile, nuclei) waiting for their neighbourhood, in arrival order
        self._nuclei: dict[tuple[int, int], list[Nucleus]] = {}
        # the tiles arrived and still needed: how many tiles that reach each one have not yet had their cells
        # grown (reaching is symmetric, so it starts at the number it reaches); dropped at zero, so the state
        # holds a band of tiles, not the slide
        self._needed_by: dict[tuple[int, int], int] = {}

    def _reaching(self, t: Tile) -> list[tuple[int, int]]:
        """The tiles whose windows come within ``2r`` of ``t``'s (their nuclei may meet ``t``'s cells)."""
        g = 2 * self.r
        stride = max(1, self.grid.tile_size - self.grid.overlap)
        k = 1 + -(-(g + self.grid.overlap) // stride)  # windows k tiles apart are more than g apart
        out = []
        for dr in range(-k, k + 1):
            for dc in range(-k, k + 1):
                q = self._pos.get((t.row + dr, t.col + dc))
                if q is not None and q.x < t.x + t.size + g and t.x < q.x + q.size + g \
                        and q.y < t.y + t.size + g and t.y < q.y + q.size + g:
                    out.append((q.row, q.col))
        return out

    def add(self, tile: Tile, nuclei: list[Nucleus]) -> list[tuple[Tile, list[Nucleus]]]:
        rc = (tile.row, tile.col)
        self._nuclei[rc] = nuclei
        near = self._reaching(tile)
        self._needed_by[rc] = len(near)
        self._queue.append((tile, nuclei, near))
        return self._ready()

    def close(self) -> list[tuple[Tile, list[Nucleus]]]:
        return self._ready(drain=True)

    def _ready(self, drain: bool = False) -> list[tuple[Tile, list[Nucleus]]]:
        out = []
        while self._queue:
            tile, nuclei, near = self._queue[0]
            if not drain and not all(q in self._needed_by for q in near):
                break
            self._queue.popleft()
            self._grow(nuclei, [m for q in near for m in self._nuclei.get(q, [])])
            out.append((tile, nuclei))
            for q in near:  # a tile is forgotten once every tile that reaches it has its cells
                if q not in self._needed_by:  # (draining: q never arrived)
                    continue
                self._needed_by[q] -= 1
                if self._needed_by[q] == 0:
                    del self._needed_by[q]
                    self._nuclei.pop(q, None)
        return out

    def _grow(self, nuclei: list[Nucleus], pool: list[Nucleus]) -> None:
        if not nuclei:
            return
        boxes = np.array([m.box for m in pool]) if pool else np.zeros((0, 4), int)
        g = 2 * self.r
        for n in nuclei:
            x0, y0, x1, y1 = n.box
            hit = (boxes[:, 0] < x1 + g) & (boxes[:, 2] > x0 - g) & (boxes[:, 1] < y1 + g) & (boxes[:, 3] > y0 - g)
            n.cell_box, n.cell_mask = grow_cell(n, [pool[i] for i in np.flatnonzero(hit)], self.r, self.grid.width,
                                                self.grid.height, self.inside)
