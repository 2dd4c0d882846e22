"""Per-tile detections: boxes, scores, classes and box-sized masks, between the model and stitching.

Plain numpy (no torch), so stitching and the writers can run in a process of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TileDetections:
    """Nuclei found in one tile, in tile pixel coordinates.

    ``masks[i]`` is a boolean crop covering ``boxes[i]`` (x0, y0, x1, y1,
    integer, half-open). ``labels`` are 0-based class indices into the model
    card's classes.
    """

    boxes: np.ndarray  # (n, 4) int32
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) int32
    masks: list[np.ndarray]
    class_probs: np.ndarray | None = None  # (n, classes) float32: P(class | nucleus); None: certain (one class)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> TileDetections:
        return cls(np.zeros((0, 4), np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32), [])

    def probs_of(self, i: int) -> np.ndarray | None:
        return None if self.class_probs is None else self.class_probs[i]

    def finish(self, size: tuple[int, int], score_threshold: float, mask_threshold: float = 0.5) -> TileDetections:
        """The detections scoring at least ``score_threshold`` (these are already pasted and resolved)."""
        keep = self.scores >= score_threshold
        if keep.all():
            return self
        return TileDetections(self.boxes[keep], self.scores[keep], self.labels[keep],
                              [m for m, k in zip(self.masks, keep) if k],
                              None if self.class_probs is None else self.class_probs[keep])


@dataclass
class RawDetections:
    """A tile's detections as a Mask R-CNN gives them, before any threshold: float boxes (x0, y0, x1, y1)
    in tile pixels, scores, 0-based class indices and M x M mask probabilities, one per box."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) int32
    mask_probs: np.ndarray  # (n, M, M) float32
    class_probs: np.ndarray | None = None  # (n, classes) float32: P(class | nucleus), calibrated

    def __len__(self) -> int:
        return len(self.scores)

    def finish(self, size: tuple[int, int], score_threshold: float, mask_threshold: float = 0.5) -> TileDetections:
        """Thresholded, pasted into their boxes (clipped to a tile of ``size``), overlaps resolved."""
        keep = self.scores >= score_threshold
        ib, masks = paste_masks(self.mask_probs[keep], self.boxes[keep], size, mask_threshold)
        probs = None if self.class_probs is None else self.class_probs[keep].astype(np.float32)
        return resolve_overlaps(TileDetections(ib, self.scores[keep].astype(np.float32),
                                               self.labels[keep].astype(np.int32), masks, probs))


ModelOutput = TileDetections | RawDetections
"""What a predictor hands to the writing side for one tile; ``finish`` turns either into final detections."""


def paste_masks(mask_probs: np.ndarray, boxes: np.ndarray, size: tuple[int, int], threshold: float = 0.5):
    """Resize each M x M mask probability map into its box; returns integer boxes and boolean crops.

    Boxes are clipped to the tile; masks are thresholded at ``threshold``.
    """
    import cv2

    h, w = size
    out_boxes, out_masks = [], []
    for prob, (x0, y0, x1, y1) in zip(mask_probs, boxes):
        bw, bh = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        ix0, iy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        ix1, iy1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if ix1 <= ix0 or iy1 <= iy0:
            out_boxes.append((0, 0, 0, 0))
            out_masks.append(np.zeros((0, 0), bool))
            continue
        m = prob.shape[0]
        # map crop pixel centres into mask-grid coordinates
        sx, sy = m / bw, m / bh
        mat = np.array([[sx, 0, (ix0 + 0.5 - x0) * sx - 0.5], [0, sy, (iy0 + 0.5 - y0) * sy - 0.5]], np.float64)
        crop = cv2.warpAffine(prob.astype(np.float32), mat, (ix1 - ix0, iy1 - iy0),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,  # mat maps output to input
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        out_boxes.append((ix0, iy0, ix1, iy1))
        out_masks.append(crop >= threshold)
    return np.asarray(out_boxes, np.int32).reshape(-1, 4), out_masks


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not 4-connected to its border filled in."""
    import cv2

    outside = np.pad(mask, 1).astype(np.uint8)
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


MIN_KEPT = 0.5
"""The share of its own mask a detection must keep beside higher-ranked ones not to be dropped as a sliver (within
a tile, :func:`resolve_overlaps`; across tiles, :class:`wsiseg.stitching.Stitcher`)."""


def resolve_overlaps(det: TileDetections, min_area: int = 4, min_kept: float = MIN_KEPT) -> TileDetections:
    """Give every pixel to the highest-scoring nucleus that claims it; keep each nucleus's largest part, holes
    filled. A detection left with less than ``min_kept`` of its own mask by higher-scoring ones is dropped: it
    is a nucleus found twice, or a sliver beside a neighbour, not a nucleus of its own."""
    import cv2

    if len(det) == 0:
        return det
    order = np.argsort(-det.scores, kind="stable")
    h = int(det.boxes[:, 3].max())
    w = int(det.boxes[:, 2].max())
    taken = np.zeros((max(h, 1), max(w, 1)), bool)
    keep, boxes, masks = [], [], []
    for i in order:
        x0, y0, x1, y1 = det.boxes[i]
        own = det.masks[i]
        if own.size == 0:
            continue
        least = max(min_area, min_kept * int(own.sum()))
        m = own & ~taken[y0:y1, x0:x1]
        if m.sum() < least:
            continue
        n, cc, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        if n > 2:
            m = cc == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if m.sum() < least:
                continue
        ys, xs = np.nonzero(m)
        bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        m = fill_holes(m[by0:by1, bx0:bx1]) & ~taken[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1]
        taken[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1] |= m
        keep.append(i)
        boxes.append((x0 + bx0, y0 + by0, x0 + bx1, y0 + by1))
        masks.append(m)
    if not keep:
        return TileDetections.empty()
    keep = np.asarray(keep)
    return TileDetections(np.asarray(boxes, np.int32), det.scores[keep].astype(np.float32),
                          det.labels[keep].astype(np.int32), masks,
                          None if det.class_probs is None else det.class_probs[keep])
