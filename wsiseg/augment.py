"""Training crops: random position, scale, rotation, flip and stain jitter, and their Mask R-CNN targets
(numpy; no torch)."""

from __future__ import annotations

import math

import numpy as np

from .datasets import Sample


def hed_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.02) -> np.ndarray:
    """Random scale and shift of the hematoxylin, eosin and DAB channels (Tellez et al.)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)


def random_crop(s: Sample, size: int, model_mpp: float, rng: np.random.Generator, scale_jitter: float = 0.1,
                hed: bool = True, min_area: int = 8) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An augmented crop at the model's mpp and its targets (boxes, labels, masks, class_known, mask_known)."""
    import cv2

    scale = s.mpp / model_mpp * float(rng.uniform(1 - scale_jitter, 1 + scale_jitter))
    src = int(math.ceil(size / scale))
    h, w = s.instances.shape
    y0 = int(rng.integers(0, max(1, h - src + 1)))
    x0 = int(rng.integers(0, max(1, w - src + 1)))
    img = s.image[y0 : y0 + src, x0 : x0 + src]
    lab = s.instances[y0 : y0 + src, x0 : x0 + src]
    if img.shape[0] != src or img.shape[1] != src:
        pad = ((0, src - img.shape[0]), (0, src - img.shape[1]))
        img = np.pad(img, pad + ((0, 0),), constant_values=255)
        lab = np.pad(lab, pad)
    if src != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        lab = cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST)
    k = int(rng.integers(0, 4))
    img, lab = np.rot90(img, k), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img, lab = np.ascontiguousarray(img), np.ascontiguousarray(lab)
    if hed:
        img = hed_jitter(img, rng)
    return img, targets_from_labels(lab, s.classes, s.no_mask, min_area)


def targets_from_labels(lab: np.ndarray, classes: dict[int, int], no_mask: set[int], min_area: int = 8) -> dict:
    from scipy import ndimage

    ids = np.unique(lab)
    ids = ids[ids > 0]
    boxes, labels, masks, ck, mk = [], [], [], [], []
    slices = ndimage.find_objects(lab)
    for i in ids:
        sl = slices[i - 1]
        if sl is None:
            continue
        m = lab == i
        if m.sum() < min_area:
            continue
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        c = classes.get(int(i))
        labels.append(1 + (c if c is not None else 0))
        ck.append(c is not None)
        mk.append(int(i) not in no_mask)
        masks.append(m)
    n = len(boxes)
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
        "labels": np.asarray(labels, np.int64),
        "masks": np.asarray(masks, np.uint8).reshape(n, *lab.shape),
        "class_known": np.asarray(ck, bool),
        "mask_known": np.asarray(mk, bool),
    }
