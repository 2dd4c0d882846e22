"""The writing side of a run without the model: replay a slide's recorded model outputs through
post-processing, stitching and every writer, and report how fast one process goes and where the time goes.

    python benchmarks/writer.py [--slide examples/CMU-1-Small-Region.svs] [--model M]
                                [--processes 1 2] [--workers 1 2] [--cell-expansion 5] [--out benchmarks/results/writer.json]

The model runs once over the slide's tiles and its raw outputs (boxes, scores, classes, mask probabilities)
and the tiles' pixels are kept in memory; then each replay feeds them, in batches as the pipeline does, to a
:class:`wsiseg.sink.SlideWriter` writing into a temporary folder. Reported per process: tiles/s, nuclei/s and
the seconds of each stage (post-processing with mask pasting, stitching, writing: records with features,
polygons and GeoJSON, the table, Zarr painting; then closing: pyramid, preview and statistics). Cells are grown
as ``segment`` grows them (``--cell-expansion``, µm; 0: nuclei only). With several
``--processes`` the replay runs that many times at once, one per process, as independent slides would (the
machine's capacity for the writing side). With ``--workers`` one slide is replayed through a SlideWriter with
that many pool processes (finishing detections, measuring and outlining nuclei), as a GPU run does.
Goal of issue 18: at least 15 tiles/s per core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

REPO = HERE.parent


def record(slide_path: str, model: str, batch: int = 4):
    """The slide's plan, its tiles' pixels and the model's raw outputs (numpy), in tile order."""
    from wsiseg.inference import load_predictor
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_slide, stream_tiles

    pred = load_predictor(model, device="cpu")
    slide = open_slide(slide_path)
    sp = plan_slide(slide, pred.card.mpp, pred.card.tile_size, pred.card.overlap)
    tiles, pixels = [], []
    for t, px in stream_tiles(slide, sp.plan, sp.grid, workers=2, prefetch=8):
        tiles.append(t)
        pixels.append(px)
    raws = []
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch):
        raws += pred.infer(np.stack(pixels[i : i + batch]))
    forward_s = time.perf_counter() - t0
    return sp, pred.card, pred.score_threshold, pred.mask_threshold, tiles, pixels, raws, forward_s, slide


def replay(args) -> dict:
    """One replay through a SlideWriter; returns its counts and stage timings."""
    sp, card, score_t, mask_t, tiles, pixels, raws, slide_info, batch, cell_um, *rest = args
    workers = rest[0] if rest else 1
    from wsiseg.cells import expansion_px
    from wsiseg.sink import SlideWriter, WriterSpec

    with tempfile.TemporaryDirectory() as tmp:
        run = {**slide_info["run"], "tissue_mask": sp.tissue.mask, "tissue_downsample": sp.tissue.downsample}
        spec = WriterSpec(tmp_dir=Path(tmp), stem="replay", grid=sp.grid, plan=sp.plan, slide_name=slide_info["name"], card=card,
                          score_threshold=score_t, mask_threshold=mask_t, stats_run=run, workers=workers,
                          cell_px=expansion_px(cell_um, sp.plan.model_mpp, sp.grid),
                          tissue_mask=sp.tissue.mask, tissue_downsample=sp.tissue.downsample)
        t0 = time.perf_counter()
        w = SlideWriter(spec)
        for i in range(0, len(tiles), batch):
            w.add(tiles[i : i + batch], np.stack(pixels[i : i + batch]), raws[i : i + batch])
        result = w.close()
        wall = time.perf_counter() - t0
    n = int(sum(result["per_class"]))
    return {"tiles": len(tiles), "nuclei": n, "wall_s": round(wall, 3), "tiles_per_s": round(len(tiles) / wall, 2),
            "nuclei_per_s": round(n / wall, 1), "stages_s": {k: round(v, 3) for k, v in result["timings_s"].items()}}


def main() -> None:
    from wsiseg.card import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(REPO / "examples" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="writer pool sizes for one slide (SlideWriter workers)")
    ap.add_argument("--cell-expansion", type=float, default=5.0, help="µm; 0: nuclei only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "writer.json"))
    a = ap.parse_args()
    sp, card, score_t, mask_t, tiles, pixels, raws, forward_s, slide = record(a.slide, a.model, a.batch)
    info = {"name": Path(a.slide).name,
            "run": {"slide": a.slide, "slide_dimensions": list(slide.dimensions), "slide_mpp": slide.mpp,
                    "tissue_area_mm2": sp.tissue.area_mm2(slide.mpp), "model": card.name,
                    "classes": [{"name": c.name, "color": list(c.color)} for c in card.classes]}}
    job = (sp, card, score_t, mask_t, tiles, pixels, raws, info, a.batch, a.cell_expansion)
    one = replay(job)  # also warms the imports
    one = replay(job)
    print(f"recorded {len(tiles)} tiles (model forward {forward_s:.1f} s); one process: {one['tiles_per_s']} tiles/s, "
          f"{one['nuclei_per_s']} nuclei/s")
    for k, v in sorted(one["stages_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<12} {v:8.2f} s  {100 * v / one['wall_s']:5.1f}%")
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(replay, job)
    top = pstats.Stats(prof).sort_stats("tottime")
    print("where the time goes (own time of the top functions):")
    rows = sorted(((v[2], f"{Path(k[0]).name}:{k[2]}") for k, v in top.stats.items()), reverse=True)[:15]
    for sec, name in rows:
        print(f"  {sec:8.2f} s  {name}")
    scaling = []
    ctx = mp.get_context("fork")
    for p in sorted(set(a.processes)):
        t0 = time.perf_counter()
        with ctx.Pool(p) as pool:
            rs = pool.map(replay, [job] * p)
        wall = time.perf_counter() - t0
        scaling.append({"processes": p, "tiles_per_s": round(sum(r["tiles"] for r in rs) / wall, 2)})
        print(f"{p} process(es) at once: {scaling[-1]['tiles_per_s']} tiles/s in all")
    one_slide = []
    for w in sorted(set(a.workers)):
        r = replay((*job, w))
        one_slide.append({"workers": w, "tiles_per_s": r["tiles_per_s"], "nuclei_per_s": r["nuclei_per_s"]})
        print(f"one slide, {w} writer worker(s): {r['tiles_per_s']} tiles/s, {r['nuclei_per_s']} nuclei/s")
    write_result(a.out, {"cell_expansion_um": a.cell_expansion, "one_slide_workers": one_slide, "slide": a.slide, "model": card.name, "tiles": len(tiles), "nuclei": one["nuclei"],
                         "tiles_per_s_per_process": one["tiles_per_s"], "nuclei_per_s_per_process": one["nuclei_per_s"],
                         "stages_s": one["stages_s"], "profile_top_s": {n: round(t, 3) for t, n in rows},
                         "scaling": scaling, "goal_tiles_per_s_per_core": 15})


if __name__ == "__main__":
    main()
