"""Cells around nuclei (issue 31): the expansion rule, exact across seams and tile orders, kept in the tissue,
written as QuPath cells that QuPath's own reader imports."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import synthetic_he, write_pyramid_tiff
from scipy import ndimage
from test_stitching import _discs, _jittered_predictions

from wsiseg.cells import CellGrower, grow_cell, tie_key
from wsiseg.inference import ThresholdPredictor, threshold_card
from wsiseg.pipeline import SegmentOptions, segment_slide
from wsiseg.stitching import Nucleus, Stitcher
from wsiseg.tiling import make_grid

QUPATH_CHECK = Path(__file__).resolve().parents[2] / "shared" / "tools" / "qupath-check" / "qupath-check"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="QuPath's reader needs Java 17")


def _reference_cells(nuclei: list[Nucleus], r: int, w: int, h: int, inside=None) -> np.ndarray:
    """The rule over the whole image at once, by brute force: a label image of cells (ids)."""
    nuclei = sorted(nuclei, key=tie_key)
    dist = np.empty((len(nuclei), h, w))
    own = np.zeros((h, w), np.int64)
    for k, n in enumerate(nuclei):
        m = np.zeros((h, w), bool)
        x0, y0, x1, y1 = n.box
        m[y0:y1, x0:x1] = n.mask
        own[m] = n.id
        dist[k] = ndimage.distance_transform_edt(~m)
    nearest = np.argmin(dist, axis=0)  # the first minimum: ties go to the nucleus first in reading order
    ok = dist.min(axis=0) <= r
    if inside is not None:
        yy, xx = np.mgrid[0:h, 0:w]
        ok &= inside(xx + 0.5, yy + 0.5)
    ids = np.array([n.id for n in nuclei])
    cells = np.where(ok, ids[nearest], 0)
    cells[own > 0] = own[own > 0]
    out = np.zeros((h, w), np.int64)
    for n in nuclei:  # each cell: the part connected to its nucleus
        comp, _ = ndimage.label(cells == n.id, structure=np.ones((3, 3), bool))
        keep = np.unique(comp[own == n.id])
        out[np.isin(comp, keep[keep > 0])] = n.id
    return out


def _grown(grid, preds, order, r, inside=None) -> tuple[list[Nucleus], np.ndarray]:
    """Stitch tiles in ``order``, grow cells as the writer does (tiles in the order they became final)."""
    st = Stitcher(grid)
    grower = CellGrower(grid, r, inside)
    done = []
    for i in order:
        for tile, ns in st.add(grid.tiles[i], preds[i]):
            done += grower.add(tile, ns)
    for tile, ns in st.close():
        done += grower.add(tile, ns)
    done += grower.close()
    nuclei = [n for _, ns in done for n in ns]
    lab = np.zeros((grid.height, grid.width), np.int64)
    for n in nuclei:
        x0, y0, x1, y1 = n.cell_box
        view = lab[y0:y1, x0:x1]
        assert not (view[n.cell_mask] > 0).any(), "cells overlap"
        view[n.cell_mask] = n.id
    return nuclei, lab


@pytest.mark.parametrize("seed,tile,r", [(0, (96, 40), 10), (1, (128, 48), 12), (2, (160, 64), 20)])
def test_cells_follow_the_rule_exactly_across_seams_in_any_tile_order(seed, tile, r):
    rng = np.random.default_rng(seed)
    size = 300
    discs = _discs(rng, size, 90, rmin=4, rmax=8)  # close enough that most cells meet their neighbours'
    grid = make_grid(size, size, *tile)
    preds = _jittered_predictions(grid, discs, seed)
    order = list(range(len(grid.tiles)))
    nuclei, lab = _grown(grid, preds, order, r)
    assert len(nuclei) == len(discs)
    assert (lab == _reference_cells(nuclei, r, size, size)).all()
    random.Random(seed).shuffle(order)
    nuclei2, lab2 = _grown(grid, preds, order, r)
    assert lab2.tobytes() == lab.tobytes()  # the same bytes, whatever order the tiles came in
    by_id = {n.id: n for n in nuclei2}
    for n in nuclei:
        m = by_id[n.id]
        assert m.cell_box == n.cell_box and m.cell_mask.tobytes() == n.cell_mask.tobytes()
    # cells are disjoint (checked in _grown), hold their nucleus, reach no further than r, and meet: contested
    # pixels were split
    touching = 0
    for n in nuclei:
        m = np.zeros((size, size), bool)
        x0, y0, x1, y1 = n.box
        m[y0:y1, x0:x1] = n.mask
        assert (lab[m] == n.id).all()
        assert ndimage.distance_transform_edt(~m)[lab == n.id].max() <= r
        grown = ndimage.binary_dilation(lab == n.id)
        touching += bool(((lab[grown] != n.id) & (lab[grown] > 0)).any())
    assert touching > len(nuclei) // 3


def test_contested_pixels_go_to_the_nearest_nucleus_and_ties_to_the_first_in_reading_order():
    def disc(i, cx, cy, rad=3):
        yy, xx = np.mgrid[cy - rad : cy + rad + 1, cx - rad : cx + rad + 1]
        return Nucleus(i, (cx - rad, cy - rad, cx + rad + 1, cy + rad + 1),
                       (xx - cx) ** 2 + (yy - cy) ** 2 <= rad**2, 0, 0.9, (cx + 0.5, cy + 0.5), 0)

    a, b = disc(2, 20, 30), disc(1, 40, 30)  # 20 px apart; the column x = 30 is equally far from both
    cells = {}
    for n in (a, b):
        (x0, y0, x1, y1), m = grow_cell(n, [a, b], 12, 80, 60)
        full = np.zeros((60, 80), bool)
        full[y0:y1, x0:x1] = m
        cells[n.id] = full
    assert not (cells[1] & cells[2]).any()
    assert cells[2][30, 30] and not cells[1][30, 30]  # the tie: the left one (whatever the ids)
    assert cells[2][30, 29] and cells[1][30, 31]  # otherwise the nearer one
    c, d = disc(1, 30, 10), disc(2, 30, 30)  # one above the other: the upper one takes the row between
    (x0, y0, x1, y1), m = grow_cell(d, [c, d], 12, 80, 60)
    assert y0 == 21
    assert cells[2][30, 5] and not cells[2][30, 4]  # 12 px from the nucleus's edge and no further
    # and never outside the tissue: a mask that ends at x = 25
    (x0, y0, x1, y1), m = grow_cell(a, [a, b], 12, 80, 60, inside=lambda xs, ys: xs < 25)
    assert x1 <= 25


def _seam_slide(tmp_path: Path):
    """A dense generated slide whose cells meet across many tile seams."""
    img, _ = synthetic_he(600, 700, seed=5, n_nuclei=500, radius=(5, 8))
    return write_pyramid_tiff(tmp_path / "seam.tif", img, 0.5, levels=2, compression="zlib")


def _run(path, out, tile=(128, 48), **kw):
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=tile[0], overlap=tile[1]))
    opts = dict(tissue="whole", progress=False, on_oversize="drop", stats=False)
    opts.update(kw)
    return segment_slide(path, pred, out, SegmentOptions(**opts))


def test_the_grower_holds_a_band_of_tiles_not_the_slide():
    """Memory flat with slide height: the tiles the grower remembers do not grow with the number of rows."""

    def most_held(height: int) -> int:
        grid = make_grid(4000, height, 256, 64)
        grower, most = CellGrower(grid, 20), 0
        for t in grid.tiles:  # the stitcher's reading order
            assert grower.add(t, []) is not None
            most = max(most, len(grower._needed_by), len(grower._nuclei))
        grower.close()
        assert not grower._needed_by and not grower._nuclei  # nothing left behind
        return most

    short, tall = most_held(2000), most_held(12000)
    cols = len(make_grid(4000, 2000, 256, 64).x_bounds) - 1
    assert tall == short <= 4 * cols


def test_cells_are_the_same_for_any_tiling_and_labels_agree_with_table(tmp_path):
    path = _seam_slide(tmp_path)
    got = []
    for tile in [(128, 48), (256, 64)]:
        out = tmp_path / f"o{tile[0]}"
        s = _run(path, out, tile)
        assert s["settings"]["cell_expansion_px"] == 10  # 5 µm at 0.5 µm/px
        t = pd.read_parquet(out / "seam.nuclei.parquet")
        assert {"cell_area_um2", "nucleus_cell_area_ratio", "cytoplasm_eosin_od"} <= set(t.columns)
        assert (t.cell_area_um2 >= t.area_um2).all() and t.nucleus_cell_area_ratio.between(0, 1).all()
        root = zarr.open_group(str(out / "seam.ome.zarr"), mode="r")
        cells = root["labels/cells/0"][0]
        nuclei = root["labels/nuclei/0"][0]
        # away from the slide's edge (where the baseline's blur sees different padding), cell by cell
        keep = t.centroid_x_px.between(45, 700 - 45) & t.centroid_y_px.between(45, 600 - 45)
        got.append(sorted(zip(t.centroid_x_px[keep].round(2), t.centroid_y_px[keep].round(2),
                              t.cell_area_um2[keep].round(4))))
        assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()
    assert len(got[0]) > 200 and got[0] == got[1]


def test_cells_stay_inside_the_region(tmp_path):
    import shapely

    path = _seam_slide(tmp_path)
    square = [[150, 150], [520, 150], [520, 430], [150, 430], [150, 150]]
    region = tmp_path / "sq.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {},
                                  "geometry": {"type": "Polygon", "coordinates": [square]}}))
    _run(path, tmp_path / "sq", tissue=str(region))
    root = zarr.open_group(str(tmp_path / "sq" / "seam.ome.zarr"), mode="r")
    cells, nuclei = root["labels/cells/0"][0], root["labels/nuclei/0"][0]
    ys, xs = np.nonzero((cells > 0) & (nuclei == 0))  # grown pixels (model px = level-0 px here)
    assert len(ys) > 1000
    assert shapely.contains_xy(shapely.Polygon(square), xs + 0.5, ys + 0.5).all()


def test_cells_off_writes_detections_as_before(tmp_path):
    path = _seam_slide(tmp_path)
    s = _run(path, tmp_path / "off", cell_expansion_um=0.0)
    assert s["settings"]["cell_expansion_px"] == 0
    t = pd.read_parquet(tmp_path / "off" / "seam.nuclei.parquet")
    assert not any(c.startswith(("cell_", "cytoplasm_")) for c in t.columns)
    root = zarr.open_group(str(tmp_path / "off" / "seam.ome.zarr"), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["nuclei", "classes"] and "cells" not in root["labels"]
    with gzip.open(tmp_path / "off" / "seam.geojson.gz", "rt") as f:
        feats = json.load(f)["features"]
    assert feats and all(f["properties"]["objectType"] == "detection" and "nucleusGeometry" not in f for f in feats)


def test_an_expansion_the_tiles_cannot_hold_is_a_clear_error(slides_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                           "--model", "threshold", "--cell-expansion", "500", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cell expansion 500 µm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _qupath(path: Path) -> dict:
    proc = subprocess.run([str(QUPATH_CHECK), str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


QUPATH_MEASUREMENTS = {"Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Nucleus: Circularity", "Nucleus: Solidity",
                       "Nucleus: Max diameter µm", "Nucleus: Min diameter µm", "Nucleus: Hematoxylin OD mean",
                       "Nucleus: Eosin OD mean", "Cell: Area µm^2", "Cell: Eosin OD mean",
                       "Cytoplasm: Eosin OD mean", "Nucleus/Cell area ratio", "Detection probability"}


@needs_java
def test_qupath_reads_the_demo_output_as_cells(slides_dir, tmp_path):
    """The README's command on the sample slide with the bundled model, read by QuPath 0.6's own reader."""
    from wsiseg.card import default_model_path, load_card

    out = tmp_path / "cmu"
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                           "--out", str(out), "--quiet", "--no-stats"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    t = pd.read_parquet(out / "CMU-1-Small-Region.nuclei.parquet")
    seen = _qupath(out / "CMU-1-Small-Region.geojson.gz")
    n = len(t)
    assert seen["ok"] and n > 1000
    assert seen["objects"] == n and seen["by_type"] == {"cell": n} and seen["cells_with_nucleus_roi"] == n
    assert seen["invalid_rois"] == 0 and seen["ids_kept"] == n and seen["duplicate_ids"] == 0
    assert seen["nucleus_geometry_in_file"] == n and seen["nucleus_geometry_in_properties_ignored"] == 0
    card = load_card(default_model_path())
    sure = t[~t.class_uncertain]
    assert {k: v for k, v in seen["by_class"].items() if k != "(none)"} == sure.class_name.value_counts().to_dict()
    assert seen["by_class"].get("(none)", 0) == int(t.class_uncertain.sum())
    for c in card.classes:  # the card's colours, as QuPath shows them
        if c.name in seen["by_class"]:
            assert seen["class_colors"][c.name] == "#%02x%02x%02x" % tuple(c.color)
    assert QUPATH_MEASUREMENTS <= set(seen["measurement_names"])
    assert seen["bounds"]["x_max"] <= 2220 and seen["bounds"]["y_max"] <= 2967
    # cells grow on the detected tissue only (tissue.png: the mask the run analysed)
    from PIL import Image

    summary = json.loads((out / "summary.json").read_text())
    tissue = np.asarray(Image.open(out / "tissue.png")) > 0
    per = summary["tissue_mask_file"]["level0_px_per_pixel"]
    root = zarr.open_group(str(out / "CMU-1-Small-Region.ome.zarr"), mode="r")
    cells, nuclei = root["labels/cells/0"][0], root["labels/nuclei/0"][0]
    ys, xs = np.nonzero((cells > 0) & (nuclei == 0))
    f = root.attrs["wsiseg"]["level0_per_label_px"]
    ty = np.minimum(((ys + 0.5) * f / per).astype(int), tissue.shape[0] - 1)
    tx = np.minimum(((xs + 0.5) * f / per).astype(int), tissue.shape[1] - 1)
    assert len(ys) > 10 * n and tissue[ty, tx].all()


@needs_java
def test_qupath_reads_cells_that_touch_across_seams(tmp_path):
    path = _seam_slide(tmp_path)
    _run(path, tmp_path / "o", geojson="geojson")
    feats = json.loads((tmp_path / "o" / "seam.geojson").read_text())["features"]
    seen = _qupath(tmp_path / "o" / "seam.geojson")
    assert seen["ok"] and seen["by_type"] == {"cell": len(feats)} and seen["cells_with_nucleus_roi"] == len(feats)
    assert seen["invalid_rois"] == 0 and seen["ids_kept"] == len(feats)
    # many cells share a border with a neighbour (contested pixels were split), none overlaps one
    from shapely import STRtree
    from shapely.geometry import shape

    polys = [shape(f["geometry"]) for f in feats]
    tree = STRtree(polys)
    touch = overlap = 0
    for i, j in zip(*tree.query(polys, predicate="intersects")):
        if i < j:
            touch += 1
            overlap += polys[i].intersection(polys[j]).area > 0.05 * min(polys[i].area, polys[j].area)
    assert touch > len(polys) // 2 and overlap == 0


def test_outlines_are_lean_valid_and_keep_their_area(data_dir):
    """Simplified outlines (what the GeoJSON holds) against the exact pixel outline, on real nucleus masks."""
    import shapely
    from PIL import Image

    from wsiseg.outputs import SIMPLIFY_SLIDE_PX, mask_polygon

    lab = np.asarray(Image.open(data_dir / "monuseg-train" / "labels" / "TCGA-18-5592-01Z-00-DX1.png"))
    ids = [i for i in np.unique(lab) if i][:400]
    before = after = 0
    for scale in (1.0, 2.0):  # a 40x slide, and a 20x one upsampled for the model
        for i in ids:
            ys, xs = np.nonzero(lab == i)
            y0, x0 = ys.min(), xs.min()
            m = (lab == i)[y0 : ys.max() + 1, x0 : xs.max() + 1]
            exact = mask_polygon(m, x0, y0, scale, tolerance=0)
            lean = mask_polygon(m, x0, y0, scale)
            if exact is None:
                assert lean is None
                continue
            pe, pl = shapely.Polygon(exact), shapely.Polygon(lean)
            assert pl.is_valid and len(lean) <= len(exact)
            assert abs(pl.area - pe.area) <= 0.01 * pe.area
            assert pe.hausdorff_distance(pl) <= SIMPLIFY_SLIDE_PX + 0.01
            before += len(exact)
            after += len(lean)
    assert after < 0.4 * before  # the staircase is gone
