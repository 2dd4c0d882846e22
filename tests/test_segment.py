from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import synthetic_he, write_pyramid_tiff
from helpers_model import tiny_model
from shapely.geometry import shape

from wsiseg.inference import ThresholdPredictor, load_predictor, threshold_card
from wsiseg.pipeline import OutputExistsError, SegmentOptions, segment_slide


def _slide(tmp_path, h=700, w=900, mpp=0.5, seed=1):
    img, truth = synthetic_he(h, w, seed=seed, n_nuclei=300, radius=(5, 8))
    return write_pyramid_tiff(tmp_path / "synth.tif", img, mpp, levels=2, compression="zlib"), img, truth


def _read_geojson(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def check_outputs(out, stem, card_classes, level0_per_model_px, model_mpp, compact=True):
    """What every consumer relies on: ids agree across Zarr, GeoJSON and table; valid geometry."""
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_parquet(out / f"{stem}.nuclei.parquet")
    assert len(table) == summary["nuclei"]
    assert table["id"].is_unique and set(table["id"]) == set(range(1, len(table) + 1))

    import geopandas as gpd

    gdf = gpd.read_file(f"/vsigzip/{out / f'{stem}.geojson.gz'}")  # as GIS tools read it (GDAL)
    assert len(gdf) == len(table) and gdf.geometry.is_valid.all() and set(gdf["id"]) == set(table["uuid"])
    gj = _read_geojson(out / f"{stem}.geojson.gz")
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == len(table)
    by_id = table.set_index("id")
    for f in feats:
        uuid.UUID(f["id"])
        props = f["properties"]
        cells = "nucleusGeometry" in f  # QuPath cells: the cell as geometry, the nucleus beside it
        assert props["objectType"] == ("cell" if cells else "detection") and "nucleusGeometry" not in props
        assert cells == (summary["settings"]["cell_expansion_px"] > 0)
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and len(cls["color"]) == 3
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in props["measurements"].values())
        nucleus = f["nucleusGeometry"] if cells else f["geometry"]
        for geom in (f["geometry"], nucleus):
            ring = geom["coordinates"][0]
            assert geom["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
            assert all(round(c, 2) == c for pt in ring for c in pt)
            assert shape(geom).is_valid
        poly = shape(nucleus)
        if cells:  # the cell holds its nucleus
            assert shape(f["geometry"]).buffer(0.5).contains(poly)
        row = by_id.loc[props["measurements"]["Nucleus ID"]]
        assert row["uuid"] == f["id"] and row["class_name"] == cls["name"]
        # polygon and table agree on where the nucleus is (level-0 pixels)
        x0, y0, x1, y1 = poly.bounds
        assert x0 <= row["centroid_x_px"] <= x1 and y0 <= row["centroid_y_px"] <= y1
        if compact:  # for round nuclei the outline's centroid is the mask's
            assert abs(poly.centroid.x - row["centroid_x_px"]) < 1.5 * level0_per_model_px
            assert abs(poly.centroid.y - row["centroid_y_px"]) < 1.5 * level0_per_model_px

    root = zarr.open_group(str(out / f"{stem}.ome.zarr"), mode="r")
    from ome_zarr_models.v05 import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    Image.from_zarr(root)  # validates as OME-Zarr 0.5, labels included
    names = ["nuclei", "classes"] + (["cells"] if summary["settings"]["cell_expansion_px"] > 0 else [])
    for name in names:
        ImageLabel.from_zarr(root["labels"][name])
    colors = root["labels/classes"].attrs["ome"]["image-label"]["colors"]
    assert [c["label-value"] for c in colors] == list(range(1, len(card_classes) + 1))
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    assert root["labels"].attrs["ome"]["labels"] == names
    lab_meta = root["labels/nuclei"].attrs["ome"]
    axes = lab_meta["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"] and axes[1]["unit"] == "micrometer"
    scale0 = lab_meta["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale0[1] == pytest.approx(model_mpp)
    labels = root["labels/nuclei/0"][0]
    assert labels.dtype == np.uint32
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert set(ids) == set(table["id"])  # every nucleus of the table is in the label image
    area_px = dict(zip(ids, counts))
    areas = table.set_index("id")["area_um2"] / model_mpp**2
    for i in ids:  # the same pixels: the label image's area is the table's
        assert abs(area_px[i] - areas[i]) <= 0.01, (i, area_px[i], areas[i])
    # and the same place: the label image's centroid is the table's
    ys, xs = np.nonzero(labels)
    sums = np.zeros((3, labels.max() + 1))
    np.add.at(sums, (0, labels[ys, xs]), 1)
    np.add.at(sums, (1, labels[ys, xs]), xs + 0.5)
    np.add.at(sums, (2, labels[ys, xs]), ys + 0.5)
    by_id = table.set_index("id")
    for i in ids:
        cx, cy = sums[1, i] / sums[0, i] * level0_per_model_px, sums[2, i] / sums[0, i] * level0_per_model_px
        assert abs(cx - by_id.loc[i, "centroid_x_px"]) < 0.02 and abs(cy - by_id.loc[i, "centroid_y_px"]) < 0.02
    classes = root["labels/classes/0"][0]
    assert ((classes > 0) == (labels > 0)).all()
    if "cells" in names:  # every nucleus pixel lies in its own cell, and the cell's area is the table's
        cells = root["labels/cells/0"][0]
        assert (cells[labels > 0] == labels[labels > 0]).all()
        cids, ccounts = np.unique(cells[cells > 0], return_counts=True)
        assert set(cids) == set(table["id"])
        cell_areas = table.set_index("id")["cell_area_um2"] / model_mpp**2
        assert all(abs(c - cell_areas[i]) <= 0.01 for i, c in zip(cids, ccounts))
    assert root["labels/classes"].attrs["ome"]["image-label"]["properties"][0]["class"] == card_classes[0]
    return summary, table, labels


def test_segment_generated_slide_threshold_model(tmp_path):
    path, img, truth = _slide(tmp_path)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=256, overlap=64))
    out = tmp_path / "out"
    segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, workers=2))
    s, table, labels = check_outputs(out, "synth", ["nucleus"], 1.0, 0.5)
    # the baseline finds nearly every synthetic nucleus, once
    assert 0.97 * truth.max() <= s["nuclei"] <= truth.max()
    # and the label image reproduces the truth
    inter = ((labels > 0) & (truth > 0)).sum() / ((labels > 0) | (truth > 0)).sum()
    assert inter > 0.9
    assert s["timings_s"]["forward"] > 0 and s["tiles"] == len(list(range(s["grid"][0] * s["grid"][1])))
    assert not (tmp_path / ".out.partial").exists()


