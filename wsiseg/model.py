"""Mask R-CNN for nuclei: built from a plain config, saved as safetensors with its model card."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .card import ModelCard, ModelConfig, ModelLoadError, load_card


def _norm_layer(kind: str):
    if kind == "batchnorm":
        return nn.BatchNorm2d
    if kind == "groupnorm":
        return lambda ch: nn.GroupNorm(_groups(ch), ch)
    raise ValueError(f"unknown norm {kind!r} (batchnorm or groupnorm)")


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """An FPN backbone with randomly initialised weights (nothing is downloaded)."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    norm = _norm_layer(cfg.norm)
    if cfg.backbone in ("resnet18", "resnet34", "resnet50"):
        block, layers = {
            "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
            "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
            "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
        }[cfg.backbone]
        body = _narrow_resnet(block, layers, cfg.width, norm) if cfg.width != 64 else resnet.ResNet(block, layers, norm_layer=norm)
        widths = [cfg.width * m * block.expansion for m in (1, 2, 4, 8)]
        return BackboneWithFPN(
            body,
            return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
            in_channels_list=widths,
            out_channels=cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=None,
        )
    if cfg.backbone == "mobilenet_v3_large":
        from torchvision.models import mobilenet_v3_large

        features = mobilenet_v3_large(weights=None, norm_layer=partial(nn.BatchNorm2d, eps=1e-3)).features
        stages = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
        taken = stages[-2:]  # the last two stages, as torchvision's mobilenet FPN takes them
        return BackboneWithFPN(
            features,
            return_layers={str(i): str(k) for k, i in enumerate(taken)},
            in_channels_list=[features[i].out_channels for i in taken],
            out_channels=cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=None,
        )
    if cfg.backbone in TIMM_BACKBONES:
        return _timm_fpn(cfg)
    raise ValueError(f"unknown backbone {cfg.backbone!r} (resnet50, resnet34, resnet18, mobilenet_v3_large, "
                     f"{', '.join(TIMM_BACKBONES)})")


# ImageNet backbones built by timm (the architecture only: the trained model file carries every weight);
# wsiseg.pretrained loads their ImageNet weights at training time
TIMM_BACKBONES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}


class TimmFPN(nn.Module):
    """A timm feature extractor (strides 4, 8, 16, 32) under torchvision's FPN with a max-pooled fifth level,
    as ``BackboneWithFPN`` builds for a ResNet: ``out_channels`` maps named "0"-"3" and "pool"."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x):
        from collections import OrderedDict

        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _timm_fpn(cfg: ModelConfig) -> nn.Module:
    """An ImageNet architecture with frozen BatchNorm: its statistics and affine parameters stay as ImageNet
    training left them (torchvision's and Detectron2's practice for pretrained detection backbones). Batches
    of four 256 px crops are too small to estimate BatchNorm statistics, and frozen statistics make each
    tile's features independent of what else the tile holds (GroupNorm normalises over the whole tile)."""
    try:
        import timm
        from timm.layers import freeze_batch_norm_2d
    except ImportError as exc:  # timm is a dependency of wsiseg; this is a broken installation
        raise ImportError(f"backbone {cfg.backbone} needs timm ({exc})") from None
    body = timm.create_model(TIMM_BACKBONES[cfg.backbone], pretrained=False, features_only=True,
                             out_indices=(1, 2, 3, 4))
    return TimmFPN(freeze_batch_norm_2d(body), cfg.fpn_channels)


def _narrow_resnet(block, layers, width, norm) -> nn.Module:
    from torchvision.models import resnet

    net = resnet.ResNet(block, layers, norm_layer=norm)
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    return net


def nucleus_detections(roi_heads, class_logits, box_regression, proposals, image_shapes):
    """One detection per proposal: scored by how likely it is a nucleus of any class (1 - P(background)),
    labelled with its most likely class, boxed by that class's regression; then class-agnostic NMS.
    Returns boxes, scores, labels and each detection's class probabilities given that it is a nucleus,
    P(class | nucleus), calibrated by the temperature ``roi_heads.class_temperature`` (1: as trained).

    Nuclei do not overlap, so a proposal is never two nuclei; splitting its probability between classes
    (torchvision's per-class scoring) would drop nuclei whose class is uncertain. With one class this is
    torchvision's own post-processing.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.ops import boxes as box_ops

    per_image = [b.shape[0] for b in proposals]
    pred_boxes = roi_heads.box_coder.decode(box_regression, proposals)
    logits = class_logits.float()
    probs = F.softmax(logits, -1)
    scores = 1.0 - probs[:, 0]
    labels = 1 + probs[:, 1:].argmax(dim=1)
    class_probs = F.softmax(logits[:, 1:] / float(getattr(roi_heads, "class_temperature", 1.0)), -1)
    boxes = pred_boxes[torch.arange(len(labels), device=labels.device), labels]
    out_boxes, out_scores, out_labels, out_probs = [], [], [], []
    for b, s, lab, cp, shape in zip(boxes.split(per_image), scores.split(per_image), labels.split(per_image),
                                    class_probs.split(per_image), image_shapes):
        b = box_ops.clip_boxes_to_image(b, shape)
        keep = torch.where(s > roi_heads.score_thresh)[0]
        b, s, lab, cp = b[keep], s[keep], lab[keep], cp[keep]
        keep = box_ops.remove_small_boxes(b, min_size=1e-2)
        b, s, lab, cp = b[keep], s[keep], lab[keep], cp[keep]
        keep = box_ops.nms(b, s, roi_heads.nms_thresh)[: roi_heads.detections_per_img]
        out_boxes.append(b[keep])
        out_scores.append(s[keep])
        out_labels.append(lab[keep])
        out_probs.append(cp[keep])
    return out_boxes, out_scores, out_labels, out_probs


class NucleusRoIHeads(RoIHeads):
    """torchvision's ROI heads with :func:`nucleus_detections` as their post-processing; at inference each
    result also holds ``class_probs`` (n, classes): P(class | nucleus), calibrated."""

    class_temperature = 1.0

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes, scores, labels, probs = nucleus_detections(self, class_logits, box_regression, proposals,
                                                          image_shapes)
        _STASH.class_probs = probs  # torchvision's forward keeps three outputs; forward below adds the fourth
        return boxes, scores, labels

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if not self.training:
            probs = getattr(_STASH, "class_probs", None)
            _STASH.class_probs = None
            for r, p in zip(result, probs or []):
                r["class_probs"] = p
        return result, losses


_STASH = __import__("threading").local()  # per thread: inference runs batches in several threads at once


class TileTransform(GeneralizedRCNNTransform):
    """torchvision's input transform (normalise, batch) without its resizing: tiles and training crops of any
    size arrive at the model's resolution."""

    def resize(self, image, target=None):
        return image, target


