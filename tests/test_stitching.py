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
        kept.extend(n for _, ns in st.add(t, pred.predict(px[None])[0]) for n in ns)
    kept.extend(n for _, ns in st.close() for n in ns)
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
    with pytest.raises(NucleusTooLargeError, match="larger overlap"):
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
    st.add(t, det)
    for other in grid.tiles[1:]:  # no neighbour sees it whole
        assert all(not ns for _, ns in st.add(other, TileDetections.empty()))
    assert all(not ns for _, ns in st.close())
    assert st.dropped_oversize == 1



def _views_of(grid, slide_mask, seen_by):
    """Each tile's detection of one object drawn on the slide (a bool image), clipped to its window; tiles not in
    ``seen_by`` detect nothing."""
    out = {}
    for t in grid.tiles:
        sub = slide_mask[t.y : t.y + t.size, t.x : t.x + t.size]
        ys, xs = np.nonzero(sub)
        if t.index not in seen_by or not len(xs):
            out[t.index] = TileDetections.empty()
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        out[t.index] = TileDetections(np.array([[x0, y0, x1, y1]], np.int32), np.array([0.9], np.float32),
                                      np.zeros(1, np.int32), [sub[y0:y1, x0:x1].copy()])
    return out


def _lopsided_nucleus():
    """A nucleus 30 px wide (less than the 32 px overlap) whose mass lies left of a seam: its centroid is in tile
    0's core, but it reaches past tile 0's right edge, so only tile 1 sees it whole."""
    grid = make_grid(240, 128, 128, 32)
    assert [t.x for t in grid.tiles] == [0, 96, 128] and grid.tiles[0].core[2] == 112
    m = np.zeros((128, 240), bool)
    m[40:80, 100:112] = True  # the body
    m[58:62, 112:130] = True  # a tail across tile 0's right edge at x = 128
    return grid, m


def test_nucleus_narrower_than_overlap_cut_by_its_owner_is_kept_from_the_neighbour():
    grid, m = _lopsided_nucleus()
    preds = _views_of(grid, m, seen_by={0, 1, 2})
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        kept = _stitch(grid, preds, order)
        assert len(kept) == 1
        n = kept[0]
        assert n.tile == 1 and n.box == (100, 40, 130, 80) and n.area == int(m.sum())


def test_nucleus_no_tile_sees_whole_fails_loudly_in_any_order():
    grid, m = _lopsided_nucleus()
    preds = _views_of(grid, m, seen_by={0, 2})  # the neighbour that would see it whole misses it
    for order in ([0, 1, 2], [2, 1, 0]):
        with pytest.raises(NucleusTooLargeError, match="no neighbouring tile sees it whole"):
            _stitch(grid, preds, order)
    st = Stitcher(grid, on_oversize="drop")
    kept = [n for t in grid.tiles for _, ns in st.add(t, preds[t.index]) for n in ns]
    assert kept + [n for _, ns in st.close() for n in ns] == [] and st.dropped_oversize == 1


# ---------------------------------------------------------------- tiles that disagree at the seams
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st_  # noqa: E402


def _discs(rng, size, n, rmin=5, rmax=9):
    discs = []
    for _ in range(n * 20):
        if len(discs) == n:
            break
        r = int(rng.integers(rmin, rmax + 1))
        c = rng.uniform(r, size - r, 2)
        if all(np.hypot(*(c - d[0])) > r + d[1] + 4 for d in discs):
            discs.append((c, r))
    return discs


def _jittered_predictions(grid, discs, seed):
    """Each tile's own view of every disc it sees: shifted up to 1.5 px and 1 px larger or smaller, with its
    own score; masks clipped to the tile window, as a CNN with different context would draw them."""
    out = {}
    for t in grid.tiles:
        rng = np.random.default_rng([seed, t.index])
        boxes, masks, scores = [], [], []
        yy, xx = np.mgrid[0 : t.size, 0 : t.size]
        for c, r in discs:
            cx, cy = c + rng.uniform(-1.5, 1.5, 2) - (t.x, t.y)
            rr = r + rng.uniform(-1, 1)
            if cx + rr < 0 or cy + rr < 0 or cx - rr >= t.size or cy - rr >= t.size:
                continue
            m = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= rr**2
            ys, xs = np.nonzero(m)
            if not len(xs):
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes.append((x0, y0, x1, y1))
            masks.append(m[y0:y1, x0:x1])
            scores.append(rng.uniform(0.5, 1.0))
        out[t.index] = TileDetections(np.array(boxes, np.int32).reshape(-1, 4), np.array(scores, np.float32),
                                      np.zeros(len(scores), np.int32), masks)
    return out


def _stitch(grid, preds, order):
    st = Stitcher(grid)
    got = [n for i in order for _, ns in st.add(grid.tiles[i], preds[i]) for n in ns]
    return got + [n for _, ns in st.close() for n in ns]