def test_segment_same_nuclei_for_any_tile_size(tmp_path):
    path, _, _ = _slide(tmp_path, seed=4)
    results = []
    for tile, ov in [(1024, 0), (192, 64), (128, 48)]:
        pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=tile, overlap=ov))
        out = tmp_path / f"out{tile}"
        segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, zarr=False, geojson="none"))
        t = pd.read_parquet(out / "synth.nuclei.parquet")
        # nuclei at the slide's edge see padding beyond it in some tilings and none in others (the baseline's
        # blur reads across the edge): every other nucleus must come out the same
        t = t[t.centroid_x_px.between(12, 900 - 12) & t.centroid_y_px.between(12, 700 - 12)]
        results.append(sorted(zip(t.centroid_x_px.round(2), t.centroid_y_px.round(2), t.area_um2)))
    assert len(results[0]) > 250 and results[0] == results[1] == results[2]


def test_segment_upsampled_slide_with_mask_rcnn(tmp_path):
    # a 1.0 mpp slide for a 0.5 mpp model: coordinates must come back in slide pixels
    path, img, _ = _slide(tmp_path, h=300, w=400, mpp=1.0)
    model_path, _, card = tiny_model(tmp_path, classes=("tumour", "immune"))
    pred = load_predictor(str(model_path), device="cpu")
    out = tmp_path / "out"
    s = segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, on_oversize="drop"))
    assert s["resize_factor"] == 2.0 and s["tiles"] > 1
    summary, table, _ = check_outputs(out, "synth", ["tumour", "immune"], 0.5, 0.5, compact=False)
    assert s["nuclei"] > 0
    assert table.centroid_x_px.max() <= 400 and table.centroid_y_px.max() <= 300
    assert set(table.class_name) <= {"tumour", "immune"}


