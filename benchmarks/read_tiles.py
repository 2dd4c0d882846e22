"""Tile streaming throughput against raw JPEG decoding of the same slide, in one run.

Generates a pyramidal JPEG TIFF (default 20000 x 20000), streams its full tile
grid through ``wsiseg.tiling.stream_tiles`` with each backend, and decodes every
JPEG tile of level 0 with tifffile's own decoder (no region assembly, no
copies) as the baseline. Prints a table and writes JSON.

    python benchmarks/read_tiles.py [--size 20000] [--workers 2] [--tile 512 --overlap 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import write_result


def make_slide(path: Path, size: int, tile: int = 256, mpp: float = 0.25) -> None:
    import cv2
    import tifffile

    rng = np.random.default_rng(0)
    bank = []
    for _ in range(16):
        t = np.empty((tile, tile, 3), np.uint8)
        t[:] = (232, 170, 205)
        for _ in range(40):
            c = tuple(int(v) for v in rng.integers(10, tile - 10, 2))
            cv2.circle(t, c, int(rng.integers(4, 10)), (40, 18, 90), -1)
        t = np.clip(t.astype(np.int16) + rng.integers(-12, 12, t.shape), 0, 255).astype(np.uint8)
        bank.append(t)

    def tiles(h: int, w: int):
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                yield bank[(x // tile * 7 + y // tile * 3) % len(bank)]

    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 85})
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        w = h = size
        level = 0
        while True:
            m = mpp * 2**level
            tif.write(tiles(h, w), shape=(h, w, 3), dtype=np.uint8, subfiletype=1 if level else 0,
                      resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER", **opts)
            if max(w, h) <= 2048:
                break
            w, h, level = w // 2, h // 2, level + 1


def raw_decode(path: Path, threads: int) -> tuple[float, float]:
    """Seconds and megapixels to decode every JPEG tile of level 0."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        fh = tif.filehandle
        chunks = []
        for off, n in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            chunks.append(fh.read(n))
        t0 = time.perf_counter()
        if threads == 1:
            px = sum(page.decode(c, i, jpegtables=page.jpegtables)[0].size for i, c in enumerate(chunks))
        else:
            with ThreadPoolExecutor(threads) as pool:
                px = sum(pool.map(lambda ic: page.decode(ic[1], ic[0], jpegtables=page.jpegtables)[0].size,
                                  enumerate(chunks)))
        dt = time.perf_counter() - t0
    return dt, px / 3 / 1e6


def stream(path: Path, backend: str, workers: int, tile: int, overlap: int, prefetch: int) -> dict:
    from wsiseg.slide import open_slide
    from wsiseg.tiling import make_grid, plan_resolution, stream_tiles

    slide = open_slide(path, backend=backend)
    plan = plan_resolution(slide.require_mpp(), slide.level_downsamples, slide.mpp)
    w, h = plan.model_size(slide.dimensions)
    grid = make_grid(w, h, tile, overlap)
    t0 = time.perf_counter()
    n = 0
    checksum = 0
    for t, px in stream_tiles(slide, plan, grid, workers=workers, prefetch=prefetch):
        n += 1
        checksum += int(px[0, 0, 0])
    dt = time.perf_counter() - t0
    mp = n * tile * tile / 1e6
    return {"backend": backend, "workers": workers, "tiles": n, "seconds": dt, "tiles_per_s": n / dt,
            "mp_per_s": mp / dt, "image_mp_per_s": w * h / 1e6 / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--backends", default="openslide,tiffslide")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "read_tiles.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.tif"
        t0 = time.perf_counter()
        make_slide(path, args.size)
        print(f"generated {args.size}x{args.size} JPEG TIFF ({path.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t0:.1f} s")
        raw1_s, raw_mp = raw_decode(path, 1)
        raw2_s, _ = raw_decode(path, args.workers)
        rows = [stream(path, b, args.workers, args.tile, args.overlap, args.prefetch) for b in args.backends.split(",")]

    raw1, raw2 = raw_mp / raw1_s, raw_mp / raw2_s
    print(f"\n{'reader':<28}{'tiles/s':>10}{'MP/s':>10}{'image MP/s':>12}{'vs raw 1 thr':>14}{'vs raw ' + str(args.workers) + ' thr':>14}")
    print(f"{'raw JPEG decode, 1 thread':<28}{'':>10}{raw1:>10.1f}{raw1:>12.1f}{1.0:>14.2f}{raw1 / raw2:>14.2f}")
    print(f"{'raw JPEG decode, ' + str(args.workers) + ' threads':<28}{'':>10}{raw2:>10.1f}{raw2:>12.1f}{raw2 / raw1:>14.2f}{1.0:>14.2f}")
    for r in rows:
        r["ratio_vs_raw_1_thread"] = r["mp_per_s"] / raw1
        r["ratio_vs_raw_n_threads"] = r["mp_per_s"] / raw2
        name = f"wsiseg {r['backend']}, {r['workers']} workers"
        print(f"{name:<28}{r['tiles_per_s']:>10.1f}{r['mp_per_s']:>10.1f}{r['image_mp_per_s']:>12.1f}"
              f"{r['ratio_vs_raw_1_thread']:>14.2f}{r['ratio_vs_raw_n_threads']:>14.2f}")
    print("\nMP/s counts delivered tile pixels (overlap included); image MP/s counts the slide area covered.")
    result = {
        "benchmark": "read_tiles", "size": args.size, "tile": args.tile, "overlap": args.overlap,
        "raw_decode": {"mp": raw_mp, "mp_per_s_1_thread": raw1, f"mp_per_s_{args.workers}_threads": raw2},
        "stream": rows, "goal": "stream MP/s >= 0.5 x raw decode with 2 workers",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
