"""Resume inside a slide (issue 30): the model's outputs are kept per part of the tile grid, so a run that stops
continues from its finished parts and writes the same outputs as one uninterrupted pass."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import synthetic_he, write_pyramid_tiff
from helpers_model import tiny_model

from wsiseg.detections import RawDetections, TileDetections
from wsiseg.inference import ThresholdPredictor, load_predictor, threshold_card
from wsiseg.parts import Journal, journal_dir, part_tiles
from wsiseg.pipeline import SegmentOptions, segment_slide


def _slide(tmp_path: Path, h=520, w=700):
    img, _ = synthetic_he(h, w, seed=3, n_nuclei=260, radius=(5, 8))
    return write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=2, compression="zlib")


def _outputs(out: Path) -> dict:
    """What a user reads: the table, the GeoJSON's text, the label images."""
    root = zarr.open_group(str(out / "s.ome.zarr"), mode="r")
    with gzip.open(out / "s.geojson.gz", "rt") as f:
        gj = f.read()
    return {"table": pd.read_parquet(out / "s.nuclei.parquet"), "geojson": gj,
            **{k: root[f"labels/{k}/0"][:] for k in ("nuclei", "classes", "cells")}}


def _same(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["table"], b["table"])
    assert a["geojson"] == b["geojson"]
    for k in ("nuclei", "classes", "cells"):
        assert a[k].tobytes() == b[k].tobytes(), k