def test_existing_output_is_kept_and_failures_leave_nothing(tmp_path):
    path, _, _ = _slide(tmp_path, h=300, w=300)
    out = tmp_path / "out"
    out.mkdir()
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    with pytest.raises(OutputExistsError):
        segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False))
    out.rmdir()

    class Exploding(ThresholdPredictor):
        calls = 0

        def predict(self, tiles):
            Exploding.calls += 1
            if Exploding.calls == 2:
                raise RuntimeError("device lost")
            return super().predict(tiles)

    with pytest.raises(RuntimeError, match="device lost"):
        segment_slide(path, Exploding(pred.card), out, SegmentOptions(tissue="whole", progress=False, batch_size=1))
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_segment_real_svs_end_to_end(slides_dir, tmp_path):
    out = tmp_path / "cmu"
    proc = subprocess.run(
        [sys.executable, "-m", "wsiseg.cli", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
         "--model", "threshold", "--on-oversize", "drop", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary, table, labels = check_outputs(out, "CMU-1-Small-Region", ["nucleus"], 1.0, 0.499)
    assert summary["nuclei"] > 500  # the section holds well over a thousand nuclei
    assert 0.3 < summary["tissue_area_mm2"] < 1.2
    # nuclei lie on detected tissue, in slide pixel coordinates
    assert table.centroid_x_px.between(0, 2220).all() and table.centroid_y_px.between(0, 2967).all()
    assert 10 < table.area_um2.median() < 80  # nucleus-sized objects


def test_segment_cli_errors(slides_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(slides_dir / "unreadable.svs"),
                           "--model", "threshold", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unreadable.svs" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                           "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.safetensors" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_oversize_error_from_the_writer_leaves_no_output(tmp_path, writer):
    img = np.full((400, 400, 3), (236, 170, 200), np.uint8)
    img[150:260, 100:150] = (40, 18, 90)  # 50x110 px: wider than a 32 px overlap allows
    path = write_pyramid_tiff(tmp_path / "big.tif", img, 0.5, levels=1, compression="zlib")
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=32))
    from wsiseg.stitching import NucleusTooLargeError

    with pytest.raises(NucleusTooLargeError, match="larger overlap"):
        segment_slide(path, pred, tmp_path / "o", SegmentOptions(tissue="whole", progress=False, batch_size=1,
                                                                 writer=writer))
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_writer_process_and_thread_write_the_same_outputs(tmp_path):
    path, _, _ = _slide(tmp_path, h=300, w=400, mpp=0.5, seed=2)
    model_path, _, _ = tiny_model(tmp_path, classes=("tumour", "immune"))
    pred = load_predictor(str(model_path), device="cpu")
    runs = {}
    for writer in ("process", "thread"):
        out = tmp_path / writer
        s = segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, on_oversize="drop",
                                                          writer=writer, stats=False))
        assert s["writer"] == writer and s["nuclei"] > 0
        labels = zarr.open_group(str(out / "synth.ome.zarr"), mode="r")["labels/nuclei/0"][:]
        runs[writer] = (pd.read_parquet(out / "synth.nuclei.parquet"), _read_geojson(out / "synth.geojson.gz"), labels)
    (ta, ga, la), (tb, gb, lb) = runs["process"], runs["thread"]
    pd.testing.assert_frame_equal(ta, tb)
    assert ga == gb
    assert np.array_equal(la, lb)


