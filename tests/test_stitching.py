from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import synthetic_he

from wsiseg.detections import TileDetections
from wsiseg.inference import ThresholdPredictor, threshold_card
from wsiseg.stitching import NucleusTooLargeError, Stitcher
from wsiseg.tiling import make_grid


def segment_image(img, tile_size, overlap, order=None, predictor=None):
    """Stitched nuclei of an in-memory image, tiles processed in ``order``."""
    h, w = img.shape[:2]
    grid = make_grid(w, h, tile_size, overlap)
    pred = predictor or ThresholdPredictor(threshold_card())
    st = Stitcher(grid)
    tiles = list(grid.tiles)
    if order is not None:
        tiles = [tiles[i] for i in order]
    kept = []
    for t in tiles:
        px = np.full((tile_size, tile_size, 3), 255, np.uint8)
        sub = img[t.y : t.y + tile_size, t.x : t.x + tile_size]
        px[: sub.shape[0], : sub.shape[1]] = sub
        kept.extend(st.select(t, pred.predict(px[None])[0]))
    return kept


def as_label_image(nuclei, shape):
    lab = np.zeros(shape, np.int32)
    for i, n in enumerate(nuclei, 1):
        x0, y0, x1, y1 = n.box
        view = lab[y0:y1, x0:x1]
        view[n.mask[: view.shape[0], : view.shape[1]]] = i
    return lab


def match(a, b):
    """Greedy IoU matching of two nucleus lists by box centre proximity; returns IoUs."""
    shape = (max([n.box[3] for n in a + b] + [1]), max([n.box[2] for n in a + b] + [1]))
    la, lb = as_label_image(a, shape), as_label_image(b, shape)
    ious = []
    for i in range(1, len(a) + 1):
        m = la == i
        ids, counts = np.unique(lb[m], return_counts=True)
        counts = counts[ids > 0]
        ids = ids[ids > 0]
        if not len(ids):
            ious.append(0.0)
            continue
        j = ids[np.argmax(counts)]
        o = lb == j
        ious.append((m & o).sum() / (m | o).sum())
    return np.array(ious)


@pytest.mark.parametrize("tile_size, overlap", [(128, 48), (200, 64), (96, 40)])
def test_many_tiles_equal_one_tile(tile_size, overlap):
    img, truth = synthetic_he(600, 700, seed=3, n_nuclei=400, radius=(5, 9))
    one = segment_image(img, 1024, 0)
    many = segment_image(img, tile_size, overlap)
    assert len(one) >= 0.98 * truth.max()  # the deterministic segmenter finds the synthetic nuclei
    assert len(many) == len(one)
    ious = match(one, many)
    assert ious.min() >= 0.9
    # nuclei at seams are included and equally good
    grid = make_grid(700, 600, tile_size, overlap)
    seams_x = set(grid.x_bounds[1:-1])
    at_seam = [i for i, n in enumerate(one) if any(n.box[0] < s <= n.box[2] for s in seams_x)]
    assert len(at_seam) > 10
    assert ious[at_seam].min() >= 0.9


def test_result_is_independent_of_tile_order():
    img, _ = synthetic_he(500, 500, seed=7, n_nuclei=250)
    ref = sorted((n.centroid, n.area) for n in segment_image(img, 128, 40))
    n_tiles = len(make_grid(500, 500, 128, 40))
    for seed in range(3):
        order = list(range(n_tiles))
        random.Random(seed).shuffle(order)
        got = sorted((n.centroid, n.area) for n in segment_image(img, 128, 40, order=order))
        assert got == ref


def test_nucleus_wider_than_overlap_fails_loudly():
    img = np.full((300, 300, 3), (236, 170, 200), np.uint8)
    img[100:200, 60:100] = (40, 18, 90)  # a 40x100 px object across the seam at x=80
    with pytest.raises(NucleusTooLargeError, match="--overlap"):
        segment_image(img, 128, 16)
    # with enough overlap it is stitched once
    kept = segment_image(img, 256, 128)
    assert len(kept) == 1 and abs(kept[0].area - 40 * 100) <= 20  # corners rounded by smoothing


def test_drop_mode_counts_oversize():
    grid = make_grid(256, 128, 128, 16)
    t = grid.tiles[0]
    # an object reaching the tile's right edge (an interior seam) with its centroid in the core
    det = TileDetections(np.array([[100, 10, 128, 50]], np.int32), np.array([0.9], np.float32),
                         np.array([0], np.int32), [np.ones((40, 28), bool)])
    st = Stitcher(grid, on_oversize="drop")
    assert st.add(t, det) == [] and st.dropped_oversize == 1
