"""Test-time rules for which detections to keep, scored on every validation split of a training config.

The model runs once per validation image; each rule then only re-runs thresholding, stitching and
evaluation. The card's rule (one score threshold, one smallest area) is the baseline, in the same run:

- ``maskness A``: score × (mean mask probability inside the mask)^A, thresholded at each ``--scores``
  (Mask Scoring R-CNN / SOLO's mask-quality rescoring);
- ``small T``: boxes under ``--small-box-um2`` kept from score T instead of the card's threshold;
- ``min-area M``: the smallest nucleus kept is M µm² instead of the card's.

    python benchmarks/score_rules.py --config configs/default.yaml
"""

from __future__ import annotations

import argparse

import numpy as np
from common import validation_sets, write_result

from wsiseg.card import default_model_path
from wsiseg.datasets import InstanceFolder
from wsiseg.detections import RawDetections
from wsiseg.evaluation import evaluate_predictor
from wsiseg.inference import CachedPredictor, MaskRCNNPredictor, select_device
from wsiseg.model import load_model


class Rule:
    """A predictor over a :class:`CachedPredictor` that rescales scores before the card's threshold."""

    def __init__(self, cache: CachedPredictor, threshold: float, maskness: float = 0.0,
                 small_px2: float = 0.0, small_threshold: float | None = None):
        self.cache, self.card = cache, cache.card
        self.threshold, self.maskness = threshold, maskness
        self.small_px2, self.small_threshold = small_px2, small_threshold

    def predict(self, tiles: np.ndarray):
        out = []
        for r in self.cache.infer(tiles):
            s = r.scores.astype(np.float64)
            if self.maskness:
                fg = r.mask_probs > 0.5
                s = s * ((r.mask_probs * fg).sum((1, 2)) / np.maximum(fg.sum((1, 2)), 1)) ** self.maskness
            if self.small_threshold is not None:
                area = (r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])
                s = np.where(area < self.small_px2, np.minimum(1.0, s * self.threshold / self.small_threshold), s)
            out.append(RawDetections(r.boxes, s.astype(np.float32), r.labels, r.mask_probs)
                       .finish(tiles.shape[1:3], self.threshold, self.cache.mask_threshold))
        return out


def rules(card, args) -> list[tuple[str, dict, float | None]]:
    """(name, Rule arguments, smallest area in µm² or None for the card's) for every rule to score."""
    t = card.score_threshold
    out = [("card", {"threshold": t}, None)]
    out += [(f"threshold {s:g}", {"threshold": s}, None) for s in args.scores if s != t]
    out += [(f"maskness {a:g} @ {s:g}", {"threshold": s, "maskness": a}, None)
            for a in args.maskness for s in args.scores]
    px2 = args.small_box_um2 / card.mpp**2
    out += [(f"small {s:g}", {"threshold": t, "small_px2": px2, "small_threshold": s}, None)
            for s in args.small_scores]
    out += [(f"min-area {m:g}", {"threshold": t}, m) for m in args.min_area_um2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--config", default="configs/default.yaml", help="training config whose splits are scored")
    ap.add_argument("--scores", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    ap.add_argument("--maskness", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--small-box-um2", type=float, default=25.0, help="box area under which --small-scores apply")
    ap.add_argument("--small-scores", type=float, nargs="+", default=[0.65, 0.75])
    ap.add_argument("--min-area-um2", type=float, nargs="+", default=[3.0, 2.0])
    ap.add_argument("--out", default="benchmarks/results/score_rules.json")
    args = ap.parse_args()

    net, card = load_model(args.model)
    cache = CachedPredictor(MaskRCNNPredictor(net, card, select_device("cpu"), prefilter=False))
    table: dict[str, dict[str, dict]] = {}
    for set_name, path, names in validation_sets(args.config):
        data = InstanceFolder(path, names=names, class_names=card.class_names)
        multi = len(card.class_names) > 1 and any(s.classes for s in data.samples)
        classes = card.class_names if multi else ["nucleus"]
        for name, kw, min_area in rules(card, args):
            m = evaluate_predictor(Rule(cache, **kw), data.samples, classes, min_area_um2=min_area)
            row = {k: m[k] for k in ("pq", "f1", "aji", "tp", "fp", "fn")}
            row["accuracy"] = m.get("classification_accuracy")
            row["recall_10_20"] = m["recall_by_area_um2"]["10-20"]["recall"]
            table.setdefault(name, {})[set_name] = row
            print(f"{set_name:12s} {name:22s} PQ {row['pq']:.4f} F1 {row['f1']:.4f} FP {row['fp']:5d} "
                  f"FN {row['fn']:5d} recall 10-20 {row['recall_10_20']:.3f}", flush=True)
        cache.cache.clear()
    base = table["card"]
    print(f"\n{'rule':22s} " + " ".join(f"{n[:11]:>11s}" for n in base) + "   mean ΔPQ")
    for name, sets in table.items():
        deltas = [sets[n]["pq"] - base[n]["pq"] for n in base]
        print(f"{name:22s} " + " ".join(f"{sets[n]['pq']:11.4f}" for n in base) + f"   {np.mean(deltas):+.4f}")
    write_result(args.out, {"model": str(args.model), "config": args.config, "score_threshold": card.score_threshold,
                            "min_area_um2": card.min_area_um2, "rules": table})


if __name__ == "__main__":
    main()
