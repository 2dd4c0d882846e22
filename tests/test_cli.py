from __future__ import annotations

import json
import subprocess
import sys


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
