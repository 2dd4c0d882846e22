"""Tissue masks: detected on a thumbnail, or drawn by the user as GeoJSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .slide import Slide, SlideError


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the slide; one mask pixel covers ``downsample`` level-0 pixels per side."""

    mask: np.ndarray
    downsample: float
    source: str = "detected"
    region_wkb: bytes | None = None  # a user's region: its polygons in level-0 pixels (WKB), exact
    notes: tuple[str, ...] = ()  # what was repaired or clipped in a user's region

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    def area_level0_px(self) -> float:
        if self.region_wkb is not None:
            from shapely import from_wkb

            return float(from_wkb(self.region_wkb).area)
        return float(self.mask.sum()) * self.downsample**2

    def area_mm2(self, mpp: float) -> float:
        """Tissue area in mm² given the level-0 microns per pixel."""
        return self.area_level0_px() * (mpp / 1000.0) ** 2

    def integral(self) -> np.ndarray:
        """Summed-area table with a zero first row and column."""
        ii = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        ii[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        return ii


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values."""
    import cv2

    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    t, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _drop_small(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_px`` pixels."""
    import cv2

    _, labels, st, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = st[:, cv2.CC_STAT_AREA] > max_px
    keep[0] = False
    return keep[labels]


def tissue_from_rgb(
    rgb: np.ndarray,
    px_um: float | None = None,
    min_saturation: float = 0.04,
    max_saturation: float = 0.12,
    min_tissue_um2: float = 5_000.0,
) -> np.ndarray:
    """Tissue mask of an RGB overview.

    Tissue is stained (saturated) and not glass-bright; pen ink (green, blue,
    black) and specks smaller than ``min_tissue_um2`` are removed, holes in
    tissue smaller than the same area are filled. ``px_um`` is the size of one
    overview pixel in microns; without it the area rules use a pixel count
    scaled to the overview size.
    """
    import cv2

    hsv8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    hsv = hsv8.astype(np.float32) / 255.0
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    # Hematoxylin/eosin hues run from blue-purple through pink to red-orange;
    # green and cyan-blue inks fall outside, black ink is dark and grey.
    green_blue_ink = (hue > 70) & (hue < 245) & (sat > 0.3)
    black_ink = (val < 0.25) & (sat < 0.25)
    ink = green_blue_ink | black_ink
    candidates = hsv8[..., 1][~ink & (val > 0.1)]
    t = float(np.clip(_otsu(candidates) / 255.0, min_saturation, max_saturation)) if candidates.size else 1.0
    mask = (sat > t) & ~ink & (val < 0.98)

    if px_um is not None and px_um > 0:
        min_px = max(1, int(min_tissue_um2 / px_um**2))
        radius = max(1, int(round(8.0 / px_um)))
    else:
        min_px = max(1, mask.size // 20000)
        radius = 1
    radius = min(radius, 4)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    se = (yy**2 + xx**2 <= radius**2).astype(np.uint8)
    m = mask.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, se, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, se, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    mask = _drop_small(m > 0, min_px)
    return ~_drop_small(~mask, min_px)


def detect_tissue(slide: Slide, max_size: int = 2048, finest_um: float = 2.0) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide``: at most ``max_size`` pixels long, pixels no finer than
    ``finest_um`` microns (finer adds time, not accuracy, to a mask that only selects tiles)."""
    if slide.mpp and finest_um > 0:
        max_size = max(64, min(max_size, math.ceil(max(slide.dimensions) * slide.mpp / finest_um)))
    thumb, downsample = slide.thumbnail(max_size=max_size)
    px_um = slide.mpp * downsample if slide.mpp else None
    mask = tissue_from_rgb(thumb, px_um=px_um)
    return TissueMask(mask=mask, downsample=downsample, source="detected")


def full_tissue(slide: Slide, max_size: int = 2048) -> TissueMask:
    """A mask that treats the whole slide as tissue."""
    w, h = slide.dimensions
    ds = max(1.0, max(w, h) / max_size)
    shape = (max(1, int(np.ceil(h / ds))), max(1, int(np.ceil(w / ds))))
    return TissueMask(mask=np.ones(shape, dtype=bool), downsample=ds, source="whole slide")


def _geometries(obj: dict):
    kind = obj.get("type")
    if kind == "FeatureCollection":
        for f in obj.get("features", []):
            yield from _geometries(f)
    elif kind == "Feature":
        if obj.get("geometry") is not None:
            yield obj["geometry"]
    elif kind == "GeometryCollection":
        for g in obj.get("geometries", []):
            yield g
    elif kind is not None:
        yield obj
    elif isinstance(obj, list):  # QuPath exports a bare list of features
        for f in obj:
            yield from _geometries(f)


def tissue_from_geojson(path: str | os.PathLike, slide: Slide, max_size: int = 2048) -> TissueMask:
    """Rasterize the polygons of a GeoJSON file (level-0 pixel coordinates) into a tissue mask."""
    import cv2

    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            import gzip

            raw = gzip.decompress(raw)
        obj = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise SlideError(f"{path}: cannot read GeoJSON region: {exc}") from exc
    if isinstance(obj, list):
        obj = {"type": "FeatureCollection", "features": obj}
    region, notes = _region_geometry(obj, path, slide.dimensions)
    w, h = slide.dimensions
    ds = max(1.0, max(w, h) / max_size)
    out = np.zeros((max(1, int(np.ceil(h / ds))), max(1, int(np.ceil(w / ds)))), dtype=np.uint8)
    for p in getattr(region, "geoms", [region]):
        ext = np.round(np.asarray(p.exterior.coords)[:, :2] / ds - 0.5).astype(np.int32)
        cv2.fillPoly(out, [ext], 1)
        for ring in p.interiors:
            hole = np.round(np.asarray(ring.coords)[:, :2] / ds - 0.5).astype(np.int32)
            cv2.fillPoly(out, [hole], 0)
    return TissueMask(mask=out.astype(bool), downsample=ds, source=f"region {os.path.basename(path)}",
                      region_wkb=region.wkb, notes=tuple(notes))


def _region_geometry(obj: dict, path: str, dimensions: tuple[int, int]):
    """The union of a GeoJSON's polygons, invalid ones repaired, clipped to the slide; with notes of what
    was changed. A region with no area on the slide is a ``SlideError``."""
    from shapely import make_valid, unary_union
    from shapely.geometry import MultiPolygon, Polygon, box, shape

    polys, notes = [], []
    for g in _geometries(obj):
        try:
            geom = shape(g)
        except Exception as exc:
            raise SlideError(f"{path}: invalid geometry: {exc}") from None
        if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if not geom.is_valid:
            geom = make_valid(geom)
            notes.append("a self-intersecting or otherwise invalid polygon was repaired (shapely make_valid)")
        parts = [geom] if isinstance(geom, Polygon) else [q for q in getattr(geom, "geoms", [])
                                                          if isinstance(q, (Polygon, MultiPolygon))]
        polys += parts
    if not polys:
        raise SlideError(f"{path}: GeoJSON region holds no polygon")
    region = unary_union(polys)
    w, h = dimensions
    inside = region.intersection(box(0, 0, w, h))
    if inside.area <= 0:
        raise SlideError(f"{path}: the region lies outside the slide ({w} x {h} level-0 px); GeoJSON regions are "
                         "in level-0 pixels, as QuPath exports them")
    if inside.area < region.area * 0.999:
        notes.append(f"{100 * (1 - inside.area / region.area):.1f}% of the region lies outside the slide and is "
                     "ignored")
    inside = unary_union([q for q in getattr(inside, "geoms", [inside]) if isinstance(q, (Polygon, MultiPolygon))])
    return inside, notes
