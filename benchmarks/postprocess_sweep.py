"""Box NMS, score and mask thresholds and the smallest nucleus kept, chosen on a validation split only.

The model runs once per validation tile and NMS threshold; each (score
threshold, mask threshold, minimum area) then only re-runs post-processing,
stitching and evaluation.

    python benchmarks/postprocess_sweep.py --split configs/default-split.json
    python benchmarks/postprocess_sweep.py --data ../shared/data/consep-train --split configs/split-consep.json \
        --scores 0.4 0.5 --masks 0.5 --min-area-um2 5 2
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from common import write_result

from wsiseg.datasets import InstanceFolder
from wsiseg.evaluation import evaluate_predictor
from wsiseg.inference import CachedPredictor, MaskRCNNPredictor, select_device
from wsiseg.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wsiseg/models/default.safetensors")
    ap.add_argument("--data", default="../shared/data/monuseg-train")
    ap.add_argument("--split", required=True, help="split.json whose 'val' images are used (and nothing else)")
    ap.add_argument("--scores", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--masks", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    ap.add_argument("--nms", type=float, nargs="+", default=None,
                    help="box NMS IoU thresholds (default: the model card's)")
    ap.add_argument("--min-area-um2", type=float, nargs="+", default=None,
                    help="smallest nucleus kept (default: the model card's)")
    ap.add_argument("--out", default="benchmarks/results/postprocess_sweep.json")
    args = ap.parse_args()

    net, card = load_model(args.model)
    pred = CachedPredictor(MaskRCNNPredictor(net, card, select_device("cpu"), prefilter=False))
    names = json.loads(Path(args.split).read_text())["val"]
    multi = len(card.class_names) > 1
    data = InstanceFolder(args.data, names=names, class_names=card.class_names if multi else None)
    classes = data.class_names if multi else ["nucleus"]
    rows = []
    nms_values = args.nms or [card.config.nms_thresh]
    areas = args.min_area_um2 or [card.min_area_um2]
    print(f"{'nms':>5} {'score':>6} {'mask':>5} {'min':>5} {'PQ':>6} {'DQ':>6} {'SQ':>6} {'AJI':>6} "
          f"{'F1':>6} {'TP':>6} {'FP':>6} {'FN':>6} {'acc':>6}")
    for nms, s, m, area in itertools.product(nms_values, args.scores, args.masks, areas):
        if net.roi_heads.nms_thresh != nms:
            net.roi_heads.nms_thresh = nms
            pred.cache.clear()
        pred.score_threshold, pred.mask_threshold = s, m
        r = evaluate_predictor(pred, data.samples, classes, min_area_um2=area)
        acc = r.get("classification_accuracy", float("nan"))
        row = {"nms_threshold": nms, "score_threshold": s, "mask_threshold": m, "min_area_um2": area,
               "classification_accuracy": acc,
               **{k: r[k] for k in ("pq", "dq", "sq", "aji", "f1", "dice", "tp", "fp", "fn")}}
        rows.append(row)
        print(f"{nms:5.2f} {s:6.2f} {m:5.2f} {area:5.1f} {r['pq']:6.3f} {r['dq']:6.3f} {r['sq']:6.3f} "
              f"{r['aji']:6.3f} {r['f1']:6.3f} {r['tp']:6d} {r['fp']:6d} {r['fn']:6d} {acc:6.3f}")
    best = max(rows, key=lambda r: r["pq"])
    print(f"best PQ: nms {best['nms_threshold']}, score {best['score_threshold']}, mask {best['mask_threshold']}, "
          f"min area {best['min_area_um2']} -> PQ {best['pq']:.3f}, "
          f"F1 {best['f1']:.3f}  (model forward {pred.forward_seconds:.0f} s, once per NMS threshold)")
    write_result(args.out, {"model": args.model, "split": args.split, "val_images": names, "rows": rows,
                            "best_by_pq": best})


if __name__ == "__main__":
    main()
