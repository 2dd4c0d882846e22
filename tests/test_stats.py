from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from wsiseg.stats import BINS, RANGES, compute_stats, write_stats


def write_table(path, n, seed=0, row_group=100_000):
    """A synthetic nucleus table: two classes with different sizes, spread over a 10 x 5 mm slide."""
    rng = np.random.default_rng(seed)
    writer = None
    done = 0
    while done < n:
        k = min(row_group, n - done)
        cls = rng.integers(1, 3, k)
        area = np.where(cls == 1, rng.normal(40, 8, k), rng.normal(20, 4, k)).clip(1)
        t = pa.table({
            "id": np.arange(done + 1, done + k + 1, dtype=np.uint32),
            "class_id": cls.astype(np.int16),
            "centroid_x_um": rng.uniform(0, 10_000, k), "centroid_y_um": rng.uniform(0, 5_000, k),
            "area_um2": area, "circularity": rng.uniform(0.5, 1, k).astype(np.float32),
            "score": rng.uniform(0.5, 1, k).astype(np.float32),
        })
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
        done += k
    writer.close()
    return path


def test_hand_built_slide_summary(tmp_path):
    # 6 nuclei, 2 classes, on a 1 x 1 mm slide with 0.5 mm² of tissue
    rows = {
        "class_id": [1, 1, 1, 2, 2, 0],
        "centroid_x_um": [50.0, 150.0, 950.0, 60.0, 70.0, 500.0],
        "centroid_y_um": [50.0, 50.0, 950.0, 40.0, 60.0, 500.0],
        "area_um2": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
        "score": [0.9, 0.8, 0.7, 0.6, 0.95, 0.5],
    }
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table(rows), p)
    st = compute_stats(p, ["tumour", "immune"], tissue_area_mm2=0.5, extent_um=(1000.0, 1000.0), cell_um=100.0)
    s = st.summary()
    assert s["nuclei"] == 6 and s["unknown_class"] == 1
    assert s["density_per_mm2"] == pytest.approx(12.0)
    assert s["classes"]["tumour"] == {"count": 3, "fraction": 0.5, "density_per_mm2": 6.0}
    assert s["classes"]["immune"]["count"] == 2
    tumour_area = s["features"]["tumour"]["area_um2"]
    assert tumour_area["mean"] == pytest.approx(20.0) and tumour_area["min"] == 10 and tumour_area["max"] == 30
    assert tumour_area["q50"] == pytest.approx(20.0, abs=500 / BINS + 1e-9)
    assert s["features"]["all"]["area_um2"]["mean"] == pytest.approx(35.0)
    d = st.density_per_mm2()  # layer 0 all, then one per class; cells of 0.01 mm²
    assert d.shape == (3, 10, 10)
    assert d[0, 0, 0] == pytest.approx(3 / 0.01)  # one tumour and two immune nuclei in cell (0, 0)
    assert d[1, 0, 0] == pytest.approx(1 / 0.01) and d[2, 0, 0] == pytest.approx(2 / 0.01)
    assert d[1, 0, 1] == pytest.approx(100) and d[1, 9, 9] == pytest.approx(100)
    assert d[0].sum() * 0.01 == pytest.approx(6)


def test_streamed_quantiles_match_exact(tmp_path):
    p = write_table(tmp_path / "big.parquet", 300_000, row_group=40_000)
    st = compute_stats(p, ["a", "b"], 50.0, (10_000.0, 5_000.0), batch_rows=32_768)
    t = pq.read_table(p).to_pandas()
    s = st.summary()
    assert s["nuclei"] == 300_000
    width = (RANGES["area_um2"][1] - RANGES["area_um2"][0]) / BINS
    for cid, name in [(1, "a"), (2, "b")]:
        exact = t.area_um2[t.class_id == cid]
        got = s["features"][name]["area_um2"]
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            assert got[f"q{int(q * 100):02d}"] == pytest.approx(exact.quantile(q), abs=2 * width)
        assert got["mean"] == pytest.approx(exact.mean()) and got["std"] == pytest.approx(exact.std(), rel=1e-3)
        assert s["classes"][name]["count"] == int((t.class_id == cid).sum())


def _peak_rss_mb(table):
    code = (
        "import resource, sys\nfrom wsiseg.stats import compute_stats\n"
        f"compute_stats({str(table)!r}, ['a', 'b'], 50.0, (10000.0, 5000.0), batch_rows=65536)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_rows(tmp_path):
    small = write_table(tmp_path / "s.parquet", 100_000)
    large = write_table(tmp_path / "l.parquet", 2_000_000)
    grow = _peak_rss_mb(large) - _peak_rss_mb(small)
    # 20x the rows (about 100 MB of columns in memory if loaded whole) adds almost nothing
    assert grow < 40, f"peak RSS grew by {grow:.0f} MB"


def test_stats_of_a_segment_run(tmp_path):
    from conftest import synthetic_he, write_pyramid_tiff

    from wsiseg.inference import ThresholdPredictor, threshold_card
    from wsiseg.pipeline import SegmentOptions, segment_slide

    img, truth = synthetic_he(600, 800, seed=2, n_nuclei=200)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=1, compression="zlib")
    out = tmp_path / "out"
    run = segment_slide(path, ThresholdPredictor(threshold_card(tile_size=256, overlap=64)), out,
                        SegmentOptions(tissue="whole", progress=False, density_cell_um=50))
    stats_dir = out / "stats"
    for f in ["summary.json", "summary.csv", "density.zarr", "density.png", "histograms.png", "overlay.png",
              "report.html"]:
        assert (stats_dir / f).exists(), f
    s = json.loads((stats_dir / "summary.json").read_text())
    assert s["nuclei"] == run["nuclei"]
    # the synthetic nuclei are ellipses with semi-axes 5-9 px by 0.7-1 of that, at 0.5 µm/px: 13.7-63.6 µm²
    area = s["features"]["all"]["area_um2"]
    assert 12 < area["q05"] and area["q95"] < 66
    assert s["features"]["all"]["hematoxylin_od"]["q50"] > 0.5  # dark purple nuclei
    # cells (on by default, 5 µm): each larger than its nucleus, the ratio below 1, per class too
    cell = s["features"]["nucleus"]
    assert cell["cell_area_um2"]["q50"] > 2 * area["q50"] and 0 < cell["nucleus_cell_area_ratio"]["q50"] < 0.6
    assert cell["cell_area_um2"]["count"] == run["nuclei"]
    html = (stats_dir / "report.html").read_text()
    assert "Summary by class" in html and html.count("data:image/png;base64") == 3
    assert "cell_area_um2_q50" in html
    # the CLI recomputes the same summary from the folder alone
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "stats", str(out), "--density-cell-um", "50"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((stats_dir / "summary.json").read_text())["features"] == s["features"]


