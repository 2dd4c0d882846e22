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
                hed: bool = True, min_area: int = 8, glass: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An augmented crop at the model's mpp and its targets (boxes, labels, masks, class_known, mask_known).

    With probability ``glass`` the crop reaches past one or two edges of the image by 10-75% of its width,
    and what lies beyond is blank glass: so that the model sees what tiles at the edge of tissue hold.
    """
    import cv2

    scale = s.mpp / model_mpp * float(rng.uniform(1 - scale_jitter, 1 + scale_jitter))
    src = int(math.ceil(size / scale))
    h, w = s.instances.shape
    y0 = int(rng.integers(0, max(1, h - src + 1)))
    x0 = int(rng.integers(0, max(1, w - src + 1)))
    fill = 255
    if glass and rng.random() < glass:
        y0, x0 = _past_edges(y0, x0, src, h, w, rng)
        fill = _glass_colour(rng)
    img, lab = _window(s.image, y0, x0, src, fill), _window(s.instances, y0, x0, src, 0)
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


def _past_edges(y0: int, x0: int, src: int, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
    """The window moved past one edge of the image, or two (a corner)."""
    sides = rng.choice(4, size=1 + int(rng.random() < 0.3), replace=False)
    for side in sides:
        out = int(rng.uniform(0.1, 0.75) * src)
        if side == 0:
            x0 = -out
        elif side == 1:
            x0 = max(w, src) - src + out
        elif side == 2:
            y0 = -out
        else:
            y0 = max(h, src) - src + out
    return y0, x0


def _glass_colour(rng: np.random.Generator) -> np.ndarray:
    """The colour of blank glass on a scanned slide: near white, slightly tinted."""
    return np.clip(rng.uniform(222, 250) + rng.uniform(-6, 6, 3), 0, 255).astype(np.uint8)


def _window(a: np.ndarray, y0: int, x0: int, size: int, fill) -> np.ndarray:
    """``a[y0:y0+size, x0:x0+size]``, filled with ``fill`` where the window lies beyond ``a``."""
    out = np.empty((size, size, *a.shape[2:]), a.dtype)
    out[...] = fill
    h, w = a.shape[:2]
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + size), min(w, x0 + size)
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = a[ys:ye, xs:xe]
    return out


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
