"""Instance segmentation metrics: PQ (DQ, SQ), AJI, F1@0.5, Dice, COCO AP, per class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _relabel(lab: np.ndarray) -> np.ndarray:
    ids = np.unique(lab)
    ids = ids[ids > 0]
    lut = np.zeros(int(lab.max()) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[lab]


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise intersections and IoU of instances 1..n (gt) and 1..m (pred), after relabelling to consecutive ids.

    Returns (iou (n, m), intersection (n, m), gt areas, pred areas) and the relabelled maps are implied.
    """
    g, p = _relabel(gt), _relabel(pred)
    n, m = int(g.max()), int(p.max())
    inter = np.zeros((n + 1, m + 1), np.int64)
    np.add.at(inter, (g.ravel(), p.ravel()), 1)
    ga, pa = inter.sum(1)[1:], inter.sum(0)[1:]
    inter = inter[1:, 1:]
    union = ga[:, None] + pa[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou, inter, ga, pa


@dataclass
class PQResult:
    pq: float
    dq: float
    sq: float
    tp: int
    fp: int
    fn: int
    pairs: list[tuple[int, int]]  # (gt index, pred index), 0-based after relabelling

    @property
    def f1(self) -> float:
        return self.dq


Overlaps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # what iou_matrix returns


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> PQResult:
    """PQ = DQ x SQ with unique matching at IoU > 0.5 (Kirillov et al.; as HoVer-Net reports it)."""
    return _pq(iou_matrix(gt, pred), iou_threshold)


def _pq(ov: Overlaps, iou_threshold: float = 0.5) -> PQResult:
    iou = ov[0]
    n, m = iou.shape
    if iou_threshold >= 0.5:
        gi, pi = np.nonzero(iou > iou_threshold)  # unique by construction above 0.5
    else:
        from scipy.optimize import linear_sum_assignment

        gi, pi = linear_sum_assignment(-iou)
        keep = iou[gi, pi] > iou_threshold
        gi, pi = gi[keep], pi[keep]
    tp = len(gi)
    fp, fn = m - tp, n - tp
    if tp + fp + fn == 0:
        return PQResult(1.0, 1.0, 1.0, 0, 0, 0, [])
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[gi, pi].mean()) if tp else 0.0
    return PQResult(dq * sq, dq, sq, tp, fp, fn, list(zip(gi.tolist(), pi.tolist())))


ERROR_KINDS = ("fn_undetected", "fn_merged", "fn_split", "fn_shape", "fp_background", "fp_merge", "fp_shape")
AREA_BINS_UM2 = (10.0, 20.0, 40.0, 80.0)  # recall by nucleus area: <10, 10-20, 20-40, 40-80, >=80 µm²


def error_breakdown(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, int]:
    """Why nuclei are missed and predictions are wrong, under the matching that PQ and F1 use.

    Each missed nucleus (FN) gets the first kind that fits: ``fn_undetected`` (predictions cover less than
    10% of it), ``fn_merged`` (a prediction holds half of it and half of another nucleus), ``fn_split``
    (two or more predictions each hold a fifth of it), ``fn_shape`` (overlapped, but IoU too low). Each
    wrong prediction (FP): ``fp_background`` (less than 10% of it lies on nuclei), ``fp_merge`` (it holds
    half of two or more nuclei), ``fp_shape`` (the rest).
    """
    ov = iou_matrix(gt, pred)
    return _errors(ov, _pq(ov, iou_threshold))


def _errors(ov: Overlaps, r: PQResult) -> dict[str, int]:
    _, inter, ga, pa = ov
    n, m = inter.shape
    out = dict.fromkeys(ERROR_KINDS, 0)
    matched_g = np.zeros(n, bool)
    matched_p = np.zeros(m, bool)
    for gi, pi in r.pairs:
        matched_g[gi], matched_p[pi] = True, True
    holds_half = inter >= 0.5 * ga[:, None]  # prediction j holds half of nucleus i
    merging = holds_half.sum(0) >= 2
    for i in np.flatnonzero(~matched_g):
        if inter[i].sum() < 0.1 * ga[i]:
            out["fn_undetected"] += 1
        elif (holds_half[i] & merging).any():
            out["fn_merged"] += 1
        elif (inter[i] >= 0.2 * ga[i]).sum() >= 2:
            out["fn_split"] += 1
        else:
            out["fn_shape"] += 1
    for j in np.flatnonzero(~matched_p):
        if inter[:, j].sum() < 0.1 * pa[j]:
            out["fp_background"] += 1
        elif merging[j]:
            out["fp_merge"] += 1
        else:
            out["fp_shape"] += 1
    return out