def test_stats_error_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        write_stats(tmp_path)


def test_density_map_is_per_tissue_area_and_agrees_with_the_headline(tmp_path):
    """Cells are divided by the tissue they hold, so the tissue-weighted mean of the map is the headline
    density (cells at the edge of the tissue are not understated)."""
    from conftest import synthetic_he, write_pyramid_tiff

    from wsiseg.inference import ThresholdPredictor, threshold_card
    from wsiseg.pipeline import SegmentOptions, segment_slide

    img, _ = synthetic_he(700, 700, seed=4, n_nuclei=300)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=1, compression="zlib")
    region = tmp_path / "r.geojson"
    ring = [[60, 80], [610, 140], [520, 650], [90, 560], [60, 80]]
    region.write_text(json.dumps({"type": "Feature", "properties": {},
                                  "geometry": {"type": "Polygon", "coordinates": [ring]}}))
    out = tmp_path / "out"
    run = segment_slide(path, ThresholdPredictor(threshold_card(tile_size=256, overlap=64)), out,
                        SegmentOptions(tissue=str(region), progress=False, density_cell_um=40, on_oversize="drop"))
    s = json.loads((out / "stats" / "summary.json").read_text())
    g = zarr.open_group(str(out / "stats" / "density.zarr"), mode="r")
    d, area = g["0"][0], g["tissue_um2"][:]
    assert area.sum() == pytest.approx(run["tissue_area_mm2"] * 1e6, rel=1e-6)
    inside = area > 0
    assert np.isnan(d[~inside]).all() and not np.isnan(d[inside]).any()
    assert s["nuclei_outside_tissue_cells"] <= 0.02 * s["nuclei"]
    weighted = float((d[inside] * area[inside]).sum() / area[inside].sum())
    headline = (s["nuclei"] - s["nuclei_outside_tissue_cells"]) / run["tissue_area_mm2"]
    assert weighted == pytest.approx(headline, rel=1e-5)
    assert abs(weighted - s["density_per_mm2"]) <= 0.02 * s["density_per_mm2"]
    # a cell half covered by tissue is not half as dense as a full one
    half = (area > 0.3 * 1600) & (area < 0.7 * 1600)
    full = area > 0.99 * 1600
    assert half.any() and full.any()
    assert np.nanmean(d[half]) > 0.6 * np.nanmean(d[full])


def test_overlay_outlines_sit_on_the_nuclei(tmp_path):
    """stats/overlay.png: outlines in class colours where the GeoJSON polygons are, not a pixel off."""
    import cv2
    from conftest import synthetic_he, write_pyramid_tiff
    from shapely.geometry import shape

    from wsiseg.inference import ThresholdPredictor, threshold_card
    from wsiseg.pipeline import SegmentOptions, segment_slide

    img, _ = synthetic_he(1200, 1000, seed=8, n_nuclei=400, radius=(7, 11))
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.25, levels=1, compression="zlib")
    out = tmp_path / "out"
    segment_slide(path, ThresholdPredictor(threshold_card(mpp=0.25, tile_size=256, overlap=64)), out,
                  SegmentOptions(tissue="whole", progress=False, geojson="geojson"))
    over = cv2.cvtColor(cv2.imread(str(out / "stats" / "overlay.png")), cv2.COLOR_BGR2RGB)
    g = zarr.open_group(str(out / "s.ome.zarr"), mode="r")
    preview = np.moveaxis(g["0"][:], 0, -1)
    h, w = preview.shape[:2]
    assert over.shape[0] > h and over.shape[1] == w  # the legend strip lies below the image
    drawn = (over[:h] != preview).any(axis=2)
    assert (over[:h][drawn] == (220, 50, 50)).all()  # the class colour
    d = g.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][1] / 0.25
    # the nuclei's outlines as the GeoJSON gives them: each polygon (level-0 px = model px here) filled at the
    # preview's scale, its boundary pixels
    edges = np.zeros((h, w), np.uint8)
    for f in json.loads((out / "s.geojson").read_text())["features"]:
        ring = np.asarray(shape(f.get("nucleusGeometry", f["geometry"])).exterior.coords) / d
        filled = np.zeros((h, w), np.uint8)
        cv2.fillPoly(filled, [np.round((ring - 0.5) * 16).astype(np.int32)], 1, shift=4)
        edges |= filled - cv2.erode(filled, np.ones((3, 3), np.uint8))
    dist = cv2.distanceTransform((1 - edges).astype(np.uint8), cv2.DIST_L2, 5)
    in_place = dist[drawn].mean()
    shifted = dist[np.roll(drawn, (1, 1), axis=(0, 1))].mean()
    assert drawn.sum() > 1000 and in_place < 0.4 and shifted > 1.8 * in_place
