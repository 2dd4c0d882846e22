"""One whole gigapixel slide end to end: a real-tissue pyramidal TIFF of at least 1 cm², segmented with one kill
and resume on the way, every process's memory watched, every output opened with the reader users use.

    python benchmarks/gigapixel.py build [--size 40000] [--slide /tmp/wsiseg-giga/giga.tif]
    python benchmarks/gigapixel.py run   [--slide ...] [--out /tmp/wsiseg-giga/out] [--kill-at 0.5]
    python benchmarks/gigapixel.py all   (build, then run)

``build`` tiles real tissue into a ``size`` x ``size`` px image at 0.25 µm/px (40,000 px: 1 cm²): 1024 px blocks,
each a crop of the shared MoNuSeg images (0.25 µm/px), the CoNSeP tiles and the sample slide (upsampled from
0.5 µm/px), in a fixed pseudo-random order with flips and rotations; written with tifffile as a tiled JPEG
BigTIFF with its pyramid (each level built block by block, never the whole image in memory) and the mpp in its
resolution tags. ``run`` runs ``wsiseg segment`` on it in the background (the default model, cells on), kills
it with SIGKILL once ``--kill-at`` of the parts are in the journal, runs the same command again to the end, and
samples the resident memory of every process of the run each second. It then times opening each output
(the GeoJSON with QuPath's own reader ``../shared/tools/qupath-check``, the table with pandas, the OME-Zarr with
ome-zarr-models) and ``wsiseg stats``, and writes ``benchmarks/results/gigapixel.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSISEG_DATA", REPO.parent / "shared" / "data"))
BLOCK = 1024
MPP = 0.25


def patches() -> list[np.ndarray]:
    """1024 px tissue crops at 0.25 µm/px from the shared images and the sample slide."""
    import cv2
    import tiffslide

    out = []
    for f in sorted((DATA / "monuseg-train" / "images").glob("*.png"))[:30]:
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        out.append(cv2.resize(img, (BLOCK, BLOCK), interpolation=cv2.INTER_LINEAR))  # 1000 -> 1024 px
    s = tiffslide.open_slide(str(REPO / "examples" / "CMU-1-Small-Region.svs"))
    cmu = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    for y, x in [(900, 950), (1500, 900), (2000, 1000), (2400, 1250), (1100, 1150)]:  # tissue, at 0.5 µm/px
        crop = cmu[y : y + BLOCK // 2, x : x + BLOCK // 2]
        if crop.shape[:2] == (BLOCK // 2, BLOCK // 2):
            out.append(cv2.resize(crop, (BLOCK, BLOCK), interpolation=cv2.INTER_CUBIC))
    return out


def block(patch_list: list[np.ndarray], by: int, bx: int, d: int, cache: dict) -> np.ndarray:
    """The block at (by, bx) downsampled ``d`` times: a patch in a fixed pseudo-random pose."""
    import cv2

    rng = np.random.default_rng([by, bx])
    k, rot, flip = int(rng.integers(len(patch_list))), int(rng.integers(4)), bool(rng.integers(2))
    key = (k, rot, flip, d)
    if key not in cache:
        p = np.rot90(patch_list[k], rot)
        p = p[:, ::-1] if flip else p
        cache[key] = np.ascontiguousarray(
            p if d == 1 else cv2.resize(p, (BLOCK // d, BLOCK // d), interpolation=cv2.INTER_AREA))
    return cache[key]


def build(path: Path, size: int, tile: int = 512) -> dict:
    import tifffile

    patch_list = patches()
    t0 = time.perf_counter()
    levels = []
    d = 1
    while size // d >= 1024 or d == 1:
        levels.append(d)
        d *= 4
    cache: dict = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, d in enumerate(levels):
            n = size // d
            b = BLOCK // d

            def tiles(n=n, b=b, d=d):
                for ty in range(0, n, tile):
                    for tx in range(0, n, tile):
                        out = np.zeros((tile, tile, 3), np.uint8)  # composed from the blocks it covers
                        for by in range(ty // b, (min(ty + tile, n) - 1) // b + 1):
                            for bx in range(tx // b, (min(tx + tile, n) - 1) // b + 1):
                                blk = block(patch_list, by, bx, d, cache)
                                y0, x0 = by * b, bx * b
                                iy0, ix0 = max(y0, ty), max(x0, tx)
                                iy1, ix1 = min(y0 + b, ty + tile, n), min(x0 + b, tx + tile, n)
                                out[iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx] = \
                                    blk[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
                        yield out

            m = MPP * d
            tif.write(tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg", compressionargs={"level": 90}, subfiletype=1 if i else 0,
                      resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER")
    os.replace(tmp, path)
    return {"size_px": size, "area_cm2": (size * MPP / 1e4) ** 2, "levels": levels, "file_mb": path.stat().st_size / 1e6,
            "build_s": round(time.perf_counter() - t0, 1)}


class Watch:
    """Samples the resident memory of a process and all its children every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 1.0):
        import psutil

        self.root, self.every, self.peak, self.series = psutil.Process(pid), every, {}, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        name = " ".join(p.cmdline()[1:4])[:60] or p.name()
                    except psutil.Error:
                        continue
                    total += rss
                    self.peak[f"{p.pid} {name}"] = max(self.peak.get(f"{p.pid} {name}", 0), rss)
                self.series.append((round(time.monotonic() - t0, 1), total))
            except psutil.Error:
                pass
            self.stop.wait(self.every)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        mb = 1 / 2**20
        totals = [t for _, t in self.series]
        q = max(1, len(totals) // 4)
        return {"peak_rss_mb_by_process": {k: round(v * mb) for k, v in self.peak.items()},
                "total_rss_mb_first_quarter_max": round(max(totals[:q]) * mb) if totals else None,
                "total_rss_mb_last_quarter_max": round(max(totals[-q:]) * mb) if totals else None,
                "samples": len(totals)}


def segment(cmd: list[str], journal: Path | None = None, kill_at: float | None = None, parts: int = 0) -> dict:
    """Run ``cmd``; with ``kill_at``, SIGKILL it once that share of ``parts`` is in ``journal``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    watch = Watch(proc.pid)
    killed = False
    while proc.poll() is None:
        if kill_at is not None and journal is not None and \
                len(list(journal.glob("part-*.npz"))) >= max(1, int(kill_at * parts)):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(1.0)
    out, err = proc.communicate()
    return {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode, "killed": killed,
            "memory": watch.close(), "stdout": out[-2000:], "stderr": err[-2000:]}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return round(time.perf_counter() - t0, 2), r


def open_outputs(out: Path) -> dict:
    import pandas as pd
    import zarr
    from ome_zarr_models.v05 import Image

    res = {}
    gj = next(out.glob("*.geojson*"))
    tool = REPO.parent / "shared" / "tools" / "qupath-check" / "qupath-check"
    t, proc = timed(lambda: subprocess.run([str(tool), str(gj)], capture_output=True, text=True,
                                           env={**os.environ, "QUPATH_CHECK_JAVA_OPTS": "-Xmx16g"}))
    seen = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout.strip() else {"ok": False, "error": proc.stderr[-500:]}
    res["geojson_qupath"] = {"seconds": t, "ok": seen.get("ok"), "objects": seen.get("objects"),
                             "invalid_rois": seen.get("invalid_rois"), "read_seconds": seen.get("read_seconds"),
                             "error": seen.get("error"), "exception": seen.get("exception")}
    t, table = timed(lambda: pd.read_parquet(next(out.glob("*.nuclei.parquet"))))
    res["table_pandas"] = {"seconds": t, "rows": len(table)}
    z = next(out.glob("*.ome.zarr"))
    t, _ = timed(lambda: Image.from_zarr(zarr.open_group(str(z), mode="r")))
    res["ome_zarr_models"] = {"seconds": t}
    t, proc = timed(lambda: subprocess.run([sys.executable, "-m", "wsiseg.cli", "stats", str(out)],
                                           capture_output=True, text=True))
    res["stats_and_report"] = {"seconds": t, "rc": proc.returncode}
    res["output_mb"] = {p.name: round(sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*"))
                                          if f.is_file()) / 1e6, 1) for p in out.iterdir()}
    return res


def time_lost(first: dict | None, second: dict, parts: dict) -> dict:
    """The time the kill cost: both sittings against one pass at the first sitting's pace (seconds a part).

    The first sitting's pace holds the model and the merge of its parts; the second sitting reruns the merge
    of the reused parts (pixels read again, stitching, cells, writers) but not their model, so the difference
    is what a resume costs: the part in flight, a fresh start, and that merge done a second time."""
    if not first or not parts.get("reused"):
        return {}
    pace = first["wall_s"] / parts["reused"]
    one_pass = pace * parts["parts"]
    lost = first["wall_s"] + second["wall_s"] - one_pass
    return {"one_pass_s_estimated": round(one_pass, 1), "time_lost_to_kill_s": round(lost, 1),
            "time_lost_share": round(lost / one_pass, 3)}


def run(slide: Path, out: Path, kill_at: float, part_tiles: int) -> dict:
    from wsiseg.parts import journal_dir

    cmd = [sys.executable, "-m", "wsiseg.cli", "segment", str(slide), "--out", str(out), "--overwrite", "--quiet",
           "--part-tiles", str(part_tiles), "--on-oversize", "drop"]  # (a mosaic's block seams make a few)
    shutil.rmtree(journal_dir(out), ignore_errors=True)  # a clean start: no parts of an earlier try
    info = json.loads(subprocess.run([sys.executable, "-m", "wsiseg.cli", "info", str(slide), "--json"],
                                     capture_output=True, text=True).stdout or "{}")
    tiles = int(info.get("plan", {}).get("tiles", 0) or 0)
    parts = -(-tiles // part_tiles) if tiles else 0
    first = segment(cmd, journal_dir(out), kill_at, parts) if kill_at else None
    second = segment(cmd)
    summary = json.loads((out / "summary.json").read_text())
    return {**time_lost(first, second, summary.get("parts") or {}),
            "tiles": summary["tiles"], "nuclei": summary["nuclei"], "tissue_mm2": summary["tissue_area_mm2"],
            "dropped_oversize": summary.get("dropped_oversize"),
            "first_sitting": first, "to_the_end": second, "parts": summary.get("parts"),
            "wall_s_total": round((first["wall_s"] if first else 0) + second["wall_s"], 1),
            "tiles_per_s_second_sitting": round(summary["tiles"] / summary["wall_s"], 2),
            "outputs": open_outputs(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "run", "all"])
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--slide", default="/tmp/wsiseg-giga/giga.tif")
    ap.add_argument("--out", default="/tmp/wsiseg-giga/out")
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--part-tiles", type=int, default=256)
    ap.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "gigapixel.json"))
    a = ap.parse_args()
    slide, res = Path(a.slide), {}
    if a.what in ("build", "all"):
        res["build"] = build(slide, a.size)
        print(json.dumps(res["build"]))
    if a.what in ("run", "all"):
        res["run"] = run(slide, Path(a.out), a.kill_at, a.part_tiles)
        r = res["run"]
        print(f"tiles {r['tiles']}, nuclei {r['nuclei']}, tissue {r['tissue_mm2']:.1f} mm², wall {r['wall_s_total']} s "
              f"({r['tiles_per_s_second_sitting']} tiles/s in the last sitting), parts {r['parts']}")
        for k in ("first_sitting", "to_the_end"):
            if r[k]:
                m = r[k]["memory"]
                print(f"{k}: {r[k]['wall_s']} s, rc {r[k]['rc']}, total RSS max first/last quarter "
                      f"{m['total_rss_mb_first_quarter_max']}/{m['total_rss_mb_last_quarter_max']} MB")
        if "time_lost_to_kill_s" in r:
            print(f"kill and resume cost {r['time_lost_to_kill_s']} s against one pass at the first sitting's pace "
                  f"({r['one_pass_s_estimated']} s, {100 * r['time_lost_share']:.1f}%)")
        print(json.dumps(r["outputs"], indent=1))
    write_result(a.result, {"benchmark": "gigapixel", "slide": str(slide), **res})


if __name__ == "__main__":
    main()
