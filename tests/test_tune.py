"""``wsiseg tune``: a model's score threshold and smallest nucleus chosen on held-out images, and scored there
exactly as ``wsiseg evaluate`` scores it."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _config(tmp_path, data_dir, train: list[str], val: list[str]):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": train, "val": val}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"class_names: [epithelial, inflammatory, spindle, other]\ndatasets:\n"
                   f"  - {{name: consep, path: {data_dir / 'consep-train'}, split: {split}}}\n")
    return cfg


def test_tune_chooses_the_settings_that_score_best_on_held_out_images(tmp_path, data_dir):
    from safetensors.torch import load_file

    from wsiseg.card import default_model_path, load_card
    from wsiseg.cli import main
    from wsiseg.evaluation import evaluate

    path = default_model_path()
    held_out = load_card(path).metrics["val_images"]
    val = [n for n in held_out if n.startswith("train_")][:3]  # CoNSeP tiles the default never trained on
    cfg = _config(tmp_path, data_dir, ["train_1_000"], val)
    out = tmp_path / "tuned.safetensors"
    # a smallest nucleus of 40 µm² drops most CoNSeP nuclei: 2 µm² must win
    rc = main(["tune", "--model", str(path), "--config", str(cfg), "--out", str(out), "--score-thresholds", "0.85",
               "0.95", "--min-areas", "40", "2", "--device", "cpu"])
    if rc != 0:
        pytest.fail("tune failed")
    card = load_card(out)
    m = card.metrics["validation"]
    assert card.min_area_um2 == m["min_area_um2"] == 2 and card.score_threshold == m["score_threshold"]
    assert m["pq"] == max(m["pq_by_min_area_um2"].values()) == max(m["pq_by_score_threshold"].values())
    assert m["pq_by_min_area_um2"]["40"] < m["pq"] and m["images"] == len(val)
    assert card.metrics["val_images"] == held_out  # still what was held out from training, not what tune read
    assert card.metrics["validation_before_tuning"] == load_card(path).metrics["validation"]
    # the weights are the model's own, and what tune recorded is what evaluate measures
    a, b = load_file(str(path)), load_file(str(out))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ev = evaluate(str(out), str(data_dir / "consep-train"), names=val, device="cpu")
    assert ev["pq"] == pytest.approx(m["pq"], abs=1e-9) and ev["f1"] == pytest.approx(m["f1"], abs=1e-9)


def test_tune_refuses_images_the_model_may_have_trained_on_and_its_own_file(tmp_path, data_dir, capsys):
    from wsiseg.card import default_model_path, load_card
    from wsiseg.cli import main

    path = default_model_path()
    trained = "train_1_000"
    assert trained not in load_card(path).metrics["val_images"]
    cfg = _config(tmp_path, data_dir, ["train_1_001"], [trained])
    out = tmp_path / "tuned.safetensors"
    assert main(["tune", "--model", str(path), "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 2
    assert "train_1_000" in capsys.readouterr().err and not out.exists()
    assert main(["tune", "--model", str(path), "--config", str(cfg), "--out", str(path)]) == 2
