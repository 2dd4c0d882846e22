"""One slide's parts in several processes against one process with all the threads, on this machine.

    python benchmarks/processes.py [--slide examples/CMU-1-Small-Region.svs] [--model M] [--processes 1 2]
                                   [--repeats 2] [--part-tiles 64] [--out benchmarks/results/processes.json]

Runs ``segment_slide`` with ``processes=N`` for each N in turn (``--repeats`` rounds, the median reported):
N processes run the model over the parts with the cores divided between them (N = 1: one process with every
core, as ``wsiseg segment`` runs by default), the run's own process reads, stitches and writes. Prints wall
time, mm² of tissue per minute and the ratio to the first N, measured in the same run, and checks that every N
wrote the same nuclei.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_once(slide: str, model: str, processes: int, part_tiles: int) -> dict:
    from wsiseg.inference import load_predictor
    from wsiseg.pipeline import SegmentOptions, segment_slide

    pred = load_predictor(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        s = segment_slide(slide, pred, out, SegmentOptions(progress=False, stats=False, processes=processes,
                                                           part_tiles=part_tiles))
        t = pd.read_parquet(next(out.glob("*.nuclei.parquet")))
    return {"wall_s": s["wall_s"], "tissue_mm2": s["tissue_area_mm2"], "nuclei": s["nuclei"],
            "area_sum": round(float(t.area_um2.sum()), 3)}


def main() -> None:
    from wsiseg.card import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(REPO / "examples" / "CMU-1-Small-Region.svs"))
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--part-tiles", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "processes.json"))
    a = ap.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in a.processes}
    for _ in range(a.repeats):  # in turn, so that drift of the machine hits every setting
        for n in a.processes:
            runs[n].append(run_once(a.slide, a.model, n, a.part_tiles))
    rows = {}
    base = None
    for n, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rows[n] = {"processes": n, "wall_s": round(wall, 2), "walls": [r["wall_s"] for r in rs],
                   "mm2_per_min": round(rs[0]["tissue_mm2"] / wall * 60, 3), "nuclei": rs[0]["nuclei"],
                   "area_sum": rs[0]["area_sum"]}
        base = base or rows[n]
        rows[n]["ratio"] = round(rows[n]["mm2_per_min"] / base["mm2_per_min"], 3)
    same = len({(r["nuclei"], r["area_sum"]) for r in rows.values()}) == 1
    print(f"{'processes':>9s} {'wall s':>7s} {'mm²/min':>8s} {'ratio':>6s} {'nuclei':>7s}")
    for r in rows.values():
        print(f"{r['processes']:9d} {r['wall_s']:7.2f} {r['mm2_per_min']:8.3f} {r['ratio']:6.3f} {r['nuclei']:7d}")
    print("same nuclei in every setting:", same)
    write_result(a.out, {"benchmark": "processes", "slide": a.slide, "part_tiles": a.part_tiles,
                         "repeats": a.repeats, "results": list(rows.values()), "same_nuclei": same})


if __name__ == "__main__":
    main()
