"""Per-nucleus shape and colour features from a mask crop and the pixels under it."""

from __future__ import annotations

import math

import numpy as np

FEATURE_COLUMNS = [
    "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um", "eccentricity", "solidity",
    "circularity", "orientation_deg", "mean_r", "mean_g", "mean_b", "hematoxylin_od", "eosin_od",
]

# Ruifrok & Johnston stain vectors (rows: hematoxylin, eosin, residual), as skimage uses.
_HED_FROM_RGB = None


def _hed_from_rgb() -> np.ndarray:
    global _HED_FROM_RGB
    if _HED_FROM_RGB is None:
        from skimage.color import hed_from_rgb

        _HED_FROM_RGB = np.asarray(hed_from_rgb, np.float64)
    return _HED_FROM_RGB


def shape_features(mask: np.ndarray, mpp: float) -> dict[str, float]:
    """Perimeter, equivalent diameter, axes (µm), eccentricity, solidity, circularity, orientation (degrees).

    The definitions are scikit-image ``regionprops``' (Crofton perimeter, axes
    from the inertia tensor, solidity against the convex hull image).
    Orientation is the angle of the major axis from the x axis towards +y
    (clockwise on screen, as OpenCV and QuPath draw), in degrees in (-90, 90].
    """
    from skimage.measure import perimeter_crofton

    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    if area == 0:
        return {k: float("nan") for k in FEATURE_COLUMNS[:8]}
    dy, dx = ys - ys.mean(), xs - xs.mean()
    syy, sxx, sxy = float(dy @ dy) / area, float(dx @ dx) / area, float(dx @ dy) / area
    half_diff = math.hypot((sxx - syy) / 2, sxy)
    l1, l2 = (sxx + syy) / 2 + half_diff, max((sxx + syy) / 2 - half_diff, 0.0)
    perim = float(perimeter_crofton(np.pad(mask, 1), directions=4)) if area > 1 else 4.0
    circ = min(1.0, 4 * math.pi * area / perim**2) if perim > 0 else float("nan")
    orientation = 0.5 * math.degrees(math.atan2(2 * sxy, sxx - syy))
    if orientation <= -90.0:
        orientation += 180.0
    hull = _convex_hull_pixels(mask, ys, xs) if area > 2 else area
    return {
        "perimeter_um": perim * mpp,
        "equivalent_diameter_um": math.sqrt(4 * area / math.pi) * mpp,
        "major_axis_um": 4 * math.sqrt(l1) * mpp,
        "minor_axis_um": 4 * math.sqrt(l2) * mpp,
        "eccentricity": math.sqrt(1 - l2 / l1) if l1 > 0 else 0.0,
        "solidity": area / hull if hull > 0 else 1.0,
        "circularity": circ,
        "orientation_deg": orientation,
    }


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
_EDGE_MIDPOINTS = np.array([[-0.5, 0], [0.5, 0], [0, -0.5], [0, 0.5]], np.float32)


def _convex_hull_pixels(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """Pixels whose centres lie in the convex hull of the mask's pixel-edge midpoints, borders included
    (scikit-image's ``convex_hull_image``, with OpenCV's hull in place of Qhull)."""
    import cv2
    from skimage.measure import grid_points_in_poly

    # A pixel whose four neighbours are all in the mask adds no hull vertex: each of its edge midpoints
    # lies between two midpoints of its neighbours. Only the boundary pixels' midpoints are needed.
    inner = cv2.erode(mask.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    edge = mask & (inner == 0)
    by, bx = np.nonzero(edge)
    pts = (np.column_stack([by, bx]).astype(np.float32)[:, None, :] + _EDGE_MIDPOINTS).reshape(-1, 2)
    hull = cv2.convexHull(pts)[:, 0, :].astype(np.float64)
    if len(hull) < 3:
        return float(len(ys))
    return float((grid_points_in_poly(mask.shape, hull, binarize=False) >= 1).sum())


def colour_features(mask: np.ndarray, rgb: np.ndarray) -> dict[str, float]:
    """Mean RGB and mean hematoxylin / eosin optical density (colour deconvolution) inside the mask."""
    px = rgb[mask].astype(np.float64)
    if px.size == 0:
        return {k: float("nan") for k in FEATURE_COLUMNS[8:]}
    mean = px.mean(axis=0)
    od = -np.log10(np.maximum(px, 1.0) / 255.0)
    hed = od @ _hed_from_rgb()
    return {
        "mean_r": float(mean[0]), "mean_g": float(mean[1]), "mean_b": float(mean[2]),
        "hematoxylin_od": float(max(hed[:, 0].mean(), 0.0)), "eosin_od": float(max(hed[:, 1].mean(), 0.0)),
    }


def nucleus_features(mask: np.ndarray, rgb: np.ndarray | None, mpp: float) -> dict[str, float]:
    """All features of one nucleus; ``rgb`` is the crop under ``mask`` (same shape), or None."""
    out = shape_features(mask, mpp)
    if rgb is not None:
        out.update(colour_features(mask, rgb))
    else:
        out.update({k: float("nan") for k in FEATURE_COLUMNS[8:]})
    return out
