"""Test-time augmentation: the model run on each tile and on its flips, the detections fused, scored on every
validation split of a training config against the single view, in the same run.

Views: the tile; flipped left-right; upside down; both. Fusion (weighted-box-fusion style): the highest-scoring
detection left and, from each other view, the one overlapping it most (box IoU >= ``--iou``) form a nucleus whose
score is the members' mean over all views (a view that missed it counts 0), and whose box, mask and class
probabilities are the score-weighted means of its members'. The network is not flip-equivariant to the pixel: a
flipped view's detections, flipped back, sit about one pixel further along the flipped axis than the tile's own
(measured against the tile's view and against ground truth on gbm40 and MoNuSeg; the tile's view is the unbiased
one, the network having learnt its own half-pixel conventions), so they are moved back by ``--offset``.

For each number of views the model runs once per validation image; every score threshold and smallest nucleus
then re-runs only thresholding, stitching and evaluation. Prints PQ, F1, class accuracy and recall per set, the
mean PQ over the sets, and the forward time relative to one view.

    python benchmarks/tta.py --config configs/default.yaml --views 1 2 4 --scores 0.6 0.7 0.8
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

FLIPS = ((), (1,), (0,), (0, 1))  # axes of an (h, w) tile flipped in each view


def flip_back(r: RawDetections, size: tuple[int, int], axes: tuple[int, ...], offset: float) -> RawDetections:
    """Detections made on a tile of ``size`` flipped along ``axes``, in the tile's own coordinates: boxes mirrored,
    each box's mask grid flipped with it, then moved by ``offset`` pixels along each flipped axis."""
    h, w = size
    boxes, masks = r.boxes.copy(), r.mask_probs
    if 1 in axes:
        boxes[:, [0, 2]] = w - r.boxes[:, [2, 0]] + offset
        masks = masks[:, :, ::-1]
    if 0 in axes:
        boxes[:, [1, 3]] = h - r.boxes[:, [3, 1]] + offset
        masks = masks[:, ::-1, :]
    return RawDetections(boxes, r.scores, r.labels, np.ascontiguousarray(masks), r.class_probs)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], axis=1), np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def regrid(prob: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """An M x M mask probability map over box ``src`` resampled onto the M x M grid of box ``dst``."""
    import cv2

    m = prob.shape[0]
    sw, sh = max(src[2] - src[0], 1e-3), max(src[3] - src[1], 1e-3)
    ax, ay = (dst[2] - dst[0]) / sw, (dst[3] - dst[1]) / sh
    mat = np.array([[ax, 0, (dst[0] - src[0]) / sw * m + 0.5 * ax - 0.5],
                    [0, ay, (dst[1] - src[1]) / sh * m + 0.5 * ay - 0.5]], np.float64)
    return cv2.warpAffine(prob.astype(np.float32), mat, (m, m), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def fuse(views: list[RawDetections], iou: float) -> RawDetections:
    """One tile's detections from several views (in the tile's coordinates) fused as the module says."""
    k = len(views)
    boxes = np.concatenate([v.boxes for v in views]).astype(np.float64)
    if k == 1 or len(boxes) == 0:
        return views[0]
    scores = np.concatenate([v.scores for v in views]).astype(np.float64)
    view = np.concatenate([np.full(len(v), i) for i, v in enumerate(views)])
    masks = np.concatenate([v.mask_probs for v in views])
    probs = np.concatenate([v.class_probs for v in views]).astype(np.float64)
    ious, free = box_iou(boxes, boxes), np.ones(len(boxes), bool)
    out_b, out_s, out_m, out_p = [], [], [], []
    for i in np.lexsort((np.arange(len(boxes)), -scores)):
        if not free[i]:
            continue
        members = [i]
        for v in range(k):
            cand = np.nonzero(free & (view == v) & (ious[i] >= iou))[0] if v != view[i] else []
            if len(cand):
                members.append(int(cand[np.argmax(ious[i, cand])]))
        free[members] = False
        wts = scores[members] / scores[members].sum()
        box = wts @ boxes[members]
        out_b.append(box)
        out_s.append(scores[members].sum() / k)
        out_m.append(sum(w * regrid(masks[j], boxes[j], box) for w, j in zip(wts, members)))
        out_p.append(wts @ probs[members])
    p = np.asarray(out_p, np.float32)
    return RawDetections(np.asarray(out_b, np.float32), np.asarray(out_s, np.float32),
                         p.argmax(1).astype(np.int32), np.asarray(out_m, np.float32), p)


class FlipPredictor:
    """A Mask R-CNN predictor's detections from ``views`` views of each tile, fused."""

    def __init__(self, inner: MaskRCNNPredictor, views: int, iou: float, offset: float):
        self.inner, self.card, self.views, self.iou, self.offset = inner, inner.card, views, iou, offset
        self.score_threshold, self.mask_threshold = inner.score_threshold, inner.mask_threshold

    def infer(self, tiles: np.ndarray) -> list[RawDetections]:
        batch = np.concatenate([np.flip(tiles, [1 + a for a in axes]) if axes else tiles
                                for axes in FLIPS[: self.views]])
        raw, n, size = self.inner.infer(batch), len(tiles), tiles.shape[1:3]
        return [fuse([flip_back(raw[v * n + i], size, FLIPS[v], self.offset) for v in range(self.views)], self.iou)
                for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--config", default="configs/default.yaml", help="training config whose splits are scored")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--scores", type=float, nargs="+", default=None, help="score thresholds (default: the card's)")
    ap.add_argument("--min-area-um2", type=float, nargs="+", default=None, help="default: the card's")
    ap.add_argument("--sets", nargs="+", default=None, help="only these validation sets")
    ap.add_argument("--iou", type=float, default=0.55, help="box IoU at which two views' detections are one")
    ap.add_argument("--offset", type=float, default=-1.0, help="pixels a flipped view's detections are moved")
    ap.add_argument("--prefilter", type=float, default=0.5,
                    help="with several views, a view's box counts from this fraction of the lowest threshold")
    ap.add_argument("--out", default="benchmarks/results/tta.json")
    args = ap.parse_args()

    _, card = load_model(args.model)
    scores = sorted(args.scores or [card.score_threshold])
    areas = sorted(args.min_area_um2 or [card.min_area_um2])
    table: dict[str, dict] = {}
    seconds: dict[int, float] = {}
    for set_name, path, names in validation_sets(args.config):
        if args.sets and set_name not in args.sets:
            continue
        for views in args.views:
            net, card = load_model(args.model)
            floor = scores[0] * (args.prefilter if views > 1 else 1.0)
            inner = MaskRCNNPredictor(net, card, select_device("cpu"), score_threshold=floor)
            cache = CachedPredictor(FlipPredictor(inner, views, args.iou, args.offset))
            data = InstanceFolder(path, names=names, class_names=card.class_names)
            multi = len(card.class_names) > 1 and any(s.classes for s in data.samples)
            classes = card.class_names if multi else ["nucleus"]
            for t in scores:
                cache.score_threshold = t
                for a in areas:
                    m = evaluate_predictor(cache, data.samples, classes, min_area_um2=a)
                    row = {k: m[k] for k in ("pq", "f1", "aji", "dq", "sq", "tp", "fp", "fn")}
                    row["accuracy"] = m.get("classification_accuracy")
                    row["f1_per_class"] = m.get("f1_per_class")
                    row["recall_by_area_um2"] = {k: v["recall"] for k, v in m["recall_by_area_um2"].items()}
                    key = f"{views} views @ {t:g}, {a:g} um2"
                    table.setdefault(key, {"views": views, "score_threshold": t, "min_area_um2": a,
                                           "sets": {}})["sets"][set_name] = row
                    acc = "" if row["accuracy"] is None or np.isnan(row["accuracy"]) else f" acc {row['accuracy']:.3f}"
                    print(f"{set_name:12s} {key:24s} PQ {row['pq']:.4f} F1 {row['f1']:.4f} SQ {row['sq']:.4f} "
                          f"FP {row['fp']:5d} FN {row['fn']:5d} recall 10-20 "
                          f"{row['recall_by_area_um2']['10-20']:.3f}{acc}", flush=True)
            seconds[views] = seconds.get(views, 0.0) + cache.forward_seconds
    sets = sorted({s for r in table.values() for s in r["sets"]})
    print(f"\n{'views, threshold, area':24s} " + " ".join(f"{n[:11]:>11s}" for n in sets) + "   mean PQ")
    for key, r in table.items():
        pq = [r["sets"][n]["pq"] for n in sets]
        r["mean_pq"] = float(np.mean(pq))
        print(f"{key:24s} " + " ".join(f"{p:11.4f}" for p in pq) + f"   {r['mean_pq']:.4f}")
    base = seconds.get(1)
    print("\nforward seconds: " + ", ".join(f"{v} views {s:.0f} s" + (f" ({s / base:.2f}x)" if base else "")
                                           for v, s in seconds.items()))
    write_result(args.out, {"model": str(args.model), "config": args.config, "iou": args.iou, "offset": args.offset,
                            "prefilter": args.prefilter, "rows": table,
                            "forward_seconds": seconds})


if __name__ == "__main__":
    main()
