"""Per-nucleus shape and colour features from a mask crop and the pixels under it."""

from __future__ import annotations

import math

import numpy as np

FEATURE_COLUMNS = [
    "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um", "eccentricity", "solidity",
    "circularity", "orientation_deg", "mean_r", "mean_g", "mean_b", "hematoxylin_od", "eosin_od",
    "max_diameter_um", "min_diameter_um",
]
SHAPE_COLUMNS = FEATURE_COLUMNS[:8]
COLOUR_COLUMNS = FEATURE_COLUMNS[8:13]
# a cell (the nucleus grown by the cell expansion) and its cytoplasm (the cell less the nucleus)
CELL_COLUMNS = [
    "cell_area_um2", "cell_perimeter_um", "cell_circularity", "cell_solidity", "cell_max_diameter_um",
    "cell_min_diameter_um", "nucleus_cell_area_ratio", "cell_hematoxylin_od", "cell_eosin_od",
    "cytoplasm_hematoxylin_od", "cytoplasm_eosin_od",
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
        return {k: float("nan") for k in SHAPE_COLUMNS}
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


def _hull_points(mask: np.ndarray) -> np.ndarray:
    """(x, y) vertices of the convex hull of the mask's outline (its boundary pixels' edge midpoints)."""
    import cv2

    inner = cv2.erode(mask.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    by, bx = np.nonzero(mask & (inner == 0))
    pts = (np.column_stack([bx, by]).astype(np.float32)[:, None, :] + _EDGE_MIDPOINTS[:, ::-1]).reshape(-1, 2)
    return cv2.convexHull(pts)[:, 0, :].astype(np.float64)


def diameters(mask: np.ndarray, mpp: float) -> dict[str, float]:
    """QuPath's shape diameters of the mask's outline, in µm: the maximum (of the smallest enclosing circle)
    and the minimum (the smallest width between parallel lines enclosing it)."""
    import shapely

    if not mask.any():
        return {"max_diameter_um": float("nan"), "min_diameter_um": float("nan")}
    hull = _hull_points(mask)
    if len(hull) < 3:
        return {"max_diameter_um": 1.0 * mpp, "min_diameter_um": 1.0 * mpp}
    max_d = 2 * float(shapely.minimum_bounding_radius(shapely.multipoints(hull)))
    a, b = hull, np.roll(hull, -1, axis=0)
    edge = b - a
    length = np.hypot(edge[:, 0], edge[:, 1])
    ok = length > 0
    # for each hull edge, the farthest hull point from its line: the width in that direction
    cross = np.abs(edge[ok, None, 0] * (hull[None, :, 1] - a[ok, None, 1])
                   - edge[ok, None, 1] * (hull[None, :, 0] - a[ok, None, 0]))
    min_d = float((cross.max(axis=1) / length[ok]).min()) if ok.any() else 0.0
    return {"max_diameter_um": max_d * mpp, "min_diameter_um": min_d * mpp}


def _convex_hull_pixels(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """Pixels whose centres lie in the convex hull of the mask's pixel-edge midpoints, borders included
    (scikit-image's ``convex_hull_image``, with OpenCV's hull in place of Qhull)."""
    import cv2
    from skimage.measure import grid_points_in_poly

    # A pixel whose four neighbours are all in the mask adds no hull vertex: each of its edge midpoints
    # lies between two midpoints of its neighbours. Only the boundary pixels' midpoints are needed.
    hull = _hull_points(mask)[:, ::-1]  # (row, col)
    if len(hull) < 3:
        return float(len(ys))
    return float((grid_points_in_poly(mask.shape, hull, binarize=False) >= 1).sum())


def _od_means(px: np.ndarray) -> tuple[float, float]:
    """Mean hematoxylin and eosin optical density of RGB pixels (n, 3) as float64, n > 0."""
    hed = -np.log10(np.maximum(px, 1.0) / 255.0) @ _hed_from_rgb()
    return float(max(hed[:, 0].mean(), 0.0)), float(max(hed[:, 1].mean(), 0.0))


def stain_od(mask: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """Mean hematoxylin and eosin optical density inside the mask (colour deconvolution with scikit-image's
    Ruifrok & Johnston H&E vectors); NaN for an empty mask."""
    px = rgb[mask].astype(np.float64)
    if px.size == 0:
        return float("nan"), float("nan")
    return _od_means(px)


def colour_features(mask: np.ndarray, rgb: np.ndarray) -> dict[str, float]:
    """Mean RGB and mean hematoxylin / eosin optical density (colour deconvolution) inside the mask."""
    px = rgb[mask].astype(np.float64)
    if px.size == 0:
        return {k: float("nan") for k in COLOUR_COLUMNS}
    mean = px.mean(axis=0)
    h, e = _od_means(px)
    return {"mean_r": float(mean[0]), "mean_g": float(mean[1]), "mean_b": float(mean[2]),
            "hematoxylin_od": h, "eosin_od": e}


def nucleus_features(mask: np.ndarray, rgb: np.ndarray | None, mpp: float,
                     have: np.ndarray | None = None) -> dict[str, float]:
    """All features of one nucleus; ``rgb`` is the crop under ``mask`` (same shape), or None; ``have`` says
    which of its pixels are known (colour is measured over those)."""
    out = shape_features(mask, mpp)
    if rgb is not None:
        out.update(colour_features(mask if have is None else mask & have, rgb))
    else:
        out.update({k: float("nan") for k in COLOUR_COLUMNS})
    out.update(diameters(mask, mpp))
    return out


def cell_features(cell: np.ndarray, nucleus_in_cell: np.ndarray, rgb: np.ndarray | None, mpp: float,
                  have: np.ndarray | None = None) -> dict[str, float]:
    """The features of a cell (boolean crop) whose nucleus is ``nucleus_in_cell`` (a crop of the same shape):
    its shape, the nucleus/cell area ratio, and stain densities of the cell and of its cytoplasm."""
    shape = shape_features(cell, mpp)
    area = float(cell.sum())
    out = {
        "cell_area_um2": area * mpp * mpp,
        "cell_perimeter_um": shape["perimeter_um"],
        "cell_circularity": shape["circularity"],
        "cell_solidity": shape["solidity"],
        **{f"cell_{k}": v for k, v in diameters(cell, mpp).items()},
        "nucleus_cell_area_ratio": min(1.0, float(nucleus_in_cell.sum()) / area) if area else float("nan"),
    }
    if rgb is None:
        nan = float("nan")
        out.update(cell_hematoxylin_od=nan, cell_eosin_od=nan, cytoplasm_hematoxylin_od=nan, cytoplasm_eosin_od=nan)
        return out
    known = cell if have is None else cell & have
    out["cell_hematoxylin_od"], out["cell_eosin_od"] = stain_od(known, rgb)
    out["cytoplasm_hematoxylin_od"], out["cytoplasm_eosin_od"] = stain_od(known & ~nucleus_in_cell, rgb)
    return out