class Stopping:
    """A predictor that stops the run (as Ctrl-C does) after ``n`` batches."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n
        for k in ("card", "score_threshold", "mask_threshold", "device_name", "streams", "source"):
            setattr(self, k, getattr(inner, k))

    def infer(self, tiles):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.inner.infer(tiles)


def _opts(**kw):
    base = dict(tissue="whole", progress=False, writer="thread", on_oversize="drop", stats=False, part_tiles=8,
                batch_size=4)
    base.update(kw)
    return SegmentOptions(**base)


def _predictor(model: str, tmp_path: Path):
    """The classical baseline, or a small Mask R-CNN (raw outputs: float boxes and mask probabilities)."""
    if model == "threshold":
        return ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    model_path, _, _ = tiny_model(tmp_path, classes=("tumour", "immune"))
    return load_predictor(str(model_path), device="cpu")


@pytest.mark.parametrize("model", ["threshold", "mask_rcnn"])
def test_a_stopped_run_resumes_from_its_parts_and_writes_the_same_bytes(tmp_path, model):
    path = _slide(tmp_path)
    pred = _predictor(model, tmp_path)
    whole = segment_slide(path, pred, tmp_path / "whole", _opts())
    assert whole["parts"]["reused"] == 0 and whole["parts"]["parts"] > 4
    assert not journal_dir(tmp_path / "whole").exists()  # published: the journal is gone

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(path, Stopping(pred, 5), out, _opts())  # 5 batches of 4: two parts of 8 finished
    assert not out.exists()  # nothing that looks complete
    kept = sorted(p.name for p in journal_dir(out).glob("part-*.npz"))
    assert kept == ["part-000000.npz", "part-000001.npz"]
    resumed = segment_slide(path, pred, out, _opts())
    assert resumed["parts"]["reused"] == 2 and resumed["nuclei"] == whole["nuclei"] > 0
    _same(_outputs(out), _outputs(tmp_path / "whole"))


def test_parts_of_another_run_or_damaged_ones_are_never_used(tmp_path):
    path = _slide(tmp_path)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    segment_slide(path, pred, tmp_path / "whole", _opts())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(path, Stopping(pred, 6), out, _opts())
    parts = sorted(journal_dir(out).glob("part-*.npz"))
    assert len(parts) == 3
    # a changed setting: a new fingerprint, the old parts are dropped
    other = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48), threshold=0.55)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(path, Stopping(other, 2), out, _opts())
    assert sorted(p.name for p in journal_dir(out).glob("part-*.npz")) == ["part-000000.npz"]
    # damaged parts (truncated, foreign) are redone, not merged
    with pytest.raises(KeyboardInterrupt):
        segment_slide(path, Stopping(pred, 6), out, _opts())
    parts = sorted(journal_dir(out).glob("part-*.npz"))
    parts[0].write_bytes(parts[0].read_bytes()[:200])
    parts[1].write_bytes(parts[2].read_bytes())  # another part's tiles
    s = segment_slide(path, pred, out, _opts())
    assert s["parts"]["reused"] == 1 and s["parts"]["redone"] == 2
    _same(_outputs(out), _outputs(tmp_path / "whole"))


def test_a_part_keeps_every_output_exactly():
    rng = np.random.default_rng(0)
    raw = RawDetections(rng.random((3, 4), np.float32) * 100, rng.random(3, np.float32), np.array([0, 1, 1], np.int32),
                        rng.random((3, 28, 28), np.float32), rng.random((3, 2), np.float32))
    det = TileDetections(np.array([[1, 2, 5, 9], [3, 3, 4, 4]], np.int32), np.array([0.9, 0.7], np.float32),
                         np.zeros(2, np.int32), [rng.random((7, 4)) > 0.5, np.ones((1, 1), bool)])
    empty = TileDetections.empty()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        j = Journal(Path(tmp) / "j", "f" * 64)
        j.save(0, [5, 6, 7], [raw, det, empty])
        back = Journal(Path(tmp) / "j", "f" * 64).load(0, [5, 6, 7])
    a, b, c = back
    for x, y in [(raw.boxes, a.boxes), (raw.scores, a.scores), (raw.labels, a.labels),
                 (raw.mask_probs, a.mask_probs), (raw.class_probs, a.class_probs)]:
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert b.boxes.tobytes() == det.boxes.tobytes() and b.class_probs is None
    assert all(m.dtype == bool and (m == n).all() for m, n in zip(b.masks, det.masks))
    assert len(c) == 0 and c.boxes.shape == (0, 4)
    assert part_tiles(10, 4) == 12 and part_tiles(256, 32) == 256


def test_a_killed_command_resumes_with_the_same_command(tmp_path):
    """kill -9 in the middle of `wsiseg segment`, then the same command again: the same outputs."""
    img, _ = synthetic_he(1400, 1400, seed=4, n_nuclei=900, radius=(5, 8))
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=2, compression="zlib")
    cmd = [sys.executable, "-m", "wsiseg.cli", "segment", str(path), "--model", "threshold", "--whole-slide",
           "--tile-size", "128", "--overlap", "48", "--batch-size", "4", "--part-tiles", "4", "--no-stats",
           "--on-oversize", "drop", "--quiet"]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(journal_dir(out).glob("part-*.npz"))) < 3 and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    again = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["parts"]["reused"] >= 3
    _same(_outputs(out), _outputs(tmp_path / "ref"))


@pytest.mark.parametrize("model", ["threshold", "mask_rcnn"])
def test_parts_in_two_processes_write_what_one_pass_writes(tmp_path, model):
    path = _slide(tmp_path)
    pred = _predictor(model, tmp_path)
    one = segment_slide(path, pred, tmp_path / "one", _opts())
    two = segment_slide(path, pred, tmp_path / "two", _opts(processes=2))
    assert two["parts"]["computed_by_workers"] == two["parts"]["parts"] and two["parts"]["reused"] == 0
    assert two["nuclei"] == one["nuclei"] > 0
    _same(_outputs(tmp_path / "two"), _outputs(tmp_path / "one"))


def test_a_stopped_run_in_processes_resumes(tmp_path):
    path = _slide(tmp_path)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=128, overlap=48))
    segment_slide(path, pred, tmp_path / "whole", _opts())
    out = tmp_path / "out"

    import wsiseg.pipeline as pipeline  # the run's own process stops (as at Ctrl-C) while processes compute parts

    calls = {"n": 0}
    real = pipeline.Journal.load

    def load(self, part, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, part, ids)

    pipeline.Journal.load = load
    try:
        with pytest.raises(KeyboardInterrupt):
            segment_slide(path, pred, out, _opts(processes=2))
    finally:
        pipeline.Journal.load = real
    assert not out.exists() and len(list(journal_dir(out).glob("part-*.npz"))) >= 2
    s = segment_slide(path, pred, out, _opts(processes=2))
    assert s["parts"]["reused"] >= 2
    _same(_outputs(out), _outputs(tmp_path / "whole"))


class KillsItsWorkerOnce(ThresholdPredictor):
    """A predictor whose first call ends the process it runs in (as a lost cluster node would)."""

    def __init__(self, card, marker: str):
        super().__init__(card)
        self.marker = marker

    def infer(self, tiles):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return super().infer(tiles)


def test_one_slide_on_a_dask_cluster_survives_a_lost_worker(tmp_path):
    from distributed import LocalCluster

    path = _slide(tmp_path)
    card = threshold_card(mpp=0.5, tile_size=128, overlap=48)
    segment_slide(path, ThresholdPredictor(card), tmp_path / "whole", _opts())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        s = segment_slide(path, ThresholdPredictor(card), tmp_path / "dask",
                          _opts(scheduler=cluster.scheduler_address))
        assert s["parts"]["computed_by_workers"] == s["parts"]["parts"]
        _same(_outputs(tmp_path / "dask"), _outputs(tmp_path / "whole"))
        marker = tmp_path / "killed"
        s = segment_slide(path, KillsItsWorkerOnce(card, str(marker)), tmp_path / "lost",
                          _opts(scheduler=cluster.scheduler_address))
    assert marker.exists()  # a worker died mid-part ...
    assert s["parts"]["computed_by_workers"] == s["parts"]["parts"]  # ... and the cluster redid its part
    _same(_outputs(tmp_path / "lost"), _outputs(tmp_path / "whole"))