def test_writer_process_that_dies_is_reported_and_leaves_no_output(tmp_path):
    import multiprocessing as mp
    import os
    import signal

    from wsiseg.sink import WriterProcessError

    path, _, _ = _slide(tmp_path, h=300, w=300)

    class KillsWriter(ThresholdPredictor):
        calls = 0

        def predict(self, tiles):
            KillsWriter.calls += 1
            if KillsWriter.calls == 2:
                for p in mp.active_children():
                    if p.name == "wsiseg-writer":
                        os.kill(p.pid, signal.SIGKILL)
                        p.join()
            return super().predict(tiles)

    pred = KillsWriter(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    with pytest.raises(WriterProcessError, match="exit code -9"):
        segment_slide(path, pred, tmp_path / "o", SegmentOptions(tissue="whole", progress=False, batch_size=1))
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_a_script_without_the_main_guard_gets_a_clear_error_not_a_hang(tmp_path):
    # the writer process is spawned: it re-runs a calling script, which fails there without the
    # `if __name__ == "__main__":` guard. The run must stop with an error naming the guard, however much the
    # writer is told at its start (here a region of 20,000 vertices: more than a pipe holds)
    path, _, _ = _slide(tmp_path, h=300, w=300)
    t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    ring = np.stack([150 + 140 * np.cos(t), 150 + 140 * np.sin(t)], 1).tolist()
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Feature", "properties": {},
                                  "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}}))
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from wsiseg.inference import ThresholdPredictor, threshold_card\n"
        "from wsiseg.pipeline import SegmentOptions, segment_slide\n"
        "pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))\n"
        f"segment_slide({str(path)!r}, pred, {str(tmp_path / 'o')!r}, SegmentOptions(tissue={str(region)!r}, "
        "progress=False, stats=False))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "WriterProcessError" in proc.stderr and "__main__" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


class _SlowPredictor(ThresholdPredictor):
    pidfile = None

    def predict(self, tiles):
        import multiprocessing as mp
        import time

        writers = [p.pid for p in mp.active_children() if p.name == "wsiseg-writer"]
        if writers and not self.pidfile.exists():
            self.pidfile.write_text(str(writers[0]))
        time.sleep(0.5)
        return super().predict(tiles)


def _segment_slowly(path, out, pidfile) -> None:
    pred = _SlowPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    pred.pidfile = pidfile
    segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, batch_size=1))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_writer_process_exits_when_the_segmenting_process_is_killed(tmp_path):
    import multiprocessing as mp
    import os
    import signal
    import time

    path, _, _ = _slide(tmp_path, h=300, w=300)
    pidfile = tmp_path / "writer.pid"
    proc = mp.get_context("spawn").Process(target=_segment_slowly, args=(path, tmp_path / "o", pidfile))
    proc.start()
    deadline = time.time() + 120
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.1)
    writer = int(pidfile.read_text())
    assert _running(writer)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    deadline = time.time() + 15
    while _running(writer) and time.time() < deadline:
        time.sleep(0.2)
    assert not _running(writer), "the writer process outlived the process that started it"
    assert not (tmp_path / "o").exists()


def _segment_in_child(path, out, results) -> None:
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    s = segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, stats=False))
    results.put((s["writer"], s["nuclei"]))


def test_daemonic_process_writes_in_a_thread(tmp_path):
    # a Dask worker is daemonic and may not start children: the writer runs in a thread there
    import multiprocessing as mp

    path, _, _ = _slide(tmp_path, h=300, w=300)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_segment_in_child, args=(path, tmp_path / "o", results), daemon=True)
    p.start()
    writer, nuclei = results.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0 and writer == "thread" and nuclei > 0


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_table_writer_streams_row_groups(tmp_path, suffix):
    import pandas as pd

    from wsiseg.outputs import TABLE_COLUMNS, TableWriter

    rows = [{c: float(i * 10 + k) for k, c in enumerate(TABLE_COLUMNS)} for i in range(7)]
    for i, r in enumerate(rows):
        r.update(id=i + 1, uuid=f"u{i}", class_id=1, class_name="tumour" if i % 2 else "immune")
    rows[3]["solidity"] = float("nan")
    w = TableWriter(tmp_path / f"t.{suffix}", batch=3)
    for r in rows:
        w.write(r)
    assert not (tmp_path / f"t.{suffix}").exists()  # only complete tables get the final name
    path = w.close()
    df = pd.read_parquet(path) if suffix == "parquet" else pd.read_csv(path)
    assert list(df.columns) == TABLE_COLUMNS and len(df) == 7
    assert df["id"].tolist() == list(range(1, 8)) and df["uuid"].tolist() == [f"u{i}" for i in range(7)]
    assert df["class_name"].tolist() == [r["class_name"] for r in rows]
    assert df["area_um2"].tolist() == pytest.approx([r["area_um2"] for r in rows])
    assert np.isnan(df["solidity"][3]) and df["solidity"][4] == pytest.approx(rows[4]["solidity"])
    if suffix == "parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(path).num_row_groups == 3


