"""Calibrated class probabilities: temperature scaling of P(class | nucleus) fitted on validation nuclei.

A model's class probabilities are calibrated when, of the nuclei it calls a class with probability p, a
share p are that class. Temperature scaling (Guo et al. 2017) divides the class logits by one number ``T``
fitted to minimise the negative log-likelihood of the true classes of matched validation nuclei; the most
likely class never changes. The expected calibration error (ECE) says how far from calibrated a model is:
the mean gap between confidence and accuracy over equal-width confidence bins, weighted by their nuclei.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """ECE of the most likely class's probability (``probs``: (n, classes); ``truth``: (n,) 0-based)."""
    probs = np.asarray(probs, np.float64)
    truth = np.asarray(truth)
    if len(truth) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    k = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = k == b
        if sel.any():
            ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return float(ece)


def with_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Probabilities as if the logits had been divided by ``t`` (log-probabilities differ from logits by a
    constant per nucleus, so they serve as logits)."""
    z = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, np.float64)[np.arange(len(truth)), truth]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> float:
    """The temperature (0.05-20) that minimises the NLL of ``truth`` under ``with_temperature(probs, T)``."""
    from scipy.optimize import minimize_scalar

    if len(truth) == 0:
        raise ValueError("no matched nuclei with a known class to calibrate on")
    r = minimize_scalar(lambda lt: nll(with_temperature(probs, float(np.exp(lt))), truth),
                        bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))


def matched_probabilities(gt: np.ndarray, gt_classes: dict[int, int], pred: np.ndarray,
                          pred_probs: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of the predictions matched (IoU > 0.5) to nuclei of a known class, and those
    nuclei's classes."""
    from .evaluation import _pq, iou_matrix

    gids = np.unique(gt)
    gids = gids[gids > 0]
    pids = np.unique(pred)
    pids = pids[pids > 0]
    probs, truth = [], []
    for gi, pi in _pq(iou_matrix(gt, pred)).pairs:
        c = gt_classes.get(int(gids[gi]))
        p = pred_probs.get(int(pids[pi]))
        if c is not None and p is not None:
            probs.append(p)
            truth.append(c)
    if not probs:
        return np.zeros((0, 0), np.float64), np.zeros(0, np.int64)
    return np.asarray(probs, np.float64), np.asarray(truth, np.int64)


@dataclass
class Calibration:
    temperature: float
    nuclei: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    accuracy: float

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def calibrate_predictor(pred, samples: list) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """Fit the temperature on labelled samples (:class:`wsiseg.datasets.Sample` with classes), each segmented
    as ``wsiseg segment`` segments a slide; the predictor's own temperature is the starting point."""
    from .evaluation import segment_image

    all_p, all_t = [], []
    for s in samples:
        if not s.classes:
            continue
        seg = segment_image(s.image, s.mpp, pred, name=s.name)
        p, t = matched_probabilities(s.instances, s.classes, seg.at_image_resolution(s.instances.shape),
                                     seg.probs)
        if len(t):
            all_p.append(p)
            all_t.append(t)
    if not all_p:
        raise ValueError("no matched nuclei with a known class to calibrate on")
    probs, truth = np.concatenate(all_p), np.concatenate(all_t)
    t = fit_temperature(probs, truth)
    after = with_temperature(probs, t)
    return Calibration(t, len(truth), expected_calibration_error(probs, truth), expected_calibration_error(after, truth),
                       nll(probs, truth), nll(after, truth), float((probs.argmax(1) == truth).mean())), probs, truth


def calibrate_model(model: str | os.PathLike, samples: list, out: str | os.PathLike,
                    min_probability: float | None = None, device: str = "auto") -> Calibration:
    """Write ``out``: the model with its class temperature fitted on ``samples`` (the model's own temperature
    is multiplied by the fitted one), the calibration recorded in its card's metrics, and optionally the
    probability under which a class is reported uncertain."""
    from .inference import MaskRCNNPredictor, select_device
    from .model import load_model, save_model

    net, card = load_model(model)
    pred = MaskRCNNPredictor(copy.deepcopy(net), card, select_device(device))  # it folds BatchNorm: saved is net
    cal, _, _ = calibrate_predictor(pred, samples)
    before = card.config.class_temperature
    card.config.class_temperature = round(before * cal.temperature, 4)
    net.roi_heads.class_temperature = card.config.class_temperature
    if min_probability is not None:
        card.class_min_probability = float(min_probability)
    card.metrics = {**card.metrics, "calibration": {**cal.as_dict(), "temperature_before": before,
                                                    "samples": len(samples)}}
    save_model(net, card, Path(out), half=True)
    return cal
