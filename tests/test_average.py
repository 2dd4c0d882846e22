"""``wsiseg average``: the weights of several runs of one network averaged into one model (a model soup)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers_model import tiny_model


def _run(tmp_path, name, seed, classes=("a", "b"), **card_changes):
    """A tiny model saved as if trained: its card names held-out images, CPU hours and validation metrics."""
    from wsiseg.model import save_model

    _, model, card = tiny_model(tmp_path, classes=classes, seed=seed)
    card = replace(card, **card_changes)
    card.metrics = {"validation": {"pq": 0.5 + seed / 10}, "val_images": ["x", "y", f"only{seed}"]}
    card.training = {"steps_done": 100 * (seed + 1), "cpu_hours": 1.5}
    return save_model(model, card, tmp_path / f"{name}.safetensors"), model


def test_average_is_the_mean_of_the_weights_with_a_card_that_says_so(tmp_path):
    from safetensors.torch import load_file

    from wsiseg.card import load_card
    from wsiseg.cli import main
    from wsiseg.model import load_model

    a, ma = _run(tmp_path, "a", 0)
    b, mb = _run(tmp_path, "b", 1)
    out = tmp_path / "soup.safetensors"
    assert main(["average", str(a), str(b), "--out", str(out)]) == 0
    wa, wb, w = load_file(str(a)), load_file(str(b)), load_file(str(out))
    k = "roi_heads.box_head.fc6.weight"
    assert not torch.equal(wa[k], wb[k])
    for key in wa:
        if wa[key].is_floating_point():
            torch.testing.assert_close(w[key].float(), (wa[key].float() + wb[key].float()) / 2, atol=1e-3, rtol=1e-3)
    net, card = load_model(out)  # a model like any other
    assert net is not None and card.class_names == ["a", "b"]
    # the card: which models, their CPU hours summed, held out only what both held out, no stale metrics
    assert [m["file"] for m in card.training["averaged_from"]] == ["a.safetensors", "b.safetensors"]
    assert card.training["cpu_hours"] == 3.0 and "validation" not in card.metrics
    assert card.metrics["val_images"] == ["x", "y"]
    assert load_card(out).training["averaged_from"][1]["steps_done"] == 200


def test_average_refuses_different_networks_classes_and_its_own_inputs(tmp_path, capsys):
    from wsiseg.cli import main

    a, _ = _run(tmp_path, "a", 0)
    b, _ = _run(tmp_path, "b", 1, mpp=0.25)
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "o.safetensors")]) != 0
    assert "b.safetensors" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
    c, _ = _run(tmp_path, "c", 2, classes=("a", "c"))
    assert main(["average", str(a), str(c), "--out", str(tmp_path / "o.safetensors")]) != 0
    assert "classes differs" in capsys.readouterr().err
    d, _ = _run(tmp_path, "d", 3, config=replace(tiny_model(tmp_path)[2].config, nms_thresh=0.6, num_classes=2))
    assert main(["average", str(a), str(d), "--out", str(tmp_path / "o.safetensors")]) != 0
    assert "network differs" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
    assert main(["average", str(a), str(a), "--out", str(a)]) != 0
    assert "new file" in capsys.readouterr().err
    assert main(["average", str(a), "--out", str(tmp_path / "o.safetensors")]) != 0
    assert "at least two" in capsys.readouterr().err
