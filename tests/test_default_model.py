"""The model that ships inside the package: its card, its size, and that it finds real nuclei."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import synthetic_he, write_pyramid_tiff
from PIL import Image

from wsiseg.card import default_model_path, load_card
from wsiseg.evaluation import panoptic_quality
from wsiseg.inference import load_predictor
from wsiseg.stitching import segment_array

REPO = Path(__file__).resolve().parents[1]
SPLIT = REPO / "configs" / "default-split.json"


def test_default_model_is_bundled_with_a_card():
    path = default_model_path()
    assert path is not None, "wsiseg/models/default.safetensors is missing from the installation"
    assert Path(path).stat().st_size <= 50e6
    card = load_card(path)
    assert card.class_names == ["epithelial", "inflammatory", "spindle", "other"] and card.mpp == 0.25
    assert card.overlap < card.tile_size and card.description
    # each class says what it means and which data taught it (only CoNSeP carries classes)
    assert all(c.description and "learnt from consep" in c.description for c in card.classes)
    val = card.metrics["validation"]
    assert {"pq", "f1", "aji"} <= set(val) and set(val["datasets"]) == {"consep", "monuseg", "gbm40", "tcga_glioma"}
    assert card.training["steps_done"] > 0 and card.training["cpu_hours"] > 0
    # the validation images named in the card are exactly those held out by the config's split files
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    held_out, trained_on = [], []
    for d in cfg["datasets"]:
        split = json.loads((REPO / d["split"]).read_text())
        held_out += split["val"]
        trained_on += split["train"]
    assert card.metrics["val_images"] == held_out and not set(held_out) & set(trained_on)
    # an average of runs (wsiseg average) names them: each is in models/, byte for byte
    import hashlib

    for run in card.training.get("averaged_from", []):
        assert hashlib.sha256((REPO / "models" / run["file"]).read_bytes()).hexdigest() == run["sha256"], run["file"]
        assert load_card(REPO / "models" / run["file"]).metrics["val_images"] == held_out


def test_default_config_trains_what_is_shipped():
    # `wsiseg train configs/default.yaml` must describe the bundled model, not a later experiment
    from dataclasses import asdict

    from wsiseg.training import TrainConfig

    cfg = asdict(TrainConfig.from_yaml(REPO / "configs" / "default.yaml"))
    shipped = load_card(default_model_path()).training
    keys = ["model", "mpp", "tile_size", "overlap", "steps", "restarts", "batch_size", "lr", "warmup_steps",
            "clip_grad", "seed", "bf16", "class_names", "scale_jitter"]
    test_time = {"rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"}  # inference settings, chosen later

    def trained(d):
        return {k: ({m: v for m, v in d[k].items() if m not in test_time} if k == "model" else d[k]) for k in keys}

    assert trained(cfg) == trained(shipped)
    assert {d["name"]: d["share"] for d in cfg["datasets"]} == {k: v["share"] for k, v in shipped["datasets"].items()}
    card = load_card(default_model_path())
    assert {k: cfg["model"][k] for k in test_time} == {k: getattr(card.config, k) for k in test_time}
    assert cfg.get("restart_peaks") in (None, [], shipped.get("restart_peaks"))


def _pooled_pq(predictor, data_dir, names, size=384):
    tp = fp = fn = 0
    iou_sum = 0.0
    for n in names:
        img = np.array(Image.open(data_dir / "monuseg-train" / "images" / f"{n}.png").convert("RGB"))[:size, :size]
        gt = np.array(Image.open(next((data_dir / "monuseg-train" / "labels").glob(f"{n}*"))))[:size, :size]
        labels, _, _ = segment_array(np.ascontiguousarray(img), predictor, predictor.card.tile_size,
                                     predictor.card.overlap)
        r = panoptic_quality(gt, labels)
        tp, fp, fn = tp + r.tp, fp + r.fp, fn + r.fn
        iou_sum += r.sq * r.tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    return f1 * iou_sum / max(tp, 1), f1  # pooled PQ = DQ x SQ, with DQ = F1 at IoU 0.5


def test_default_model_segments_held_out_monuseg(data_dir):
    names = json.loads(SPLIT.read_text())["val"][::3]  # two held-out images
    model = load_predictor(default_model_path())
    pq, f1 = _pooled_pq(model, data_dir, names)
    base_pq, base_f1 = _pooled_pq(load_predictor("threshold"), data_dir, names)
    assert pq > 0.35 and f1 > 0.55, (pq, f1)
    assert pq > base_pq + 0.1 and f1 > base_f1 + 0.1, (pq, f1, base_pq, base_f1)


def test_segment_uses_the_default_model_without_model_option(tmp_path):
    rgb, _ = synthetic_he(256, 256, n_nuclei=12)
    slide = write_pyramid_tiff(tmp_path / "s.tif", rgb, mpp=0.5)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(slide), "--out", str(out),
                           "--whole-slide", "--quiet", "--no-stats"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == load_card(default_model_path()).name


def test_the_shipped_cards_classes_reach_every_output(tmp_path, data_dir):
    """Segment held-out CoNSeP tiles with the bundled model: every output names the card's classes with the
    card's colours (GeoJSON for QuPath, table, OME-Zarr class labels, slide statistics and report)."""
    import gzip

    import pandas as pd
    import zarr

    card = load_card(default_model_path())
    names = [c.name for c in card.classes]
    colours = {c.name: list(c.color) for c in card.classes}
    val = json.loads((REPO / "configs" / "split-consep.json").read_text())["val"]
    tiles = [np.array(Image.open(next((data_dir / "consep-train" / "images").glob(f"{n}.*"))).convert("RGB"))
             for n in val[:: max(1, len(val) // 4)][:4]]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:4], axis=1)], axis=0)
    Image.fromarray(mosaic).save(tmp_path / "consep.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "segment", str(tmp_path / "consep.png"), "--mpp",
                           str(card.mpp), "--out", str(out), "--whole-slide", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["nuclei_per_class"]) == names and summary["nuclei"] > 50
    assert [c["name"] for c in summary["classes"]] == names

    with gzip.open(out / "consep.geojson.gz", "rt") as f:
        feats = json.load(f)["features"]
    sure = [f for f in feats if "classification" in f["properties"]]  # uncertain ones: unclassified in QuPath
    found = {f["properties"]["classification"]["name"] for f in sure}
    assert found <= set(names) and len(sure) > 0.7 * len(feats)
    assert len(found) >= min(2, len(names))  # a classifying model finds more than one kind here
    for f in sure:
        cls = f["properties"]["classification"]
        assert cls["color"] == colours[cls["name"]]

    table = pd.read_parquet(out / "consep.nuclei.parquet")
    assert set(table.class_name[~table.class_uncertain]) == found
    assert table.class_uncertain.sum() == len(feats) - len(sure)
    assert all(names[i - 1] == n for i, n in zip(table["class_id"], table["class_name"]))  # 1-based, as the label image

    root = zarr.open_group(str(out / "consep.ome.zarr"), mode="r")
    meta = root["labels"]["classes"].attrs["ome"]["image-label"]
    assert [p["class"] for p in meta["properties"]] == names
    assert [c["rgba"][:3] for c in meta["colors"]] == [colours[n] for n in names]
    cls_img = root["labels"]["classes"]["0"][:]
    assert set(np.unique(cls_img)) - {0} == {names.index(n) + 1 for n in found}

    stats = json.loads((out / "stats" / "summary.json").read_text())
    assert set(names) <= set(stats["classes"])
    report = (out / "stats" / "report.html").read_text()
    assert all(n in report for n in names)