def test_table_writer_without_nuclei_writes_an_empty_table(tmp_path):
    import pandas as pd

    from wsiseg.outputs import TABLE_COLUMNS, TableWriter

    df = pd.read_parquet(TableWriter(tmp_path / "t.parquet").close())
    assert len(df) == 0 and list(df.columns) == TABLE_COLUMNS


@pytest.mark.parametrize("max_bytes", [96 << 20, 3000])
def test_chunk_buffer_writes_what_direct_writes_would(tmp_path, max_bytes):
    from wsiseg.outputs import ChunkBuffer

    rng = np.random.default_rng(1)
    H, W = 150, 230
    xs, ys = [0, 37, 90, 141, 200, 230], [0, 50, 99, 150]
    rects = [(ys[i], xs[j], ys[i + 1], xs[j + 1]) for i in range(3) for j in range(5) if rng.random() > 0.2]
    order = [rects[k] for k in rng.permutation(len(rects))]
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, H, W), chunks=(2, 32, 40), dtype="uint16",
                            fill_value=7)
    expected = np.full((2, H, W), 7, np.uint16)
    buf = ChunkBuffer(arr, rects, max_bytes=max_bytes)
    for r in order:
        data = rng.integers(0, 60000, (2, r[2] - r[0], r[3] - r[1]), dtype=np.uint16)
        expected[:, r[0] : r[2], r[1] : r[3]] = data
        buf.write(r, data)
    buf.close()
    np.testing.assert_array_equal(arr[:], expected)
    assert buf.nbytes == 0 and not buf.buffers
    if max_bytes == 3000:
        assert buf.spilled and buf.max_nbytes <= 3000 + 9 * (2 * 32 * 40 * 2)  # at most one rectangle past the cap


