"""Class probabilities: calibrated by a fitted temperature, written to every output, counted in the statistics,
and an uncertain class said so (QuPath: unclassified)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_he, write_pyramid_tiff
from helpers_model import tiny_model

from wsiseg.calibration import expected_calibration_error, fit_temperature, with_temperature

QUPATH_CHECK = Path(__file__).resolve().parents[2] / "shared" / "tools" / "qupath-check" / "qupath-check"


def _overconfident(n=4000, k=4, t_true=2.0, seed=0):
    """Logits z; the truth drawn from softmax(z / t_true); the model reports softmax(z): overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, k))
    p_true = with_temperature(np.exp(z - z.max(1, keepdims=True)), t_true)
    truth = np.array([rng.choice(k, p=p) for p in p_true])
    reported = np.exp(z - z.max(1, keepdims=True))
    return reported / reported.sum(1, keepdims=True), truth


def test_fitted_temperature_recovers_the_truth_and_lowers_the_calibration_error():
    probs, truth = _overconfident()
    t = fit_temperature(probs, truth)
    assert 1.8 < t < 2.2
    after = with_temperature(probs, t)
    assert (after.argmax(1) == probs.argmax(1)).all()  # the most likely class never changes
    assert expected_calibration_error(after, truth) < 0.03 < expected_calibration_error(probs, truth)


def test_calibration_error_of_a_calibrated_model_is_small():
    probs, truth = _overconfident(t_true=1.0, seed=1)
    assert expected_calibration_error(probs, truth) < 0.03
    assert 0.85 < fit_temperature(probs, truth) < 1.15


def test_model_temperature_flattens_probabilities_and_keeps_the_class(tmp_path):
    from wsiseg.inference import MaskRCNNPredictor, select_device
    from wsiseg.model import load_model

    path, _, _ = tiny_model(tmp_path, classes=("a", "b", "c"))
    img, _ = synthetic_he(128, 128, seed=3, n_nuclei=20)
    outs = []
    for t in (1.0, 3.0):
        net, card = load_model(path)
        net.roi_heads.class_temperature = t
        raw = MaskRCNNPredictor(net, card, select_device("cpu", "fp32")).infer(img[None])[0]
        outs.append(raw)
    a, b = outs
    assert len(a) > 0 and np.allclose(a.class_probs.sum(1), 1, atol=1e-4)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.class_probs.argmax(1), a.labels)
    assert (b.class_probs.max(1) <= a.class_probs.max(1) + 1e-6).all()  # a higher temperature is less sure
    assert np.allclose(b.class_probs, with_temperature(a.class_probs, 3.0), atol=1e-4)


def _segment_three_classes(tmp_path, min_probability: float):
    from wsiseg.card import load_card
    from wsiseg.inference import load_predictor
    from wsiseg.model import load_model, save_model
    from wsiseg.pipeline import SegmentOptions, segment_slide

    path, _, _ = tiny_model(tmp_path, classes=("tumour", "immune", "stroma"))
    net, card = load_model(path)
    card.class_min_probability = min_probability
    save_model(net, card, tmp_path / "m.safetensors")
    assert load_card(tmp_path / "m.safetensors").class_min_probability == min_probability
    img, _ = synthetic_he(300, 400, seed=2, n_nuclei=120)
    slide = write_pyramid_tiff(tmp_path / "s.tif", img, 0.5, levels=1, compression="zlib")
    out = tmp_path / "out"
    segment_slide(slide, load_predictor(str(tmp_path / "m.safetensors"), device="cpu"), out,
                  SegmentOptions(tissue="whole", progress=False, on_oversize="drop", zarr=False))
    return out


