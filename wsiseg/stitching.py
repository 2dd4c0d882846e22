"""Keep every nucleus exactly once across tile seams, each pixel owned by one nucleus.

Neighbouring tiles see the nuclei of their overlap twice and, having different
context, outline them slightly differently; a rule that assumes identical
masks keeps some nuclei twice. The rule here does not.

Definitions, for a detection ``d`` of tile ``t`` (model pixels of the slide):

* ``d`` is **whole** when its mask does not touch an interior edge of ``t``'s
  window (slide borders are not interior). Only whole detections take part.
* ``d`` is **own** when its mask centroid lies in ``t``'s core. Cores
  partition the image, so each point has exactly one owning tile.
* ``depth(d)``: the distance from the centroid to the nearest interior window
  edge of ``t`` (the context the model had around it).
* ``key(d) = (own, depth, score, -tile index, -detection index)``: a strict
  total order on all detections of a slide.
* ``d`` and ``e`` **conflict** when their masks overlap with IoU > ``iou``.

**Rule.** A whole detection is kept if and only if no whole detection that
conflicts with it has a larger key. Each pixel covered by several kept
nuclei belongs to the one with the largest key; a nucleus keeps the largest
connected part of what remains, and is dropped if that is smaller than
``min_area`` pixels or than ``min_kept`` of its own mask (a sliver beside a
larger-key nucleus: the rule each tile applies within itself, see
:func:`wsiseg.detections.resolve_overlaps`).

**Properties.**

1. *Order independence.* The kept set and the pixels of each kept nucleus are
   defined from the set of all detections and a total order that does not
   mention processing order, so any order of tiles gives the same nuclei; ids
   are given in tile index order.
2. *Locality.* Two detections can overlap only if their tiles' windows do,
   i.e. the tiles are neighbours (rows and columns differ by at most one, since
   ``overlap <= tile_size / 2`` keeps tiles two apart disjoint). A tile's keep
   decisions need its neighbours' detections; its final pixels need its
   neighbours' decisions, i.e. the tiles within two rows and columns.
3. *Once.* No two kept nuclei conflict: of a conflicting pair, the one with the
   smaller key is not kept. In particular, two tiles that each see a nucleus
   with its centroid in their own core keep it once.
4. *Exact where masks agree.* If every tile that sees a nucleus whole
   predicts the same mask, its owner's detection is own and the others are not,
   so the owner's is kept: the rule reduces to "a nucleus belongs to the tile
   whose core holds its centroid".
5. *Nothing seen whole is lost to a seam.* A whole detection is dropped only
   for a conflicting detection with a larger key, or when kept nuclei with
   larger keys claim more than ``1 - min_kept`` of its pixels; an own
   detection is never dropped for one that is not own. A detection whose
   centroid lies in another tile's core is kept when that tile has nothing
   conflicting with it.

**Nuclei larger than the overlap.** Along each axis, neighbouring windows
share at least ``overlap`` pixels, so a nucleus spanning fewer than
``overlap`` pixels in x and in y is whole in at least one tile (of two tiles
side by side, it can touch the far edge of only one), though not always in
the tile that owns it: its detection there is *cut* and takes no part, and
the neighbour's whole view of it is kept (property 5). An own detection that
is cut and of which no neighbouring tile has a whole detection covering at
least half its pixels cannot be stitched exactly (a nucleus spanning
``overlap`` pixels or more, or one only the owner sees): it raises
:class:`NucleusTooLargeError`, or is dropped and counted with
``on_oversize="drop"``. That check reads only the set of detections, so
whether a slide raises does not depend on the order of its tiles either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .detections import MIN_KEPT, TileDetections
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
    rgb: np.ndarray | None = field(default=None, repr=False)  # the tile's pixels over ``box``
    key: tuple = field(default=(), repr=False)
    probs: np.ndarray | None = field(default=None, repr=False)  # P(class | nucleus); None: one class
    rgb_box: tuple[int, int, int, int] | None = field(default=None, repr=False)  # where ``rgb`` lies, if not ``box``
    cell_box: tuple[int, int, int, int] | None = field(default=None, repr=False)  # the cell (wsiseg.cells)
    cell_mask: np.ndarray | None = field(default=None, repr=False)

    def pixels_over(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The tile pixels this nucleus carries over ``box`` (RGB, zero where it carries none) and where it
        carries them; None without pixels."""
        if self.rgb is None:
            return None
        rx0, ry0, rx1, ry1 = self.rgb_box or self.box
        x0, y0, x1, y1 = box
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        have = np.zeros((y1 - y0, x1 - x0), bool)
        ix0, iy0, ix1, iy1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = self.rgb[iy0 - ry0 : iy1 - ry0, ix0 - rx0 : ix1 - rx0]
            have[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = True
        return out, have

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_centroid(mask: np.ndarray, x0: float, y0: float) -> tuple[float, float]:
    """Centroid (x, y) of a boolean crop whose top-left pixel is at (x0, y0), in pixel-centre coordinates."""
    ys, xs = np.nonzero(mask)
    return (x0 + float(xs.mean()) + 0.5, y0 + float(ys.mean()) + 0.5)


def _overlap(a: Nucleus, b: Nucleus) -> tuple[np.ndarray, np.ndarray] | None:
    """The two masks over the intersection of their boxes, or None when the boxes are disjoint."""
    x0, y0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    x1, y1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if x1 <= x0 or y1 <= y0:
        return None
    ma = a.mask[y0 - a.box[1] : y1 - a.box[1], x0 - a.box[0] : x1 - a.box[0]]
    mb = b.mask[y0 - b.box[1] : y1 - b.box[1], x0 - b.box[0] : x1 - b.box[0]]
    return ma, mb


def mask_iou(a: Nucleus, b: Nucleus) -> float:
    ov = _overlap(a, b)
    if ov is None:
        return 0.0
    inter = int((ov[0] & ov[1]).sum())
    return inter / (a.area + b.area - inter) if inter else 0.0


def _largest_part(mask: np.ndarray) -> np.ndarray:
    import cv2

    n, lab, st, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    return lab == 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))