def recall_by_area(gt: np.ndarray, pred: np.ndarray, mpp: float,
                   bins: tuple[float, ...] = AREA_BINS_UM2) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and found nuclei (matched at IoU > 0.5) per area bin in µm² (edges ``bins``; first and last open)."""
    ov = iou_matrix(gt, pred)
    return _area_recall(ov, _pq(ov), mpp, bins)


def _area_recall(ov: Overlaps, r: PQResult, mpp: float,
                 bins: tuple[float, ...] = AREA_BINS_UM2) -> tuple[np.ndarray, np.ndarray]:
    ga = ov[2]
    k = np.digitize(ga * mpp * mpp, bins)
    found = np.zeros(len(ga), bool)
    found[[gi for gi, _ in r.pairs]] = True
    return np.bincount(k, minlength=len(bins) + 1), np.bincount(k[found], minlength=len(bins) + 1)


def aggregated_jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI (Kumar et al. 2017): each GT nucleus joins its best-IoU prediction; unused predictions add to the union."""
    return _aji(iou_matrix(gt, pred))


def _aji(ov: Overlaps) -> float:
    iou, inter, ga, pa = ov
    n, m = iou.shape
    if n == 0:
        return 1.0 if m == 0 else 0.0
    used = np.zeros(m, bool)
    c = u = 0
    for i in range(n):
        if m and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c += inter[i, j]
            u += ga[i] + pa[j] - inter[i, j]
            used[j] = True
        else:
            u += ga[i]
    u += pa[~used].sum()
    return float(c / u) if u else 1.0


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel-level Dice of foreground (any nucleus) against background."""
    a, b = gt > 0, pred > 0
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def coco_ap(gts: list[np.ndarray], preds: list[np.ndarray], scores: list[dict[int, float]] | None = None) -> dict:
    """COCO mask AP, AP50, AP75 (pycocotools) over images of instance label maps (class-agnostic)."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    aid = 1
    for k, (g, p) in enumerate(zip(gts, preds)):
        h, w = g.shape
        images.append({"id": k, "height": h, "width": w})
        for i in np.unique(g)[1:]:
            rle = mask_utils.encode(np.asfortranarray((g == i).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": aid, "image_id": k, "category_id": 1, "segmentation": rle,
                         "area": float((g == i).sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
            aid += 1
        for j in np.unique(p)[1:]:
            rle = mask_utils.encode(np.asfortranarray((p == j).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            s = 1.0 if scores is None else float(scores[k].get(int(j), 1.0))
            dets.append({"image_id": k, "category_id": 1, "segmentation": rle, "score": s})
    if not anns:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    gt_coco = COCO()
    gt_coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        dt = gt_coco.loadRes(dets)
        ev = COCOeval(gt_coco, dt, "segm")
        ev.params.maxDets = [1, 100, 3000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def _f_c(tp: int, fp: int, fn: int, fp_d: int, fn_d: int) -> float:
    """HoVer-Net's per-class F1 (Graham et al. 2019, eq. 13, as its reference code computes it): matched
    nuclei of the class called the class (tp) against twice the matched ones where the truth or the call,
    not both, is the class (fp, fn), plus the class's unmatched predictions and nuclei (fp_d, fn_d). The
    equation's TN term counts matched pairs of the class's samples that are neither, which is none."""
    num = 2 * tp
    den = num + 2 * fp + 2 * fn + fp_d + fn_d
    return num / den if den else float("nan")


def _image_classes(g: np.ndarray, p: np.ndarray, r: PQResult, gt_cls: dict[int, int], pred_cls: dict[int, int],
                   n_classes: int) -> tuple[int, int, np.ndarray, dict[int, float]]:
    """One image's class agreement: matched nuclei of a known class and how many of them agree, HoVer-Net's
    F_c counts per class (rows of tp, fp, fn, unmatched predictions, unmatched nuclei), and PQ per class
    present in the image."""
    gids = np.unique(g)
    gids = gids[gids > 0]
    pids = np.unique(p)
    pids = pids[pids > 0]
    fc = np.zeros((n_classes, 5), np.int64)
    correct = total = 0
    for gi, pi in r.pairs:
        gc = gt_cls.get(int(gids[gi]))
        if gc is None:
            continue
        total += 1
        pc = pred_cls.get(int(pids[pi]), -1)
        correct += int(pc == gc)
        for c in range(n_classes):
            if gc == c and pc == c:
                fc[c, 0] += 1
            elif pc == c:
                fc[c, 1] += 1
            elif gc == c:
                fc[c, 2] += 1
    matched_g = {int(gids[gi]) for gi, _ in r.pairs}
    matched_p = {int(pids[pi]) for _, pi in r.pairs}
    for i in gids:
        gc = gt_cls.get(int(i))
        if int(i) not in matched_g and gc is not None:
            fc[gc, 4] += 1
    for i in pids:
        pc = pred_cls.get(int(i))
        if int(i) not in matched_p and pc is not None and 0 <= pc < n_classes:
            fc[pc, 3] += 1
    pqs = {}
    for c in range(n_classes):
        gm = np.isin(g, [i for i in gids if gt_cls.get(int(i)) == c]) * g
        pm = np.isin(p, [i for i in pids if pred_cls.get(int(i)) == c]) * p
        if gm.max() or pm.max():
            pqs[c] = panoptic_quality(gm, pm).pq
    return correct, total, fc, pqs


def evaluate_images(gts: list[np.ndarray], preds: list[np.ndarray], gt_classes: list[dict[int, int]] | None = None,
                    pred_classes: list[dict[int, int]] | None = None, class_names: list[str] | None = None,
                    pred_scores: list[dict[int, float]] | None = None, with_coco: bool = True,
                    mpps: list[float] | None = None) -> dict:
    """Mean per-image PQ/DQ/SQ/AJI/Dice, pooled F1@0.5, COCO AP, the pooled :func:`error_breakdown`; with
    classes, accuracy and PQ per class; with each image's ``mpps``, recall by nucleus area.

    ``gt_classes[k]`` / ``pred_classes[k]`` map instance id -> 0-based class (GT ids absent: unknown class).
    Images with neither nuclei nor predictions say nothing about a model and are left out of the means
    (a model that finds nothing scores 0, not the share of empty images); ``images`` counts all.
    """
    per = {"pq": [], "dq": [], "sq": [], "aji": [], "dice": []}
    tp = fp = fn = 0
    correct = total = 0
    errors = dict.fromkeys(ERROR_KINDS, 0)
    n_bins = len(AREA_BINS_UM2) + 1
    area_n, area_found = np.zeros(n_bins, np.int64), np.zeros(n_bins, np.int64)
    per_class_pq: dict[str, list[float]] = {n: [] for n in (class_names or [])}
    # HoVer-Net's F_c counts per class: matched pairs (tp, fp, fn) and unmatched predictions/nuclei
    fc = np.zeros((len(class_names or []), 5), np.int64)
    for k, (g, p) in enumerate(zip(gts, preds)):
        ov = iou_matrix(g, p)
        r = _pq(ov)
        if g.any() or p.any():
            per["pq"].append(r.pq)
            per["dq"].append(r.dq)
            per["sq"].append(r.sq)
            per["aji"].append(_aji(ov))
            per["dice"].append(dice(g, p))
        tp, fp, fn = tp + r.tp, fp + r.fp, fn + r.fn
        for kind, c in _errors(ov, r).items():
            errors[kind] += c
        if mpps is not None:
            a, b = _area_recall(ov, r, mpps[k])
            area_n, area_found = area_n + a, area_found + b
        if gt_classes is not None and pred_classes is not None and class_names and gt_classes[k]:
            # (an image whose nuclei have no class labels says nothing about classes)
            ok, n, counts, pqs = _image_classes(g, p, r, gt_classes[k], pred_classes[k], len(class_names))
            correct, total, fc = correct + ok, total + n, fc + counts
            for c, v in pqs.items():
                per_class_pq[class_names[c]].append(v)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in per.items()}
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    out.update(tp=tp, fp=fp, fn=fn, images=len(gts), errors=errors)
    if mpps is not None:
        edges = [0.0, *AREA_BINS_UM2, float("inf")]
        out["recall_by_area_um2"] = {
            f"{lo:g}-{hi:g}": {"nuclei": int(a), "recall": float(b / a) if a else float("nan")}
            for lo, hi, a, b in zip(edges[:-1], edges[1:], area_n, area_found)}
    if with_coco:
        out.update(coco_ap(gts, preds, pred_scores))
    if class_names and gt_classes is not None:
        out["classification_accuracy"] = correct / total if total else float("nan")
        out["pq_per_class"] = {n: float(np.mean(v)) if v else float("nan") for n, v in per_class_pq.items()}
        out["f1_per_class"] = {n: _f_c(*fc[c]) for c, n in enumerate(class_names)}
    return out


@dataclass
class ImageSegmentation:
    """What ``wsiseg segment --whole-slide`` finds in an image, at the model's resolution (``plan.model_mpp``)."""

    labels: np.ndarray  # instance ids, 0 background
    classes: dict[int, int]  # id -> 0-based class
    scores: dict[int, float]
    probs: dict[int, np.ndarray]  # id -> P(class | nucleus), where the model gives them
    plan: object  # wsiseg.tiling.ReadPlan: how the image was resampled for the model
    min_area: int  # the smallest nucleus kept, in model pixels

    def at_image_resolution(self, shape: tuple[int, int]) -> np.ndarray:
        """The label image on the image's own pixel grid (nearest model pixel)."""
        import cv2

        if self.labels.shape == tuple(shape):
            return self.labels
        return cv2.resize(self.labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def segment_image(image: np.ndarray, mpp: float, pred, min_area_um2: float | None = None, name: str = "image",
                  batch_size: int = 4) -> ImageSegmentation:
    """Segment an in-memory RGB image of ``mpp`` µm/px exactly as ``wsiseg segment --whole-slide`` segments a
    slide of it: the same resampling to the model's mpp (pixel-centre exact), the same tiles, stitching and
    smallest nucleus (``min_area_um2`` at the resolution the model sees), with oversized objects dropped."""
    from .slide import ArraySlide
    from .stitching import min_area_px, stitch_tiles
    from .tiling import plan_slide, stream_tiles
    from .tissue import full_tissue

    card = pred.card
    slide = ArraySlide(image, mpp, name)
    sp = plan_slide(slide, card.mpp, card.tile_size, card.overlap, tissue=full_tissue(slide))
    min_area = min_area_px(card.min_area_um2 if min_area_um2 is None else min_area_um2, sp.plan.model_mpp)
    labels, cls, sc, probs = stitch_tiles(sp.grid, pred, stream_tiles(slide, sp.plan, sp.grid, workers=1,
                                                                      prefetch=1), batch_size, "drop", min_area)
    return ImageSegmentation(labels, cls, sc, probs, sp.plan, min_area)


def evaluate_predictor(pred, val: list, class_names: list[str], min_area_um2: float | None = None) -> dict:
    """Metrics of any predictor (a model or the threshold baseline) over labelled samples
    (:class:`wsiseg.datasets.Sample`), each segmented as ``wsiseg segment`` segments a slide
    (:func:`segment_image`) and scored on its own pixel grid; the smallest nuclei kept are the card's unless
    given."""
    gts, preds, gcls, pcls, scores, mpps = [], [], [], [], [], []
    for s in val:
        seg = segment_image(s.image, s.mpp, pred, min_area_um2, name=s.name)
        gts.append(s.instances)
        preds.append(seg.at_image_resolution(s.instances.shape))
        gcls.append(s.classes)
        pcls.append(seg.classes)
        scores.append(seg.scores)
        mpps.append(s.mpp)
    multi = len(class_names) > 1
    return evaluate_images(gts, preds, gcls if multi else None, pcls if multi else None,
                           class_names if multi else None, scores, mpps=mpps)


def evaluate(model: str, data: str, names: list[str] | None = None, score_threshold: float | None = None,
             device: str = "auto") -> dict:
    """Metrics of a model (a ``.safetensors`` file or ``"threshold"``) on an instance-label folder (its images
    ``names``, or all), tiled as on slides; classes are scored when the model has several."""
    from .datasets import InstanceFolder
    from .inference import load_predictor

    pred = load_predictor(model, device=device, score_threshold=score_threshold)
    classes = pred.card.class_names
    multi = len(classes) > 1
    folder = InstanceFolder(data, names=names, class_names=classes if multi else None)
    return evaluate_predictor(pred, folder.samples, folder.class_names if multi else ["nucleus"])