def test_class_probabilities_in_the_table_geojson_and_statistics(tmp_path):
    out = _segment_three_classes(tmp_path, min_probability=0.4)
    t = pd.read_parquet(out / "s.nuclei.parquet")
    cols = ["prob_tumour", "prob_immune", "prob_stroma"]
    assert len(t) > 5 and set(cols + ["class_probability", "class_uncertain"]) <= set(t.columns)
    p = t[cols].to_numpy()
    assert np.allclose(p.sum(1), 1, atol=2e-3)
    assert (np.array(["tumour", "immune", "stroma"])[p.argmax(1)] == t.class_name).all()
    assert np.allclose(t.class_probability, p.max(1), atol=1e-4)
    assert (t.class_uncertain == (t.class_probability < 0.4)).all()
    assert t.class_uncertain.any() and not t.class_uncertain.all()  # a random network is often unsure
    with gzip.open(out / "s.geojson.gz", "rt") as f:
        feats = json.load(f)["features"]
    by_uuid = t.set_index("uuid")
    for feat in feats:
        row = by_uuid.loc[feat["id"]]
        props = feat["properties"]
        assert ("classification" not in props) == bool(row.class_uncertain)
        assert abs(props["measurements"]["Class probability: immune"] - row.prob_immune) < 1e-4
    st = json.loads((out / "stats" / "summary.json").read_text())
    weighted = {c: v["probability_weighted_count"] for c, v in st["classes"].items()}
    assert abs(sum(weighted.values()) - len(t)) < 0.05 * len(t) + 1
    for c in ("tumour", "immune", "stroma"):
        assert abs(weighted[c] - t[f"prob_{c}"].sum()) < 0.05
        assert st["classes"][c]["class_uncertain"] == int((t.class_uncertain & (t.class_name == c)).sum())
    assert "probability_weighted_count" in (out / "stats" / "summary.csv").read_text().splitlines()[0]


@pytest.mark.skipif(shutil.which("java") is None, reason="QuPath's reader needs Java 17")
def test_qupath_shows_uncertain_nuclei_unclassified(tmp_path):
    out = _segment_three_classes(tmp_path, min_probability=0.4)
    t = pd.read_parquet(out / "s.nuclei.parquet")
    proc = subprocess.run([str(QUPATH_CHECK), str(out / "s.geojson.gz")], capture_output=True, text=True,
                          timeout=300)
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["ok"] and seen["invalid_rois"] == 0 and seen["objects"] == len(t)
    assert seen["by_class"].get("(none)", 0) == int(t.class_uncertain.sum())
    assert {"Class probability: tumour", "Class probability: immune", "Class probability: stroma",
            "Class probability"} <= set(seen["measurement_names"])


def test_calibrate_command_fits_the_temperature_on_validation_classes(tmp_path, data_dir):
    from wsiseg.card import default_model_path, load_card
    from wsiseg.cli import main

    path = default_model_path()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["train_1_001"], "val": ["train_1_000", "train_2_000"]}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"class_names: [other, inflammatory, epithelial, spindle]\ndatasets:\n"
                   f"  - {{path: {data_dir / 'consep-train'}, split: {split}}}\n")
    rc = main(["calibrate", "--model", str(path), "--config", str(cfg), "--out", str(tmp_path / "cal.safetensors"),
               "--min-probability", "0.5", "--device", "cpu"])
    if rc != 0:
        pytest.fail("calibrate failed")
    before = load_card(path).config.class_temperature  # the bundled model is calibrated already
    card = load_card(tmp_path / "cal.safetensors")
    cal = card.metrics["calibration"]
    assert cal["temperature_before"] == pytest.approx(before, rel=1e-3)
    assert card.class_min_probability == 0.5 and card.config.class_temperature == pytest.approx(
        before * cal["temperature"], rel=1e-3)  # the fit starts from the model's own temperature
    assert cal["nuclei"] > 0 and cal["ece_after"] <= cal["ece_before"] + 1e-9
    assert main(["calibrate", "--model", str(path), "--config", str(cfg), "--out", str(path)]) == 2
    assert load_card(path).config.class_temperature == before  # the model itself is never overwritten
