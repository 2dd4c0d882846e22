"""The skin-trained model (models/effnet-lite0-skin.safetensors) on a held-out region of the sample slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from shapely import contains_xy
from shapely.geometry import shape

from wsiseg.card import default_model_path
from wsiseg.evaluation import segment_image
from wsiseg.inference import load_predictor
from wsiseg.slide import open_slide

REPO = Path(__file__).resolve().parents[1]


def _epidermis_check_classes(model: str | None) -> np.ndarray:
    """Class names of the nuclei whose centroids lie in the held-out epidermis region (never trained on),
    the region segmented as ``wsiseg segment`` segments the slide (resampled from 20x to the model's mpp)."""
    doc = json.loads((REPO / "examples" / "skin" / "CMU-1-Small-Region.regions.geojson").read_text())
    region = next(shape(f["geometry"]) for f in doc["features"] if f["properties"]["name"] == "epidermis (check)")
    x0, y0, x1, y1 = (int(v) for v in region.bounds)
    slide = open_slide(REPO / "examples" / "CMU-1-Small-Region.svs")
    rgb = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
    pred = load_predictor(str(REPO / "models" / model) if model else str(default_model_path()), device="cpu")
    seg = segment_image(rgb, slide.mpp, pred)
    labels = seg.at_image_resolution(rgb.shape[:2])
    names = []
    for i in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == i)
        if contains_xy(region, x0 + xs.mean(), y0 + ys.mean()):
            names.append(pred.card.class_names[seg.classes[int(i)]])
    return np.asarray(names)


def test_the_skin_model_calls_held_out_keratinocytes_epithelial_and_the_default_does_not():
    skin = _epidermis_check_classes("effnet-lite0-skin.safetensors")
    default = _epidermis_check_classes(None)  # the shipped default
    assert len(skin) > 100 and len(default) > 100
    assert (skin == "epithelial").mean() > 0.75
    assert (default == "epithelial").mean() < 0.3