def min_area_px(min_area_um2: float, mpp: float) -> int:
    """The smallest nucleus kept, in pixels at ``mpp``."""
    return max(1, int(math.ceil(min_area_um2 / mpp**2 - 1e-9)))


def _box_neighbours(nuclei: list[Nucleus], others: list[Nucleus]) -> list[list[Nucleus]]:
    """For each nucleus, the ``others`` whose boxes intersect its box (only those can share pixels)."""
    if not nuclei or not others:
        return [[] for _ in nuclei]
    ob = np.array([e.box for e in others])
    out = []
    for d in nuclei:
        x0, y0, x1, y1 = d.box
        hit = (ob[:, 0] < x1) & (ob[:, 2] > x0) & (ob[:, 1] < y1) & (ob[:, 3] > y0)
        out.append([others[j] for j in np.flatnonzero(hit)])
    return out


class Stitcher:
    """Turns per-tile detections into slide nuclei, streaming: ``add`` each tile (in any order), then
    ``close``; both return the nuclei that became final, numbered 1, 2, ... in tile index order."""

    def __init__(self, grid: TileGrid, on_oversize: str = "error", iou: float = 0.3, min_area: int = 1,
                 rgb_margin: int = 0, min_kept: float = MIN_KEPT):
        if on_oversize not in ("error", "drop"):
            raise ValueError("on_oversize must be 'error' or 'drop'")
        if 2 * grid.overlap > grid.tile_size:
            raise ValueError(f"overlap {grid.overlap} is more than half the tile size {grid.tile_size}: tiles two "
                             "apart would overlap")
        self.grid = grid
        self.on_oversize = on_oversize
        self.iou = iou
        self.min_area = max(1, int(min_area))
        self.min_kept = float(min_kept)  # share of its own mask a nucleus must keep beside larger-key ones
        self.rgb_margin = max(0, int(rgb_margin))  # pixels kept around each nucleus, for its cell's colour
        self.next_id = 1
        self.dropped_oversize = 0
        self.dropped_small = 0
        self.duplicates = 0  # whole detections dropped for a larger-key one: conflicting, or leaving a sliver
        self._pos = {(t.row, t.col): t for t in grid.tiles}
        self._order = sorted(self._pos, key=lambda rc: self._pos[rc].index)
        self._next = 0  # position in _order of the next tile to finalise
        self._dets: dict[tuple[int, int], list[Nucleus]] = {}
        self._cut: dict[tuple[int, int], list[Nucleus]] = {}  # own detections cut by their window, until checked
        self._kept: dict[tuple[int, int], list[Nucleus]] = {}
        self._final: set[tuple[int, int]] = set()
        self._arrived: set[tuple[int, int]] = set()

    def _near(self, rc: tuple[int, int], r: int = 1):
        for dr in range(-r, r + 1):
            for dc in range(-r, r + 1):
                q = (rc[0] + dr, rc[1] + dc)
                if q in self._pos:
                    yield q

    def whole_detections(self, tile: Tile, det: TileDetections, pixels: np.ndarray | None = None) -> list[Nucleus]:
        """The whole detections of a tile with their keys, no ids."""
        return self._views(tile, det, pixels)[0]

    def _views(self, tile: Tile, det: TileDetections,
               pixels: np.ndarray | None = None) -> tuple[list[Nucleus], list[Nucleus]]:
        """A tile's whole detections, and its own detections cut by an interior edge of its window."""
        cx0, cy0, cx1, cy1 = tile.core
        W, H = self.grid.width, self.grid.height
        left, top = tile.x > 0, tile.y > 0
        right, bottom = tile.x + tile.size < W, tile.y + tile.size < H
        out, cut_own = [], []
        for i in range(len(det)):
            bx0, by0, bx1, by1 = (int(v) for v in det.boxes[i])
            m = det.masks[i]
            if tile.x + bx1 > W or tile.y + by1 > H:  # the window's padding beyond the image holds nothing
                bx1, by1 = min(bx1, W - tile.x), min(by1, H - tile.y)
                m = m[: max(0, by1 - by0), : max(0, bx1 - bx0)]
            if m.size == 0 or not m.any():
                continue
            gx0, gy0 = tile.x + bx0, tile.y + by0
            cx, cy = mask_centroid(m, gx0, gy0)
            own = cx0 <= cx < cx1 and cy0 <= cy < cy1
            cut = (left and bx0 <= 0) or (top and by0 <= 0) or (right and bx1 >= tile.size) or (
                bottom and by1 >= tile.size)
            if cut:
                if own:
                    cut_own.append(Nucleus(0, (gx0, gy0, tile.x + bx1, tile.y + by1), m, int(det.labels[i]),
                                           float(det.scores[i]), (cx, cy), tile.index))
                continue
            if int(m.sum()) < self.min_area:
                self.dropped_small += own
                continue
            edges = [d for d, interior in ((cx - tile.x, left), (cy - tile.y, top),
                                           (tile.x + tile.size - cx, right), (tile.y + tile.size - cy, bottom))
                     if interior]
            depth = round(min(edges), 3) if edges else float(tile.size)
            rgb, rgb_box = None, None
            if pixels is not None:
                g = self.rgb_margin
                rx0, ry0 = max(0, bx0 - g), max(0, by0 - g)
                rx1, ry1 = min(pixels.shape[1], bx1 + g), min(pixels.shape[0], by1 + g)
                rgb = pixels[ry0:ry1, rx0:rx1].copy()
                rgb_box = (tile.x + rx0, tile.y + ry0, tile.x + rx1, tile.y + ry1) if g else None
            out.append(Nucleus(0, (gx0, gy0, tile.x + bx1, tile.y + by1), m, int(det.labels[i]),
                               float(det.scores[i]), (cx, cy), tile.index, rgb,
                               (own, depth, float(det.scores[i]), -tile.index, -i), det.probs_of(i), rgb_box))
        return out, cut_own

    def _oversize(self, c: Nucleus) -> None:
        if self.on_oversize == "error":
            x0, y0, x1, y1 = c.box
            raise NucleusTooLargeError(
                f"a nucleus of at least {x1 - x0}x{y1 - y0} px centred at model pixel ({c.centroid[0]:.0f}, "
                f"{c.centroid[1]:.0f}) reaches the edge of tile {c.tile} and no neighbouring tile sees it whole: "
                f"it is larger than the tile overlap ({self.grid.overlap} px), so it cannot be stitched exactly. "
                "Use a larger overlap, at least the largest nucleus's length, or drop such objects "
                "(on_oversize='drop').")
        self.dropped_oversize += 1

    def _check_cut(self, rc: tuple[int, int]) -> None:
        """Each own detection of tile ``rc`` that its window cuts must be seen whole by a neighbour."""
        cut = self._cut.pop(rc, [])
        others = [e for q in self._near(rc) if q != rc for e in self._dets[q]]
        for c, near in zip(cut, _box_neighbours(cut, others)):
            if not any(2 * int((ov[0] & ov[1]).sum()) >= c.area
                       for ov in (_overlap(c, e) for e in near) if ov is not None):
                self._oversize(c)

    def add(self, tile: Tile, det: TileDetections,
            pixels: np.ndarray | None = None) -> list[tuple[Tile, list[Nucleus]]]:
        """Take one tile's detections (and its pixels, for the nuclei's colour); returns the tiles now final,
        in index order, each with its nuclei."""
        rc = (tile.row, tile.col)
        if rc in self._arrived:
            raise ValueError(f"tile {tile.index} was added twice")
        self._dets[rc], cut = self._views(tile, det, pixels)
        if cut:
            self._cut[rc] = cut
        self._arrived.add(rc)
        return self._advance()

    def close(self) -> list[tuple[Tile, list[Nucleus]]]:
        """The remaining tiles with their nuclei; every tile of the grid must have been added."""
        missing = [self._pos[rc].index for rc in self._order if rc not in self._arrived]
        if missing:
            raise ValueError(f"tiles {missing[:5]} were never added")
        return self._advance()

    def _decide(self, rc: tuple[int, int]) -> None:
        """Which whole detections of tile ``rc`` are kept (needs its neighbours' detections)."""
        self._check_cut(rc)
        rivals = [e for q in self._near(rc) for e in self._dets[q]]
        kept = []
        for d, near in zip(self._dets[rc], _box_neighbours(self._dets[rc], rivals)):
            if any(e.key > d.key and mask_iou(d, e) > self.iou for e in near):
                self.duplicates += 1
            else:
                kept.append(d)
        self._kept[rc] = kept

    def _finalise(self, rc: tuple[int, int]) -> list[Nucleus]:
        """Tile ``rc``'s kept nuclei with the pixels no larger-key kept nucleus claims (needs its neighbours'
        decisions), numbered."""
        rivals = [e for q in self._near(rc) for e in self._kept[q]]
        out = []
        for d, near in zip(self._kept[rc], _box_neighbours(self._kept[rc], rivals)):
            mask = d.mask
            for e in near:
                if e.key > d.key:
                    ov = _overlap(d, e)
                    if ov is not None and (ov[0] & ov[1]).any():
                        if mask is d.mask:
                            mask = d.mask.copy()
                        x0, y0 = max(d.box[0], e.box[0]), max(d.box[1], e.box[1])
                        sub = mask[y0 - d.box[1] : y0 - d.box[1] + ov[1].shape[0],
                                   x0 - d.box[0] : x0 - d.box[0] + ov[1].shape[1]]
                        sub &= ~ov[1]
            if mask is not d.mask:
                mask = _largest_part(mask)
                if int(mask.sum()) < self.min_area:
                    self.dropped_small += 1
                    continue
                if int(mask.sum()) < self.min_kept * d.area:
                    self.duplicates += 1
                    continue
                ys, xs = np.nonzero(mask)
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                bx, by = d.box[0], d.box[1]
                rgb = d.rgb if d.rgb is None or d.rgb_box is not None else d.rgb[y0:y1, x0:x1]
                d = Nucleus(0, (bx + int(x0), by + int(y0), bx + int(x1), by + int(y1)), mask[y0:y1, x0:x1],
                            d.label, d.score, mask_centroid(mask[y0:y1, x0:x1], bx + x0, by + y0), d.tile, rgb,
                            d.key, d.probs, d.rgb_box)
            out.append(d)
        for n in out:
            n.id = self.next_id
            self.next_id += 1
        return out

    def _advance(self) -> list[tuple[Tile, list[Nucleus]]]:
        """Finalise tiles in index order while their neighbourhood (two tiles around) has arrived."""
        out = []
        while self._next < len(self._order):
            rc = self._order[self._next]
            if not all(q in self._arrived for q in self._near(rc, 2)):
                break
            for q in self._near(rc, 1):
                if q not in self._kept:
                    self._decide(q)
            out.append((self._pos[rc], self._finalise(rc)))
            self._next += 1
            self._final.add(rc)
            self._release(rc)
        return out

    def _release(self, rc: tuple[int, int]) -> None:
        """Forget tiles near ``rc`` that are no longer needed: every tile within two of them is final."""
        for q in list(self._near(rc, 2)):
            if q in self._dets and all(p in self._final for p in self._near(q, 2)):
                del self._dets[q]
                self._kept.pop(q, None)

    @property
    def held(self) -> int:
        """Detections held in memory now."""
        return sum(len(v) for v in self._dets.values())


