"""Where a tile's forward pass spends its time on the CPU, and how fast each inference setting covers tissue.

    python benchmarks/cpu_speed.py [--model M.safetensors] [--tiles 32] [--proposals 1000 500 300 150]
                                   [--pq] [--out benchmarks/results/cpu_speed.json]

Real tiles are read from the bundled CMU-1 sample at the model's mpp. For every setting (post-NMS proposals
at test time) it prints the stages of the forward pass (backbone, FPN, RPN, box head, mask head) and the
post-processing (mask pasting), the tiles per second, and the mm² of tissue per minute that rate gives
(each tile contributes its core: (tile - overlap)² pixels). With ``--pq`` it also scores each setting on the
MoNuSeg validation images (configs/default-split.json), so that a faster setting is only taken at the same
accuracy. The first setting is the baseline; ratios are against it, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def real_tiles(card, n: int) -> np.ndarray:
    """``n`` tissue tiles of the sample slide at the model's resolution."""
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_slide, stream_tiles

    slide = open_slide(REPO / "examples" / "CMU-1-Small-Region.svs")
    sp = plan_slide(slide, card.mpp, card.tile_size, card.overlap)
    step = max(1, len(sp.grid) // n)
    tiles = [t for i, t in enumerate(sp.grid.tiles) if i % step == 0][:n]
    grid = type(sp.grid)(sp.grid.width, sp.grid.height, sp.grid.tile_size, sp.grid.overlap, sp.grid.x_bounds,
                         sp.grid.y_bounds, tuple(tiles))
    return np.stack([px for _, px in stream_tiles(slide, sp.plan, grid, workers=2, prefetch=8)])


class StageClock:
    """Wall time of each stage of a torchvision Mask R-CNN forward pass, by forward hooks."""

    STAGES = {"transform": "transform", "backbone": "backbone.body", "fpn": "backbone.fpn", "rpn": "rpn",
              "box_pool": "roi_heads.box_roi_pool", "box_head": "roi_heads.box_head",
              "box_predictor": "roi_heads.box_predictor", "mask_pool": "roi_heads.mask_roi_pool",
              "mask_head": "roi_heads.mask_head", "mask_predictor": "roi_heads.mask_predictor"}

    def __init__(self, model: torch.nn.Module):
        self.t: dict[str, float] = {k: 0.0 for k in self.STAGES}
        mods = dict(model.named_modules())
        for name, path in self.STAGES.items():
            mod = mods[path]
            mod.register_forward_pre_hook(lambda m, a, name=name: self._start(name))
            mod.register_forward_hook(lambda m, a, o, name=name: self._stop(name))
        self._t0: dict[str, float] = {}

    def _start(self, name: str) -> None:
        self._t0[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.t[name] += time.perf_counter() - self._t0[name]


def measure(pred, tiles: np.ndarray, batch: int) -> dict:
    clock = StageClock(pred.model)
    pred.predict(tiles[:batch])  # warm-up
    clock.t = {k: 0.0 for k in clock.t}
    t_fwd = t_post = 0.0
    n_det = 0
    for i in range(0, len(tiles), batch):
        t0 = time.perf_counter()
        raw = pred.infer(tiles[i : i + batch])
        t1 = time.perf_counter()
        dets = pred.finish(raw, tiles.shape[1:3])
        t_post += time.perf_counter() - t1
        t_fwd += t1 - t0
        n_det += sum(len(d) for d in dets)
    n = len(tiles)
    stages = {k: round(1000 * v / n, 2) for k, v in clock.t.items()}
    stages["other_forward"] = round(1000 * t_fwd / n - sum(stages.values()), 2)
    stages["postprocess_paste"] = round(1000 * t_post / n, 2)
    return {"ms_per_tile": stages, "tiles_per_s": round(n / (t_fwd + t_post), 3), "nuclei_per_tile": n_det / n}


def main() -> None:
    from wsiseg.card import default_model_path
    from wsiseg.inference import load_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--proposals", type=int, nargs="+", default=[1000, 500, 300, 150])
    ap.add_argument("--pq", action="store_true", help="score each setting on the MoNuSeg validation images")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = load_predictor(args.model, device="cpu")
    card = base.card
    tiles = real_tiles(card, args.tiles)
    core_mm2 = ((card.tile_size - card.overlap) * card.mpp / 1000) ** 2
    rows = []
    for k in args.proposals:
        pred = load_predictor(args.model, device="cpu")
        pred.model.rpn._post_nms_top_n["testing"] = k
        pred.model.rpn._pre_nms_top_n["testing"] = max(k, min(2 * k, 2000))
        r = {"rpn_post_nms_top_n_test": k, **measure(pred, tiles, args.batch)}
        r["mm2_per_min_forward"] = round(r["tiles_per_s"] * 60 * core_mm2, 3)
        if args.pq:
            from wsiseg.datasets import InstanceFolder
            from wsiseg.evaluation import evaluate_predictor

            names = json.loads((REPO / "configs" / "default-split.json").read_text())["val"]
            data = InstanceFolder(REPO.parent / "shared" / "data" / "monuseg-train", names=names)
            m = evaluate_predictor(pred, data.samples, ["nucleus"])
            r["monuseg_val"] = {"pq": round(m["pq"], 4), "f1": round(m["f1"], 4)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    base_rate = rows[0]["tiles_per_s"]
    print(f"\n{'proposals':>9} {'tiles/s':>8} {'ratio':>6} {'mm²/min':>8}  backbone fpn rpn box mask other paste (ms/tile)"
          + ("  PQ     F1" if args.pq else ""))
    for r in rows:
        s = r["ms_per_tile"]
        print(f"{r['rpn_post_nms_top_n_test']:>9} {r['tiles_per_s']:>8.2f} {r['tiles_per_s'] / base_rate:>6.2f} "
              f"{r['mm2_per_min_forward']:>8.3f}  {s['backbone']:.0f} {s['fpn']:.0f} {s['rpn']:.0f} {s['box_head']:.0f} "
              f"{s['mask_head']:.0f} {s['other_forward']:.0f} {s['postprocess_paste']:.0f}"
              + (f"  {r['monuseg_val']['pq']:.4f} {r['monuseg_val']['f1']:.4f}" if args.pq else ""))
    write_result(args.out, {"model": card.name, "threads": torch.get_num_threads(), "tiles": len(tiles),
                            "tile_size": card.tile_size, "overlap": card.overlap, "settings": rows,
                            "note": "forward pass and mask pasting only; end-to-end mm2_per_min comes from a "
                                    "segment run's summary.json"})


if __name__ == "__main__":
    main()
