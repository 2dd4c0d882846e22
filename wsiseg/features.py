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

    Orientation is the angle of the major axis from the x axis towards +y
    (clockwise on screen, as OpenCV and QuPath draw), in degrees in (-90, 90].
    """
    from skimage.measure import regionprops

    m = np.pad(mask.astype(np.uint8), 1)
    props = regionprops(m)
    if not props:
        return {k: float("nan") for k in FEATURE_COLUMNS[:8]}
    p = props[0]
    area = float(p.area)
    perim = float(p.perimeter_crofton) if area > 1 else 4.0
    circ = min(1.0, 4 * math.pi * area / perim**2) if perim > 0 else float("nan")
    mu = p.moments_central  # mu[i, j]: i-th order in rows (y), j-th in columns (x)
    orientation = 0.5 * math.degrees(math.atan2(2 * mu[1, 1], mu[0, 2] - mu[2, 0]))
    if orientation <= -90.0:
        orientation += 180.0
    return {
        "perimeter_um": perim * mpp,
        "equivalent_diameter_um": float(p.equivalent_diameter_area) * mpp,
        "major_axis_um": float(p.axis_major_length) * mpp,
        "minor_axis_um": float(p.axis_minor_length) * mpp,
        "eccentricity": float(p.eccentricity),
        "solidity": float(p.solidity),
        "circularity": circ,
        "orientation_deg": orientation,
    }


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
