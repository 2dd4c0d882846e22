from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args):
    return subprocess.run([sys.executable, "-m", "wsiseg.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_plans_grid(slides_dir):
    proc = run("info", str(slides_dir / "CMU-1-Small-Region.svs"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dimensions"] == [2220, 2967] and info["mpp"] == 0.499
    plan = info["plan"]
    assert plan["resize_factor"] > 1.9 and plan["tiles"] > 0
    assert plan["tissue_area_mm2"] > 0.3


def test_info_text_and_missing_mpp(slides_dir):
    proc = run("info", str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"))
    assert proc.returncode == 0
    assert "pass --mpp" in proc.stdout
    proc = run("info", str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"), "--mpp", "1.0")
    assert "tiles" in proc.stdout and "mm²" in proc.stdout


def test_info_damaged_file_exit_code(slides_dir):
    proc = run("info", str(slides_dir / "broken.svs"))
    assert proc.returncode == 2
    assert "broken.svs" in proc.stderr and "Traceback" not in proc.stderr


def test_info_plans_the_grid_segment_uses(tmp_path):
    """Without options, info plans for the bundled model exactly the grid segment then runs."""
    from conftest import synthetic_he, write_pyramid_tiff

    img, _ = synthetic_he(400, 500, seed=3, n_nuclei=60)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=1, compression="zlib")
    proc = run("info", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    proc = run("segment", str(path), "--out", str(tmp_path / "o"), "--quiet", "--no-stats", "--no-zarr")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert plan["model"] == summary["model"]
    assert (plan["tiles"], plan["grid"], plan["tile_size"], plan["overlap"], plan["model_mpp"]) == (
        summary["tiles"], summary["grid"], summary["tile_size"], summary["overlap"], summary["model_mpp"])


def test_known_failures_have_their_own_exit_codes():
    import errno

    from wsiseg.cli import _exit_code
    from wsiseg.errors import DeviceUnavailableError, SchedulerUnreachableError

    cases = [(OSError(errno.ENOSPC, "No space left on device", "/out/x.parquet"), 3, "no space left"),
             (OSError(errno.EROFS, "Read-only file system", "/out"), 3, "read-only"),
             (PermissionError(errno.EACCES, "Permission denied", "/out"), 3, "permission denied"),
             (DeviceUnavailableError("device 'cuda' requested but CUDA is not available"), 4, "CUDA"),
             (SchedulerUnreachableError("Dask scheduler tcp://x:1: cannot connect"), 5, "scheduler"),
             (ValueError("bad option"), 2, "bad option"),
             (KeyError("boom"), 70, "--debug")]
    for exc, code, text in cases:
        got, message = _exit_code(exc)
        assert got == code and text in message and "\n" not in message, (exc, got, message)


def test_debug_shows_the_traceback(tmp_path):
    proc = run("segment", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run("segment", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_public_api_is_lazy_and_the_writer_side_never_imports_torch(tmp_path):
    """`import wsiseg` is cheap; stitching and every writer (what the writer process runs) work without torch."""
    code = f"""
import sys
import wsiseg
assert "torch" not in sys.modules and "wsiseg.slide" not in sys.modules
assert callable(wsiseg.open_slide) and callable(wsiseg.evaluate) and "torch" not in sys.modules
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import synthetic_he
import numpy as np
from pathlib import Path
from wsiseg.card import ModelCard, default_classes, ModelConfig
from wsiseg.detections import TileDetections
from wsiseg.sink import SlideWriter, WriterSpec
from wsiseg.tiling import ReadPlan, make_grid
grid = make_grid(300, 300, 256, 64)
card = ModelCard("t", default_classes(["nucleus"]), 0.25, 256, 64, config=ModelConfig(num_classes=1))
out = Path({str(tmp_path)!r})
run = {{"slide": "s.tif", "slide_dimensions": [300, 300], "slide_mpp": 0.25, "tissue_area_mm2": 0.005,
        "model": "t", "classes": [{{"name": "nucleus", "color": [1, 2, 3]}}]}}
w = SlideWriter(WriterSpec(out, "s", grid, ReadPlan(0, 1.0, 0.25, 0.25, 1.0), "s.tif", card, stats_run=run))
img, lab = synthetic_he(300, 300, seed=1, n_nuclei=20)
for t in grid.tiles:
    px = np.full((1, 256, 256, 3), 255, np.uint8)
    sub = img[t.y:t.y + 256, t.x:t.x + 256]
    px[0, :sub.shape[0], :sub.shape[1]] = sub
    w.add([t], px, [TileDetections.empty()])
w.close()
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))
assert not bad, bad[:5]
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
