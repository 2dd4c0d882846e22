"""Where nuclei are lost, by nucleus area, on a validation split: anchors, proposals, box-head scores.

For every labelled nucleus (its bounding box), per area bin in µm²:

- anchors: how many of the model's anchors overlap it at IoU >= 0.7 (the RPN's positive threshold; with
  none it trains through its one best, low-quality match) and at >= 0.5;
- proposals: whether any of the RPN's proposals at test time (after its NMS) reaches IoU 0.5;
- box head: the score (1 - P(background)) the box head gives the nucleus's own box, and the share above
  the card's score threshold.

    python benchmarks/small_nuclei.py --data ../shared/data/consep-train --split configs/split-consep.json
    python benchmarks/small_nuclei.py --model runs/anchors3/best.safetensors ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import write_result
from torchvision.ops import box_iou

from wsiseg.augment import targets_from_labels
from wsiseg.card import default_model_path
from wsiseg.datasets import InstanceFolder
from wsiseg.evaluation import AREA_BINS_UM2
from wsiseg.model import load_model


@torch.inference_mode()
def per_nucleus(net, samples) -> dict[str, np.ndarray]:
    """Area (µm²), anchors at IoU >= 0.7 and >= 0.5, best proposal IoU and box-head score of every nucleus."""
    cols = {k: [] for k in ("area", "anchors_07", "anchors_05", "proposal_iou", "score")}
    for s in samples:
        t = targets_from_labels(s.instances, {}, set(), min_area=1)  # the boxes training gives the RPN
        if not len(t["boxes"]):
            continue
        boxes, areas = torch.from_numpy(t["boxes"]), t["masks"].sum((1, 2))
        x = torch.from_numpy(np.array(s.image)).permute(2, 0, 1).float() / 255
        images, _ = net.transform([x])
        feats = net.backbone(images.tensors)
        anchors = net.rpn.anchor_generator(images, list(feats.values()))[0]
        proposals, _ = net.rpn(images, feats)
        pooled = net.roi_heads.box_roi_pool(feats, [boxes], images.image_sizes)
        logits, _ = net.roi_heads.box_predictor(net.roi_heads.box_head(pooled))
        a_iou = box_iou(boxes, anchors)
        cols["area"].append(areas * s.mpp**2)
        cols["anchors_07"].append((a_iou >= 0.7).sum(1).numpy())
        cols["anchors_05"].append((a_iou >= 0.5).sum(1).numpy())
        cols["proposal_iou"].append(box_iou(boxes, proposals[0]).max(1).values.numpy()
                                    if len(proposals[0]) else np.zeros(len(boxes)))
        cols["score"].append((1 - F.softmax(logits.float(), -1)[:, 0]).numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--data", default="../shared/data/consep-train")
    ap.add_argument("--split", default="configs/split-consep.json", help="split.json whose 'val' images are used")
    ap.add_argument("--out", default="benchmarks/results/small_nuclei.json")
    args = ap.parse_args()

    net, card = load_model(args.model)
    net.eval()
    names = json.loads(Path(args.split).read_text())["val"]
    data = InstanceFolder(args.data, names=names)
    mpp = data.samples[0].mpp
    if abs(mpp / card.mpp - 1) > 0.02:
        raise SystemExit(f"{args.data}: images at {mpp} µm/px, the model runs at {card.mpp}: not comparable here")
    v = per_nucleus(net, data.samples)
    edges = [0.0, *AREA_BINS_UM2, float("inf")]
    rows = []
    print(f"{'area µm²':>10} {'nuclei':>7} {'no anchor>=0.7':>15} {'anchors>=0.5':>13} {'proposal>0.5':>13} "
          f"{'box score':>10} {'score>=thr':>11}")
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (v["area"] >= lo) & (v["area"] < hi)
        if not m.any():
            continue
        row = {"area_um2": f"{lo:g}-{hi:g}", "nuclei": int(m.sum()),
               "share_without_anchor_iou_0.7": float(np.mean(v["anchors_07"][m] == 0)),
               "mean_anchors_iou_0.5": float(v["anchors_05"][m].mean()),
               "share_with_proposal_iou_0.5": float(np.mean(v["proposal_iou"][m] > 0.5)),
               "median_box_head_score": float(np.median(v["score"][m])),
               "share_scored_above_threshold": float(np.mean(v["score"][m] >= card.score_threshold))}
        rows.append(row)
        print(f"{row['area_um2']:>10} {row['nuclei']:7d} {row['share_without_anchor_iou_0.7']:15.2f} "
              f"{row['mean_anchors_iou_0.5']:13.2f} {row['share_with_proposal_iou_0.5']:13.2f} "
              f"{row['median_box_head_score']:10.3f} {row['share_scored_above_threshold']:11.2f}")
    write_result(args.out, {"model": str(args.model), "data": args.data, "split": args.split,
                            "score_threshold": card.score_threshold, "rows": rows})


if __name__ == "__main__":
    main()