@settings(max_examples=12, deadline=None)
@given(seed=st_.integers(0, 10_000), tile=st_.sampled_from([(96, 40), (128, 48), (160, 64)]))
def test_each_nucleus_once_when_tiles_disagree(seed, tile):
    rng = np.random.default_rng(seed)
    size = 360
    discs = _discs(rng, size, 60)
    grid = make_grid(size, size, *tile)
    preds = _jittered_predictions(grid, discs, seed)
    order = list(range(len(grid.tiles)))
    kept = _stitch(grid, preds, order)
    lab = np.zeros((size + tile[0], size + tile[0]), np.int32)
    for n in kept:  # pixel-disjoint: one owner per pixel
        view = lab[n.box[1] : n.box[3], n.box[0] : n.box[2]]
        assert not (view[n.mask] > 0).any()
        view[n.mask] = n.id
    assert sorted(n.id for n in kept) == list(range(1, len(kept) + 1))
    # every disc exactly once (each is seen whole by the tile owning its centre: radius + 2.5 < overlap / 2)
    yy, xx = np.mgrid[0 : lab.shape[0], 0 : lab.shape[1]]
    for c, r in discs:
        truth = (xx + 0.5 - c[0]) ** 2 + (yy + 0.5 - c[1]) ** 2 <= r**2
        ids, counts = np.unique(lab[truth], return_counts=True)
        big = [i for i, k in zip(ids, counts) if i and k > 0.3 * truth.sum()]
        assert len(big) == 1, (c, r, ids, counts)
    assert len(kept) == len(discs)
    # any tile order: the same nuclei, the same ids
    random.Random(seed).shuffle(order)
    again = _stitch(grid, preds, order)
    assert [(n.id, n.box, n.mask.tobytes()) for n in again] == [(n.id, n.box, n.mask.tobytes()) for n in kept]


def test_real_image_no_seam_duplicates_and_nothing_seen_whole_lost(data_dir):
    """The bundled model on a MoNuSeg image in 256 px tiles: no two kept nuclei overlap with IoU > 0.3, and
    every nucleus some tile sees whole (its centroid in that tile's core) is covered by kept nuclei."""
    from PIL import Image

    from wsiseg.card import default_model_path
    from wsiseg.inference import load_predictor
    from wsiseg.stitching import mask_iou

    pred = load_predictor(default_model_path(), device="cpu")
    name = "TCGA-21-5784-01Z-00-DX1"
    img = np.asarray(Image.open(data_dir / "monuseg-train" / "images" / f"{name}.png").convert("RGB"))
    img = img[:640, :640]
    grid = make_grid(img.shape[1], img.shape[0], 256, 64)
    preds = {}
    for t in grid.tiles:
        px = np.full((256, 256, 3), 255, np.uint8)
        sub = img[t.y : t.y + 256, t.x : t.x + 256]
        px[: sub.shape[0], : sub.shape[1]] = sub
        preds[t.index] = pred.predict(px[None])[0]
    st = Stitcher(grid, on_oversize="drop")
    kept = _stitch(grid, preds, range(len(grid.tiles)))
    assert len(kept) > 100
    pairs = [(a.id, b.id) for i, a in enumerate(kept) for b in kept[i + 1 :] if mask_iou(a, b) > 0.3]
    assert pairs == []
    lab = np.zeros((img.shape[0] + 256, img.shape[1] + 256), bool)
    for n in kept:
        lab[n.box[1] : n.box[3], n.box[0] : n.box[2]] |= n.mask
    lost = 0
    for t in grid.tiles:
        for d in st.whole_detections(t, preds[t.index]):
            if d.key[0]:  # own: the tile that holds its centroid sees it whole
                covered = lab[d.box[1] : d.box[3], d.box[0] : d.box[2]][d.mask].mean()
                lost += covered < 0.5
    assert lost == 0


def test_specks_below_the_minimum_area_are_dropped_and_counted():
    from wsiseg.stitching import min_area_px

    grid = make_grid(256, 256, 256, 64)
    t = grid.tiles[0]
    small, big = np.ones((4, 4), bool), np.ones((12, 12), bool)
    det = TileDetections(np.array([[10, 10, 14, 14], [100, 100, 112, 112]], np.int32), np.array([0.9, 0.8], np.float32),
                         np.zeros(2, np.int32), [small, big])
    assert min_area_px(5.0, 0.25) == 80  # 5 µm² at 0.25 µm/px
    st = Stitcher(grid, min_area=min_area_px(5.0, 0.25))
    kept = [n for _, ns in st.add(t, det) for n in ns]
    assert [n.area for n in kept] == [144] and st.dropped_small == 1
    st = Stitcher(grid, min_area=min_area_px(0.0, 0.25))
    assert len([n for _, ns in st.add(t, det) for n in ns]) == 2 and st.dropped_small == 0


def test_a_sliver_left_beside_a_nucleus_of_another_tile_is_dropped_in_any_order():
    """Tile 0 sees nucleus A (own); tile 1 sees B, which overlaps A too little to conflict (IoU 0.2) but has most
    of its pixels inside it: what A leaves of B is a sliver, dropped as within a tile, whatever the tile order."""
    grid = make_grid(224, 128, 128, 32)
    assert [t.x for t in grid.tiles] == [0, 96] and grid.tiles[0].core[2] == 112
    a = TileDetections(np.array([[100, 40, 120, 60]], np.int32), np.array([0.9], np.float32),
                       np.zeros(1, np.int32), [np.ones((20, 20), bool)])
    # B: slide x 100-112, y 52-66 (tile 1's x 4-16); 96 of its 168 pixels lie inside A; its centroid is in tile
    # 0's core, so in tile 1 it is not own and ranks below A
    b = TileDetections(np.array([[4, 52, 16, 66]], np.int32), np.array([0.95], np.float32),
                       np.zeros(1, np.int32), [np.ones((14, 12), bool)])
    preds = {0: a, 1: b}
    for order in ([0, 1], [1, 0]):
        st = Stitcher(grid)
        kept = [n for i in order for _, ns in st.add(grid.tiles[i], preds[i]) for n in ns]
        kept += [n for _, ns in st.close() for n in ns]
        assert [(n.tile, n.area) for n in kept] == [(0, 400)] and st.duplicates == 1
    st = Stitcher(grid, min_kept=0.0)  # without the rule, B's 72 pixels outside A would be a nucleus
    kept = [n for i in (0, 1) for _, ns in st.add(grid.tiles[i], preds[i]) for n in ns]
    kept += [n for _, ns in st.close() for n in ns]
    assert sorted(n.area for n in kept) == [72, 400]
