from __future__ import annotations

import numpy as np
import pytest

from wsiseg.evaluation import (
    aggregated_jaccard,
    coco_ap,
    dice,
    error_breakdown,
    evaluate_images,
    panoptic_quality,
    recall_by_area,
)


def two_squares():
    gt = np.zeros((20, 20), int)
    gt[0:10, 0:10] = 1  # 100 px
    gt[10:20, 10:20] = 2  # 100 px
    return gt


def test_perfect_prediction():
    gt = two_squares()
    pred = gt * 7  # ids do not matter
    r = panoptic_quality(gt, pred)
    assert (r.pq, r.dq, r.sq, r.tp, r.fp, r.fn) == (1.0, 1.0, 1.0, 2, 0, 0)
    assert aggregated_jaccard(gt, pred) == 1.0 and dice(gt, pred) == 1.0


def test_hand_computed_case():
    gt = two_squares()
    pred = np.zeros_like(gt)
    pred[0:10, 0:8] = 1  # 80 px inside gt 1: IoU 0.8
    pred[10:20, 10:14] = 2  # 40 px inside gt 2: IoU 0.4, not a match
    pred[0:3, 15:18] = 3  # 9 px false positive
    r = panoptic_quality(gt, pred)
    assert (r.tp, r.fp, r.fn) == (1, 2, 1)
    assert r.dq == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))
    assert r.sq == pytest.approx(0.8)
    assert r.pq == pytest.approx(0.8 / 2.5)
    # AJI: C = 80 + 40, U = 100 + 100 (each gt with its best pred, both preds inside) + 9 (unused pred)
    assert aggregated_jaccard(gt, pred) == pytest.approx(120 / 209)
    assert dice(gt, pred) == pytest.approx(2 * 120 / (200 + 129))


def test_empty_cases():
    z = np.zeros((5, 5), int)
    assert panoptic_quality(z, z).pq == 1.0
    gt = two_squares()
    assert panoptic_quality(gt, np.zeros_like(gt)).pq == 0.0
    assert aggregated_jaccard(gt, np.zeros_like(gt)) == 0.0


def test_coco_ap_perfect_and_shifted():
    gt = two_squares()
    assert coco_ap([gt], [gt])["AP"] == pytest.approx(1.0)
    shifted = np.zeros_like(gt)
    shifted[0:10, 0:8] = 1  # IoU 0.8
    shifted[10:20, 10:20] = 2  # IoU 1
    r = coco_ap([gt], [shifted], scores=[{1: 0.6, 2: 0.9}])
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    # IoU 0.8 passes 7 of the 10 thresholds (0.5 ... 0.8, IoU >= threshold); above them the exact nucleus,
    # ranked first, gives precision 1 up to recall 0.5: 51 of the 101 recall points
    assert r["AP"] == pytest.approx((7 * 1.0 + 3 * 51 / 101) / 10, abs=1e-6)


def test_classes_accuracy_and_per_class_pq():
    gt = two_squares()
    pred = gt.copy()
    res = evaluate_images([gt], [pred], gt_classes=[{1: 0, 2: 1}], pred_classes=[{1: 0, 2: 0}],
                          class_names=["tumour", "immune"], with_coco=False)
    assert res["classification_accuracy"] == 0.5
    assert res["pq_per_class"]["tumour"] == pytest.approx(1 / 1.5)  # one TP, one FP
    assert res["pq_per_class"]["immune"] == 0.0
    assert res["f1"] == 1.0
    # a GT nucleus with unknown class does not count for accuracy
    res = evaluate_images([gt], [pred], gt_classes=[{1: 0}], pred_classes=[{1: 0, 2: 0}],
                          class_names=["tumour", "immune"], with_coco=False)
    assert res["classification_accuracy"] == 1.0


def test_empty_images_do_not_count_in_the_means():
    gt = two_squares()
    empty = np.zeros_like(gt)
    # a model that finds nothing scores zero, however many images are empty
    res = evaluate_images([gt, empty, empty], [empty, empty, empty], with_coco=False)
    assert res["pq"] == 0.0 and res["aji"] == 0.0 and res["f1"] == 0.0 and res["images"] == 3
    # a false positive on an empty image counts
    fp = np.zeros_like(gt)
    fp[0:5, 12:17] = 1
    res = evaluate_images([gt, empty], [gt, fp], with_coco=False)
    assert res["pq"] == pytest.approx(0.5) and res["f1"] == pytest.approx(4 / 5)


def test_error_breakdown_names_each_kind_of_error():
    gt = np.zeros((60, 60), int)
    gt[0:10, 0:10] = 1  # found: a matching prediction
    gt[0:10, 20:30] = 2  # undetected: nothing on it
    gt[20:30, 0:10] = 3  # merged with 4 by one prediction
    gt[20:30, 10:20] = 4
    gt[40:50, 0:10] = 5  # split into two halves
    gt[40:50, 20:30] = 6  # shape: a prediction on a third of it
    pred = np.zeros_like(gt)
    pred[0:10, 0:9] = 1
    pred[20:30, 0:20] = 2  # holds all of 3 and 4: IoU 0.5, not a match
    pred[40:50, 0:5] = 3
    pred[40:50, 5:10] = 4
    pred[40:50, 20:23] = 5
    pred[55:60, 55:60] = 6  # background
    e = error_breakdown(gt, pred)
    r = panoptic_quality(gt, pred)
    assert e == {"fn_undetected": 1, "fn_merged": 2, "fn_split": 1, "fn_shape": 1,
                 "fp_background": 1, "fp_merge": 1, "fp_shape": 3}
    assert sum(v for k, v in e.items() if k.startswith("fn")) == r.fn
    assert sum(v for k, v in e.items() if k.startswith("fp")) == r.fp


