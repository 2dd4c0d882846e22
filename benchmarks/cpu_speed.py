"""Where a tile's forward pass spends its time on the CPU, and how fast each inference setting covers tissue.

    python benchmarks/cpu_speed.py [--model M.safetensors] [--tiles 32] [--settings 150x2@256+sr2+clmask 150x2@256]
                                   [--pq] [--end-to-end] [--repeats 3] [--chosen 150x2@256] [--out benchmarks/results/cpu_speed.json]

Real tiles are read from the bundled CMU-1 sample at the model's mpp. For every setting (post-NMS proposals
at test time) it prints the stages of the forward pass (backbone, FPN, RPN, box head, mask head) and the
post-processing (mask pasting), the tiles per second, and the mm² of tissue per minute that rate gives
(each tile contributes its core: (tile - overlap)² pixels). A setting is PROPOSALSxSTREAMS[@TILE[/OVERLAP]][+srN][+clmask]:
post-NMS RPN proposals at test time, batches run at once on the CPU (``DeviceConfig.streams``; streams do not
change the detections), the tile size and overlap (default: the model card's), the RoIAlign sampling ratio (default: the
card's) and, with ``+clmask``, the mask head on channels-last maps as before (the predictor now runs it on NCHW
maps, where the CPU's GroupNorm is faster; the detections are the same). With ``--pq`` it scores each proposal count
and tile size on the validation images of every dataset of the training config (``--config``), so that a
faster setting is only taken at the same accuracy, and with ``--glass PX`` also on those images set in PX of
blank glass (as tissue edges are on slides); with ``--end-to-end`` it times ``wsiseg segment`` on CMU-1 per
setting (``--repeats`` runs each, the settings in turn, the median reported). The first setting is the
baseline; ratios are against it, measured in the same run.
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
from common import validation_sets, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_setting(text: str) -> dict:
    """PROPOSALSxSTREAMS[@TILE[/OVERLAP]][+srN][+clmask] -> proposals, streams, tile size and overlap (None: the
    card's), RoIAlign
    sampling ratio (None: the card's) and whether the mask head runs on channels-last maps (as before issue 19's
    second step)."""
    head, *mods = text.split("+")
    head, _, tile = head.partition("@")
    tile, _, overlap = tile.partition("/")
    proposals, streams = (int(x) for x in head.split("x"))
    sr = next((int(m[2:]) for m in mods if m.startswith("sr")), None)
    unknown = [m for m in mods if not m.startswith("sr") and m != "clmask"]
    if unknown:
        raise SystemExit(f"setting {text!r}: unknown modifier {unknown[0]!r} (srN or clmask)")
    return {"proposals": proposals, "streams": streams, "tile": int(tile) if tile else None,
            "overlap": int(overlap) if overlap else None,
            "sampling_ratio": sr, "clmask": "clmask" in mods}


def real_tiles(card, n: int) -> np.ndarray:
    """``n`` tissue tiles of the sample slide at the model's resolution, of the card's tile size."""
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
    """The stage profile of one batch at a time (one stream), in ms per tile."""
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
    return {"ms_per_tile": stages, "tiles_per_s_one_stream": round(n / (t_fwd + t_post), 3),
            "nuclei_per_tile": n_det / n}


def throughput(pred, tiles: np.ndarray, batch: int) -> float:
    """Tiles per second through forward pass and mask pasting, with the predictor's streams."""
    from wsiseg.inference import infer_batches

    batches = [(i, tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
    list(infer_batches(pred, batches[:2]))  # warm-up
    t0 = time.perf_counter()
    for _, px, raw in infer_batches(pred, batches):
        pred.finish(raw, px.shape[1:3])
    return len(tiles) / (time.perf_counter() - t0)


def predictor(model: str, setting: dict, streams: int | None = None):
    import dataclasses

    from wsiseg.inference import load_predictor

    pred = load_predictor(model, device="cpu")
    if setting["tile"]:
        pred.card = dataclasses.replace(pred.card, tile_size=setting["tile"])
    if setting["overlap"] is not None:
        pred.card = dataclasses.replace(pred.card, overlap=setting["overlap"])
    proposals = setting["proposals"]
    pred.model.rpn._post_nms_top_n["testing"] = proposals
    pred.model.rpn._pre_nms_top_n["testing"] = max(proposals, min(2 * proposals, 2000))
    if setting["sampling_ratio"] is not None:
        pred.model.roi_heads.box_roi_pool.sampling_ratio = setting["sampling_ratio"]
        pred.model.roi_heads.mask_roi_pool.sampling_ratio = setting["sampling_ratio"]
    if setting["clmask"]:
        pred.model.roi_heads.mask_head.to(memory_format=torch.channels_last)
    pred.device = dataclasses.replace(pred.device, streams=setting["streams"] if streams is None else streams)
    return pred


def on_glass(sample, px: int):
    """A labelled sample set in ``px`` of blank glass on every side (no nuclei there), as tissue edges are."""
    import dataclasses

    pad = ((px, px), (px, px))
    return dataclasses.replace(sample, image=np.pad(sample.image, pad + ((0, 0),), constant_values=240),
                               instances=np.pad(sample.instances, pad))


def validation(pred, config: Path, glass: int = 0) -> dict:
    """PQ and F1 on the validation images of every dataset of a training config (its split files); with
    ``glass``, on those images set in that many pixels of blank glass."""
    from wsiseg.datasets import InstanceFolder
    from wsiseg.evaluation import evaluate_predictor

    out = {}
    for name, path, names in validation_sets(config):
        data = InstanceFolder(path, names=names)
        samples = [on_glass(x, glass) for x in data.samples] if glass else data.samples
        m = evaluate_predictor(pred, samples, pred.card.class_names)
        out[name] = {"pq": round(m["pq"], 4), "f1": round(m["f1"], 4)}
    return out


def end_to_end(model: str, setting: dict) -> dict:
    """``wsiseg segment`` on the bundled CMU-1 sample with this setting: mm² of tissue per minute of wall time."""
    import tempfile

    from wsiseg.pipeline import SegmentOptions, segment_slide

    pred = predictor(model, setting)
    with tempfile.TemporaryDirectory() as tmp:
        s = segment_slide(REPO / "examples" / "CMU-1-Small-Region.svs", pred, Path(tmp) / "out",
                          SegmentOptions(progress=False))
    return {"wall_s": s["wall_s"], "tissue_mm2": s["tissue_area_mm2"], "nuclei": s["nuclei"],
            "mm2_per_min": round(s["tissue_area_mm2"] / s["wall_s"] * 60, 3)}


def main() -> None:
    from wsiseg.card import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--settings", nargs="+", default=["300x2@256", "150x2@256", "300x2@512"],
                    help="PROPOSALSxSTREAMS[@TILE[/OVERLAP]][+srN][+clmask]; the first is the baseline")
    ap.add_argument("--pq", action="store_true", help="score each proposal count and tile on every validation set")
    ap.add_argument("--glass", type=int, default=0,
                    help="with --pq, also score the validation images set in this many pixels of blank glass")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"),
                    help="training config whose validation splits --pq uses")
    ap.add_argument("--end-to-end", action="store_true", help="also time wsiseg segment on CMU-1 per setting")
    ap.add_argument("--repeats", type=int, default=3,
                    help="end-to-end runs per setting, taken in turn; the median is reported")
    ap.add_argument("--chosen", default=None, help="the setting that ships (one of --settings)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_speed.json"))
    args = ap.parse_args()
    rows, scored = [], {}
    parsed = {setting: parse_setting(setting) for setting in args.settings}
    for setting, st in parsed.items():
        pred = predictor(args.model, st)
        card = pred.card
        tiles = real_tiles(card, args.tiles)
        core_mm2 = ((card.tile_size - card.overlap) * card.mpp / 1000) ** 2
        r = {"setting": setting, "rpn_post_nms_top_n_test": st["proposals"], "streams": st["streams"],
             "tile_size": card.tile_size, "overlap": card.overlap, "roi_sampling_ratio": pred.model.roi_heads.box_roi_pool.sampling_ratio,
             "mask_head_channels_last": st["clmask"], **measure(predictor(args.model, st, 1), tiles, args.batch)}
        r["tiles_per_s"] = round(throughput(pred, tiles, args.batch), 3)
        r["mm2_per_min_forward"] = round(r["tiles_per_s"] * 60 * core_mm2, 3)
        if args.pq:
            key = (st["proposals"], card.tile_size, card.overlap, r["roi_sampling_ratio"], st["clmask"])  # not streams
            if key not in scored:
                scored[key] = validation(pred, Path(args.config))
                if args.glass:
                    scored[key].update({f"{k}_on_glass": v
                                        for k, v in validation(pred, Path(args.config), args.glass).items()})
            r["validation"] = scored[key]
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.end_to_end:
        # round robin, so that a busy spell of the machine does not fall on one setting only
        runs = {r["setting"]: [] for r in rows}
        for _ in range(args.repeats):
            for r in rows:
                runs[r["setting"]].append(end_to_end(args.model, parsed[r["setting"]]))
                print(r["setting"], json.dumps(runs[r["setting"]][-1]), flush=True)
        for r in rows:
            median = sorted(runs[r["setting"]], key=lambda x: x["mm2_per_min"])[(args.repeats - 1) // 2]
            r["end_to_end"] = {**median, "runs_mm2_per_min": [x["mm2_per_min"] for x in runs[r["setting"]]]}
    base = rows[0]
    print(f"\n{'setting':>22} {'tiles/s':>8} {'mm²/min fwd':>11} {'ratio':>6} {'e2e':>6} {'ratio':>6}  "
          "backbone fpn rpn box_pool box mask_pool mask paste (ms/tile, one stream)")
    for r in rows:
        s = r["ms_per_tile"]
        e2e = r.get("end_to_end", {}).get("mm2_per_min")
        e2e_ratio = e2e / base["end_to_end"]["mm2_per_min"] if e2e else None
        print(f"{r['setting']:>22} {r['tiles_per_s']:>8.2f} {r['mm2_per_min_forward']:>11.3f} "
              f"{r['mm2_per_min_forward'] / base['mm2_per_min_forward']:>6.2f} "
              f"{e2e or float('nan'):>6.3f} {e2e_ratio or float('nan'):>6.2f}  "
              f"{s['backbone']:.0f} {s['fpn']:.0f} {s['rpn']:.0f} {s['box_pool']:.0f} {s['box_head']:.0f} "
              f"{s['mask_pool']:.0f} {s['mask_head'] + s['mask_predictor']:.0f} {s['postprocess_paste']:.0f}")
        for name, v in r.get("validation", {}).items():
            b = base.get("validation", {}).get(name)
            print(f"{'':>24}{name:<22} PQ {v['pq']:.4f} F1 {v['f1']:.4f}"
                  + (f"  (ΔPQ {v['pq'] - b['pq']:+.4f}, ΔF1 {v['f1'] - b['f1']:+.4f})" if b else ""))
    chosen = next((r for r in rows if r["setting"] == args.chosen), None)
    write_result(args.out, {"model": card.name, "threads": torch.get_num_threads(), "tiles": args.tiles,
                            "overlap": card.overlap, "glass_px": args.glass, "baseline": base["setting"],
                            "settings": rows, "chosen": args.chosen,
                            "mm2_per_min": (chosen or {}).get("end_to_end", {}).get("mm2_per_min"),
                            "note": "tiles_per_s: forward pass and mask pasting with the setting's streams; "
                                    "mm2_per_min: wsiseg segment on CMU-1-Small-Region end to end (its summary.json)"})


if __name__ == "__main__":
    main()