def segment_array(image: np.ndarray, predictor, tile_size: int, overlap: int, batch_size: int = 4,
                  on_oversize: str = "drop", min_area: int = 1) -> tuple[np.ndarray, dict[int, int], dict[int, float]]:
    """Segment an in-memory RGB image already at the model's resolution with the tiling and stitching of slides.

    Returns an instance label image, instance id -> 0-based class, and instance id -> score.
    """
    from .tiling import make_grid

    h, w = image.shape[:2]
    grid = make_grid(w, h, tile_size, overlap)

    def tiles():
        for t in grid.tiles:
            px = np.full((grid.tile_size, grid.tile_size, 3), 255, np.uint8)
            sub = image[t.y : t.y + t.size, t.x : t.x + t.size]
            px[: sub.shape[0], : sub.shape[1]] = sub
            yield t, px

    return stitch_tiles(grid, predictor, tiles(), batch_size, on_oversize, min_area)[:3]


def stitch_tiles(grid: TileGrid, predictor, tiles, batch_size: int = 4, on_oversize: str = "drop",
                 min_area: int = 1) -> tuple[np.ndarray, dict[int, int], dict[int, float], dict[int, np.ndarray]]:
    """The predictor's detections on ``(tile, pixels)`` of ``grid``, stitched as on slides, painted into an
    instance label image of the grid's size; with instance id -> 0-based class, id -> score and id -> class
    probabilities (where the model gives them)."""
    st = Stitcher(grid, on_oversize=on_oversize, min_area=min_area)
    nuclei: list[Nucleus] = []
    batch: list = []

    def run(batch):
        px = np.stack([p for _, p in batch])
        for (t, _), det in zip(batch, predictor.predict(px)):
            nuclei.extend(n for _, ns in st.add(t, det) for n in ns)

    for item in tiles:
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    nuclei.extend(n for _, ns in st.close() for n in ns)
    h, w = grid.height, grid.width
    labels = np.zeros((h, w), np.int32)
    for n in nuclei:  # disjoint masks: the order does not matter
        x0, y0, x1, y1 = n.box
        view = labels[y0:min(y1, h), x0:min(x1, w)]
        view[n.mask[: view.shape[0], : view.shape[1]]] = n.id
    return labels, {n.id: n.label for n in nuclei}, {n.id: n.score for n in nuclei}, {
        n.id: n.probs for n in nuclei if n.probs is not None}
