"""Training data from COCO JSON and from QuPath GeoJSON over a slide region."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import synthetic_he, write_pyramid_tiff
from PIL import Image

from wsiseg.augment import targets_from_labels
from wsiseg.datasets import CocoInstances, GeoJSONRegion, load_dataset


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_coco_polygons_rle_and_box_only(tmp_path):
    from pycocotools import mask as mask_utils

    rgb, truth = synthetic_he(128, 160, n_nuclei=12, seed=3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    anns = []
    ids = [int(i) for i in np.unique(truth)[1:]]
    for k, i in enumerate(ids):
        m = truth == i
        a = {"id": k + 1, "image_id": 7, "category_id": 1 + k % 2, "iscrowd": 0}
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        if k == 0:  # only a box
            a["bbox"] = bbox
        elif k % 2:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            a["bbox"] = bbox
        else:
            cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            a["segmentation"] = [(c[:, 0, :] + 0.5).ravel().tolist() for c in cs]
            a["bbox"] = bbox
        anns.append(a)
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 128, "width": 160}],
            "categories": [{"id": 1, "name": "tumour"}, {"id": 2, "name": "immune"}], "annotations": anns}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    ds = load_dataset(str(tmp_path / "a.json"), mpp=0.5)
    assert isinstance(ds, CocoInstances) and ds.class_names == ["immune", "tumour"]
    (s,) = ds.samples
    assert s.mpp == 0.5 and s.no_mask == {1} and len(np.unique(s.instances)) - 1 == len(ids)
    for k, i in enumerate(ids[1:], start=2):  # RLE exact; polygons through boundary pixel centres lose a rim
        assert _iou(s.instances == k, truth == i) > (0.99 if k % 2 == 0 else 0.7)
    assert s.classes[2] == ds.class_names.index("immune") and s.classes[3] == ds.class_names.index("tumour")
    t = targets_from_labels(s.instances, s.classes, s.no_mask)
    assert (~t["mask_known"]).sum() == 1 and t["mask_known"].sum() == len(ids) - 1


def test_coco_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        CocoInstances(bad)
    (tmp_path / "missing.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}]}))
    with pytest.raises(FileNotFoundError, match="x.png"):
        CocoInstances(tmp_path / "missing.json")


def test_geojson_from_segment_round_trips(tmp_path):
    """Nuclei exported as QuPath GeoJSON (as a user would edit them) become training labels again."""
    from wsiseg.inference import ThresholdPredictor, threshold_card
    from wsiseg.pipeline import SegmentOptions, segment_slide

    rgb, truth = synthetic_he(384, 384, n_nuclei=30, seed=5)
    slide = write_pyramid_tiff(tmp_path / "s.tif", rgb, mpp=0.5)
    pred = ThresholdPredictor(threshold_card(mpp=0.5, tile_size=256, overlap=64))
    summary = segment_slide(slide, pred, tmp_path / "out", SegmentOptions(tissue="whole", progress=False,
                                                                          geojson="geojson", stats=False))
    (gj,) = (tmp_path / "out").glob("*.geojson")
    ds = load_dataset(str(gj), slide=str(slide))
    assert isinstance(ds, GeoJSONRegion) and ds.class_names == ["nucleus"] and ds.mpp == pytest.approx(0.5)
    (s,) = ds.samples
    assert len(np.unique(s.instances)) - 1 == summary["nuclei"]
    assert all(c == 0 for c in s.classes.values()) and len(s.classes) == summary["nuclei"]
    x, y = (int(v) for v in s.name.split("_")[-2:])
    h, w = s.instances.shape
    import zarr

    (z,) = (tmp_path / "out").glob("*.ome.zarr")
    labels = np.asarray(zarr.open_group(str(z), mode="r")["labels/nuclei/0"])[0]
    assert _iou(s.instances > 0, labels[y:y + h, x:x + w] > 0) > 0.99
    assert np.abs(s.image.astype(int) - rgb[y:y + h, x:x + w].astype(int)).mean() < 8  # JPEG tiles


def test_geojson_needs_its_slide(tmp_path):
    p = tmp_path / "n.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="slide"):
        load_dataset(str(p))