def test_interrupted_cli_run_says_so_and_leaves_nothing(tmp_path):
    import signal
    import time

    path, _, _ = _slide(tmp_path, h=1200, w=1200)
    model_path, _, _ = tiny_model(tmp_path)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "wsiseg.cli", "segment", str(path), "--model", str(model_path),
                             "--whole-slide", "--batch-size", "1", "--on-oversize", "drop", "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / ".o.partial").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_writer_process_ends_with_its_parent(tmp_path, how):
    import signal
    import time

    path, _, _ = _slide(tmp_path, h=1200, w=1200)
    model_path, _, _ = tiny_model(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "wsiseg.cli", "segment", str(path), "--model", str(model_path),
                             "--whole-slide", "--batch-size", "1", "--on-oversize", "drop", "--out",
                             str(tmp_path / "o"), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    children: list[int] = []
    while not children and time.time() < deadline:
        time.sleep(0.2)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        children = [int(c) for c in kids.read_text().split()] if kids.exists() else []
    assert children, "the writer process never started"
    time.sleep(1.0)
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)

    def running(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.time() + 30
    while any(map(running, children)) and time.time() < deadline:
        time.sleep(0.2)
    alive = [c for c in children if running(c)]
    assert not alive, f"writer process(es) {alive} outlived the killed run"


def _region_file(path, rings):
    feats = [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [r]}} for r in rings]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_region_keeps_exactly_the_nuclei_inside_it(tmp_path):
    from shapely.geometry import Point, Polygon

    path, _, _ = _slide(tmp_path, h=900, w=900, mpp=0.25)
    pred = ThresholdPredictor(threshold_card(mpp=0.25, tile_size=256, overlap=64))
    square = [[200, 200], [650, 200], [650, 600], [200, 600], [200, 200]]
    opts = SegmentOptions(tissue=str(_region_file(tmp_path / "sq.geojson", [square])), stats=False,
                          progress=False, on_oversize="drop")
    s = segment_slide(path, pred, tmp_path / "sq", opts)
    check_outputs(tmp_path / "sq", "synth", ["nucleus"], 1.0, 0.25)
    table = pd.read_parquet(tmp_path / "sq" / "synth.nuclei.parquet")
    poly = Polygon(square)
    assert len(table) == s["nuclei"] > 20 and s["outside_region"] > 0
    assert all(poly.contains(Point(x, y)) for x, y in zip(table.centroid_x_px, table.centroid_y_px))
    area_mm2 = 450 * 400 * (0.25 / 1000) ** 2
    assert s["tissue_area_mm2"] == pytest.approx(area_mm2, rel=1e-4)
    assert s["nuclei_per_mm2"] == pytest.approx(len(table) / area_mm2, rel=1e-3)
    segment_slide(path, pred, tmp_path / "whole", SegmentOptions(
        tissue="whole", stats=False, zarr=False, progress=False, on_oversize="drop"))
    inside = pd.read_parquet(tmp_path / "whole" / "synth.nuclei.parquet")
    n_inside = sum(poly.contains(Point(x, y)) for x, y in zip(inside.centroid_x_px, inside.centroid_y_px))
    assert abs(n_inside - len(table)) <= 2  # the same nuclei, up to masks differing between tile contexts

    bowtie = [[200, 200], [650, 600], [650, 200], [200, 600], [200, 200]]
    s = segment_slide(path, pred, tmp_path / "bow", SegmentOptions(
        tissue=str(_region_file(tmp_path / "bow.geojson", [bowtie])), stats=False, zarr=False, progress=False,
        on_oversize="drop"))
    assert any("repaired" in w for w in s["warnings"])
    assert s["tissue_area_mm2"] == pytest.approx(area_mm2 / 2, rel=1e-3)  # two triangles, not the square


def test_nuclei_reaching_into_tissue_free_cores_are_painted(tmp_path):
    """A region of one tile's core: its nuclei reach into the cores of tiles without tissue, and the label
    image still holds every pixel of every nucleus of the table."""
    img, _ = synthetic_he(900, 900, seed=11, n_nuclei=900, radius=(6, 9))
    path = write_pyramid_tiff(tmp_path / "synth.tif", img, 0.25, levels=1, compression="zlib")
    pred = ThresholdPredictor(threshold_card(mpp=0.25, tile_size=256, overlap=64))
    core = [[224, 224], [416, 224], [416, 416], [224, 416], [224, 224]]  # the core of tile (1, 1)
    s = segment_slide(path, pred, tmp_path / "o", SegmentOptions(
        tissue=str(_region_file(tmp_path / "core.geojson", [core])), stats=False, progress=False,
        on_oversize="drop"))
    assert s["tiles"] < s["grid"][0] * s["grid"][1]
    _, table, _ = check_outputs(tmp_path / "o", "synth", ["nucleus"], 1.0, 0.25)
    beyond = (table.bbox_x0_px < 224) | (table.bbox_y0_px < 224) | (table.bbox_x1_px > 416) | (table.bbox_y1_px > 416)
    assert beyond.sum() >= 3


