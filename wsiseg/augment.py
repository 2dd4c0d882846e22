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


def colour_jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness (±strength/2), contrast and saturation (±strength) of an RGB uint8 image."""
    x = img.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)  # saturation
    x = x.mean() + (x - x.mean()) * rng.uniform(1 - strength, 1 + strength)  # contrast
    x = x * rng.uniform(1 - strength / 2, 1 + strength / 2)  # brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def low_resolution(img: np.ndarray, rng: np.random.Generator, lo: float = 1.5, hi: float = 2.2) -> np.ndarray:
    """The image as a scan at a coarser resolution brought to the model's would look: averaged down by a random
    factor in [lo, hi], then resampled back bilinearly (as the pipeline reads a 20x slide for a 40x model)."""
    import cv2

    h, w = img.shape[:2]
    f = float(rng.uniform(lo, hi))
    small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, max_sigma: float = 1.2) -> np.ndarray:
    """Out-of-focus scanning: a Gaussian blur of random width up to ``max_sigma`` pixels."""
    import cv2

    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, max_sigma)))


def random_crop(s: Sample, size: int, model_mpp: float, rng: np.random.Generator, scale_jitter: float = 0.1,
                hed: bool = True, min_area: int = 8, glass: float = 0.0, hed_sigma: float = 0.05,
                hed_bias: float = 0.02, colour: float = 0.0, low_res: float = 0.0, blur: float = 0.0
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An augmented crop at the model's mpp and its targets (boxes, labels, masks, class_known, mask_known).

    With probability ``glass`` the crop reaches past one or two edges of the image by 10-75% of its width,
    and what lies beyond is blank glass: so that the model sees what tiles at the edge of tissue hold.
    Appearance: HED stain jitter (``hed_sigma``, ``hed_bias``), colour jitter of strength ``colour``, and
    with probabilities ``low_res`` and ``blur`` a 20x-like resolution or an out-of-focus blur.
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
    if low_res and rng.random() < low_res:
        img = low_resolution(img, rng)
    elif blur and rng.random() < blur:
        img = gaussian_blur(img, rng)
    if hed:
        img = hed_jitter(img, rng, hed_sigma, hed_bias)
    if colour:
        img = colour_jitter(img, rng, colour)
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
