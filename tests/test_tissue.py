from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from wsiseg.slide import SlideError, open_slide
from wsiseg.tissue import detect_tissue, tissue_from_geojson, tissue_from_rgb


def _scene(seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((400, 600, 3), 245, np.uint8)
    img = np.clip(img.astype(int) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)  # glass noise
    truth = np.zeros((400, 600), np.uint8)
    cv2.ellipse(truth, (220, 200), (150, 110), 20, 0, 360, 1, -1)
    tex = rng.integers(-25, 25, (400, 600, 1))
    tissue_col = np.clip(np.array([200, 110, 170])[None, None, :] + tex, 0, 255)
    img[truth > 0] = tissue_col[truth > 0]
    cv2.line(img, (450, 50), (560, 350), (30, 140, 60), 12)  # green pen
    cv2.line(img, (470, 380), (590, 250), (40, 70, 200), 10)  # blue pen
    cv2.circle(img, (520, 60), 6, (20, 20, 20), -1)  # black ink dot
    for _ in range(30):  # dust specks
        y, x = rng.integers(0, 400), rng.integers(380, 600)
        img[y, x] = (150, 90, 140)
    return img, truth.astype(bool)


def test_tissue_found_and_pen_marks_and_specks_ignored():
    img, truth = _scene()
    mask = tissue_from_rgb(img, px_um=8.0)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[:, 440:].any(), "pen, ink and dust are not tissue"


def test_area_rule_drops_small_fragments_and_fills_small_holes():
    # 8 µm pixels, min area 5000 µm² = 78 px: fragments and holes are judged by their area
    img = np.full((300, 400, 3), 245, np.uint8)
    pink = (200, 110, 170)
    cv2.rectangle(img, (20, 20), (200, 200), pink, -1)
    cv2.rectangle(img, (60, 60), (65, 65), (245, 245, 245), -1)  # 36 px hole: filled
    cv2.rectangle(img, (120, 120), (139, 139), (245, 245, 245), -1)  # 400 px hole: kept
    cv2.rectangle(img, (260, 40), (265, 45), pink, -1)  # 36 px fragment: dropped
    cv2.rectangle(img, (260, 150), (289, 179), pink, -1)  # 900 px fragment: kept
    mask = tissue_from_rgb(img, px_um=8.0)
    assert mask[62, 62] and not mask[130, 130]
    assert not mask[30:60, 250:280].any() and mask[165, 275]
    assert mask[100, 100] and not mask[250, 100]


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(1)
    img = np.clip(240 + rng.normal(0, 4, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert tissue_from_rgb(img, px_um=8.0).sum() == 0


def test_detect_tissue_on_real_slide(slides_dir):
    s = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    m = detect_tissue(s)
    ds = m.downsample
    assert ds * s.mpp == pytest.approx(2.0, rel=0.05)  # the mask is no finer than 2 µm per pixel
    # glass at the top-left corner, tissue in the middle of the section
    assert not m.mask[:25, :25].any()
    assert m.mask[int(1800 / ds), int(1000 / ds)]
    assert 0.2 < m.mask.mean() < 0.6
    # the same tissue as detected on the full-resolution image
    fine = detect_tissue(s, finest_um=0.0)
    assert fine.downsample < ds / 2
    assert m.area_mm2(s.mpp) == pytest.approx(fine.area_mm2(s.mpp), rel=0.05)


def test_geojson_region_replaces_detection(slides_dir, tmp_path):
    s = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    square = [[100, 100], [1100, 100], [1100, 1100], [100, 1100], [100, 100]]
    hole = [[400, 400], [600, 400], [600, 600], [400, 600], [400, 400]]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [square, hole]}}]}
    p = tmp_path / "region.geojson"
    p.write_text(json.dumps(fc))
    m = tissue_from_geojson(p, s)
    assert m.area_level0_px() == pytest.approx(1000 * 1000 - 200 * 200, rel=0.03)
    assert m.area_mm2(0.499) == pytest.approx(0.96e6 * 0.499**2 / 1e6, rel=0.03)


def test_bad_geojson_is_named(slides_dir, tmp_path):
    s = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    p = tmp_path / "bad.geojson"
    p.write_text("{not json")
    with pytest.raises(SlideError, match="bad.geojson"):
        tissue_from_geojson(p, s)
    p.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(SlideError, match="no polygon"):
        tissue_from_geojson(p, s)