def test_region_outside_the_slide_is_an_error(tmp_path):
    path, _, _ = _slide(tmp_path, h=600, w=600, mpp=0.25)
    far = [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(path), "--model", "threshold",
                           "--region", str(_region_file(tmp_path / "far.geojson", [far])), "--out",
                           str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "outside the slide" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_any_object_with_the_predictor_interface_segments_a_slide(tmp_path):
    """The pipeline needs only the Predictor protocol: a card, thresholds, a device name and ``infer``;
    raw Mask R-CNN-style output (box, score, M x M mask probabilities) is finished by the writer with the
    predictor's thresholds."""
    from wsiseg.detections import RawDetections

    class DiscPredictor:  # no base class
        card = threshold_card(mpp=0.5, tile_size=128, overlap=32)
        score_threshold, mask_threshold, device_name, streams = 0.5, 0.5, "test-device", 1

        def infer(self, tiles):
            yy, xx = np.mgrid[:28, :28]
            disc = (((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 12**2).astype(np.float32)
            out = []
            for px in tiles:  # one confident and one unconfident nucleus wherever a tile's centre is dark
                dark = px[56:72, 56:72].mean() < 200
                boxes = np.array([[54, 54, 74, 74], [10, 10, 30, 30]], np.float32)[: 2 if dark else 0]
                out.append(RawDetections(boxes, np.array([0.9, 0.3], np.float32)[: len(boxes)],
                                         np.zeros(len(boxes), np.int32), np.stack([disc, disc])[: len(boxes)]))
            return out

        def predict(self, tiles):
            return [r.finish(tiles.shape[1:3], self.score_threshold) for r in self.infer(tiles)]

    path, _, _ = _slide(tmp_path)
    pred = DiscPredictor()
    s = segment_slide(path, pred, tmp_path / "out", SegmentOptions(tissue="whole", writer="thread", progress=False))
    table = pd.read_parquet(tmp_path / "out" / "synth.nuclei.parquet")
    assert s["device"] == "test-device" and s["settings"]["score_threshold"] == 0.5
    assert len(table) == s["nuclei"] > 0
    assert (table["score"] >= 0.5).all()  # the 0.3 detections were dropped by the writer's finishing step
    assert table["area_um2"].between(40, 80).all()  # the 28 x 28 disc pasted into its 20 px box (r ≈ 8.6 px)


def test_outputs_are_the_same_bytes_for_any_number_of_writer_workers(tmp_path):
    """Finishing detections and measuring nuclei in a pool of processes changes no byte of any output."""
    path, _, _ = _slide(tmp_path, h=900, w=1100, seed=4)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    runs = {}
    for workers, writer in ((1, "thread"), (3, "process")):
        out = tmp_path / f"out{workers}"
        s = segment_slide(path, pred, out, SegmentOptions(tissue="whole", progress=False, writer=writer,
                                                          writer_workers=workers))
        assert s["settings"]["writer_workers"] == workers and s["nuclei"] > 100
        runs[workers] = out
    files = sorted(p.relative_to(runs[1]) for p in runs[1].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(runs[3]) for p in runs[3].rglob("*") if p.is_file())
    compared = 0
    for f in files:
        if f.name in ("summary.json", ".wsiseg-output", "report.html") or f.parent.name == "stats" and f.suffix == ".json":
            continue  # timings, dates and the worker count itself
        assert (runs[1] / f).read_bytes() == (runs[3] / f).read_bytes(), f
        compared += 1
    assert compared > 20  # GeoJSON, table, every Zarr chunk and attribute file, statistics images


def test_run_sizes_follow_the_device(tmp_path):
    """Batch size, readers and writer processes are decided in one place, from the device: the CPU keeps its
    cores for the model; beside a GPU the CPU side is spread over the cores and batches are larger."""
    from wsiseg.pipeline import device_defaults

    assert device_defaults("cpu", 256) == {"batch_size": 4, "workers": 2, "prefetch": 8, "writer_workers": 1}
    gpu = device_defaults("cuda:0", 256, cores=16)
    assert gpu == {"batch_size": 32, "workers": 4, "prefetch": 64, "writer_workers": 14}
    assert device_defaults("cuda", 512, cores=16)["batch_size"] == 8  # the same pixels per batch
    assert device_defaults("cuda", 256, cores=2)["writer_workers"] == 1
    path, _, _ = _slide(tmp_path)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=256, overlap=64))
    s = segment_slide(path, pred, tmp_path / "out", SegmentOptions(tissue="whole", progress=False, zarr=False))
    assert s["settings"]["batch_size"] == 4 and s["settings"]["writer_workers"] == 1
    s = segment_slide(path, pred, tmp_path / "out2", SegmentOptions(tissue="whole", progress=False, zarr=False,
                                                                     batch_size=3))
    assert s["settings"]["batch_size"] == 3