def build_model(cfg: ModelConfig, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> nn.Module:
    """torchvision Mask R-CNN for ``cfg.num_classes`` nucleus classes plus background."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    backbone = build_backbone(cfg)
    n_maps = 3 if cfg.backbone == "mobilenet_v3_large" else 5
    sizes = tuple(cfg.anchor_sizes)[:n_maps]
    if len(sizes) < n_maps:
        raise ValueError(f"{cfg.backbone} needs {n_maps} anchor sizes, got {len(sizes)}")
    scales = tuple(cfg.anchor_scales)
    anchors = AnchorGenerator(sizes=tuple(tuple(s * k for k in scales) for s in sizes),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * n_maps)
    names = [str(i) for i in range(n_maps - 1)] if n_maps == 5 else ["0", "1"]
    model = MaskRCNN(
        backbone,
        min_size=cfg.tile_size,
        max_size=cfg.tile_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes + 1),
        mask_head=MaskRCNNHeads(cfg.fpn_channels, [cfg.mask_head_channels] * 4, 1,
                                norm_layer=_norm_layer(cfg.norm)),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, cfg.num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=cfg.mask_roi_size,
                                         sampling_ratio=cfg.roi_sampling_ratio),
        box_detections_per_img=cfg.detections_per_tile,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
    )
    model.transform.__class__ = TileTransform
    model.roi_heads.__class__ = NucleusRoIHeads
    model.roi_heads.class_temperature = float(cfg.class_temperature)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm (frozen, or in eval mode) that directly follows a convolution into that
    convolution's weights and bias, in place; the BatchNorm's activation, if it carries one, stays.

    The same function of the input in exact arithmetic, for inference only: under bf16 autocast on the CPU
    a separate BatchNorm costs a conversion to fp32 and back per layer (about 40% of EfficientNet-Lite0's
    forward pass). Written for the backbones ``build_backbone`` makes, whose convolution and BatchNorm are
    neighbouring children in the order they run."""
    import torch

    if model.training:
        raise ValueError("fold_batchnorm is for inference: put the model in eval mode first")
    with torch.no_grad():
        _fold_children(model)
    return model


def _is_batchnorm(m: nn.Module) -> bool:
    return "BatchNorm" in type(m).__name__ and getattr(m, "running_var", None) is not None


def _fold_children(module: nn.Module) -> None:
    names = list(module._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = module._modules[a], module._modules[b]
        if not (isinstance(conv, nn.Conv2d) and _is_batchnorm(bn)):
            continue
        scale = (bn.running_var + bn.eps).rsqrt()
        if getattr(bn, "weight", None) is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if getattr(bn, "bias", None) is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                if m is not None and not isinstance(m, nn.Identity)]
        module._modules[b] = nn.Sequential(*rest) if rest else nn.Identity()
    for child in module.children():
        _fold_children(child)


def write_safetensors(state: dict, path: str | os.PathLike, metadata: dict[str, str], half: bool = False) -> Path:
    """Write tensors (on the CPU; floating point as fp16 with ``half``) as safetensors with string ``metadata``,
    to a temporary name renamed when complete; readable by all, as a model is meant to be shared."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors writes 0600
    return path


def save_model(model: nn.Module, card: ModelCard, path: str | os.PathLike, half: bool = False) -> Path:
    """Write weights as safetensors with the card in its metadata, plus ``<name>.json`` beside it."""
    from .atomic import write_text_atomic

    path = write_safetensors(model.state_dict(), path, {"wsiseg_card": card.to_json()}, half=half)
    write_text_atomic(path.with_suffix(".json"), card.to_json())
    return path


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelCard]:
    """Build the model its card describes and load its weights; nothing is unpickled. Every tensor must be
    there with the shape the card's network needs, a floating-point tensor stored as floating point, and
    every weight finite: otherwise ``ModelLoadError`` names the file and the tensor."""
    import torch
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such model file")
    card = load_card(path)
    model = build_model(card.config, card.mean, card.std)
    try:
        state = load_file(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the weights ({exc})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the card's architecture "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in own.items():
        t = state[k]
        if tuple(t.shape) != tuple(v.shape):
            raise ModelLoadError(f"{path}: tensor {k} is {tuple(t.shape)}, the card's network needs {tuple(v.shape)}")
        if v.is_floating_point() and not t.is_floating_point():
            raise ModelLoadError(f"{path}: tensor {k} is stored as {t.dtype}; the network needs floating point")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor {k} holds NaN or infinite weights")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()})
    model.eval()
    return model, card