def test_recall_by_area_in_square_microns():
    gt = np.zeros((40, 40), int)
    gt[0:4, 0:4] = 1  # 16 px = 4 µm² at 0.5 µm/px, found
    gt[10:14, 10:14] = 2  # 4 µm², missed
    gt[20:40, 20:40] = 3  # 400 px = 100 µm², found
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 1
    pred[20:40, 20:40] = 2
    n, found = recall_by_area(gt, pred, mpp=0.5)
    assert n.tolist() == [2, 0, 0, 0, 1] and found.tolist() == [1, 0, 0, 0, 1]
    out = evaluate_images([gt], [pred], with_coco=False, mpps=[0.5])
    assert out["recall_by_area_um2"]["0-10"] == {"nuclei": 2, "recall": 0.5}
    assert out["recall_by_area_um2"]["80-inf"]["recall"] == 1.0
    assert out["errors"]["fn_undetected"] == 1


def test_f1_per_class_follows_hovernet():
    """F_c = 2TP / (2TP + 2FP + 2FN + FP_d + FN_d) over the matched nuclei whose truth or call is the class
    (HoVer-Net's reference code: its TN term is then always 0), counted by hand on a small case."""
    from wsiseg.evaluation import evaluate_images

    gt = np.zeros((40, 40), np.int32)
    pred = np.zeros((40, 40), np.int32)
    gt[2:8, 2:8], pred[2:8, 2:8] = 1, 1          # class 0 -> 0
    gt[12:18, 2:8], pred[12:18, 2:8] = 2, 2      # class 0 -> 1
    gt[22:28, 2:8], pred[22:28, 2:8] = 3, 3      # class 1 -> 1
    gt[32:38, 2:8] = 4                            # class 1, missed
    pred[2:8, 22:28] = 5                          # predicted class 0 on background
    m = evaluate_images([gt], [pred], [{1: 0, 2: 0, 3: 1, 4: 1}], [{1: 0, 2: 1, 3: 1, 5: 0}], ["a", "b"],
                        with_coco=False)
    # class a: tp 1 (1), fp 0, fn 1 (2), fp_d 1 (5), fn_d 0 -> 2 / (2 + 2 + 1); pair 3 is not a's sample
    # class b: tp 1 (3), fp 1 (2), fn 0, fp_d 0, fn_d 1 (4) -> 2 / (2 + 2 + 1); pair 1 is not b's sample
    assert m["f1_per_class"]["a"] == pytest.approx(2 / 5) and m["f1_per_class"]["b"] == pytest.approx(2 / 5)
    assert m["classification_accuracy"] == pytest.approx(2 / 3)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two instance label images describe the same nuclei, whatever their ids."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def test_evaluate_scores_exactly_what_segment_writes_on_an_image_that_needs_resampling(tmp_path, data_dir):
    """A 20x image (a MoNuSeg crop averaged down 2x) is upsampled for the 0.25 µm/px model: evaluation and
    ``wsiseg segment`` read it through the same resampling, tiles, stitching and smallest-nucleus rule."""
    import json
    import subprocess
    import sys

    import cv2
    import zarr
    from PIL import Image

    from wsiseg.card import default_model_path
    from wsiseg.evaluation import segment_image
    from wsiseg.inference import load_predictor
    from wsiseg.stitching import min_area_px

    from pathlib import Path

    name = json.loads((Path(__file__).parents[1] / "configs" / "default-split.json").read_text())["val"][0]
    full = np.array(Image.open(data_dir / "monuseg-train" / "images" / f"{name}.png").convert("RGB"))
    img = cv2.resize(full[:360, :360], (180, 180), interpolation=cv2.INTER_AREA)
    mpp = 0.2527 * 2
    Image.fromarray(img).save(tmp_path / "x20.png")
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(tmp_path / "x20.png"), "--mpp",
                           str(mpp), "--whole-slide", "--out", str(tmp_path / "out"), "--quiet", "--no-stats"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = zarr.open_group(str(tmp_path / "out" / "x20.ome.zarr"), mode="r")["labels/nuclei/0"][:][0]  # (c, y, x)
    pred = load_predictor(default_model_path(), device="cpu")
    seg = segment_image(img, mpp, pred)
    assert seg.plan.scale > 1.9 and seg.labels.shape == written.shape
    assert seg.labels.max() > 10 and _same_partition(seg.labels, written)
    # the smallest nucleus is measured at the resolution the model sees: 79 px for 5 µm² at 0.2527 µm/px (read as
    # is), not the 80 px it is at the card's 0.25
    assert segment_image(full[:64, :64], 0.2527, pred, 5.0).min_area == min_area_px(5.0, 0.2527) == 79
    assert segment_image(full[:64, :64], 0.2527, pred).min_area == min_area_px(pred.card.min_area_um2, 0.2527)
