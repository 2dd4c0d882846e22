"""The model card: what a user needs to know to run a model and read its output (no torch needed)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_COLORS = [(220, 50, 50), (50, 160, 50), (40, 90, 220), (230, 160, 20), (150, 60, 200), (20, 180, 190)]
# colours of the classes people name, chosen to stand out against haematoxylin purple and eosin pink (as
# QuPath outlines and in the report's plots on white): no reds, pinks or purples
NAMED_COLORS = {
    "epithelial": (0, 200, 83),  # green
    "inflammatory": (255, 214, 0),  # yellow
    "spindle": (0, 176, 255),  # sky blue
    "other": (40, 40, 40),  # near black
}


# what the classes people name mean (CoNSeP's four, as HoVer-Net groups its seven types)
NAMED_MEANINGS = {
    "epithelial": "epithelial nuclei, normal and dysplastic or malignant (CoNSeP types 3 and 4)",
    "inflammatory": "inflammatory cells: lymphocytes, plasma cells, neutrophils, eosinophils (CoNSeP type 2)",
    "spindle": "spindle-shaped nuclei: fibroblasts, smooth muscle, endothelium (CoNSeP types 5, 6 and 7)",
    "other": "nuclei of none of the other classes, e.g. necrotic, mitotic or unidentifiable cells (CoNSeP type 1)",
}


KNOWN_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "efficientnet_lite0",
                   "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class NucleusClass:
    name: str
    color: tuple[int, int, int]
    description: str = ""  # what the class means and which data taught it


@dataclass
class ModelConfig:
    """Architecture of a nucleus Mask R-CNN.

    ``backbone``: resnet50, resnet34, resnet18 (FPN), mobilenet_v3_large
    (FPN), or efficientnet_lite0/1/2 (timm, FPN; frozen BatchNorm, for
    ImageNet weights: ``pretrained: imagenet``); ``width`` scales a ResNet's
    channels down for tiny test models. ``norm``: batchnorm or groupnorm, of
    a ResNet and of the mask head. Anchors are sized for nuclei at the
    model's mpp.
    """

    backbone: str = "resnet50"
    norm: str = "groupnorm"
    num_classes: int = 1  # nucleus classes, background excluded
    tile_size: int = 512
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    anchor_scales: tuple[float, ...] = (1.0,)  # anchors per FPN level: each size times each scale
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    mask_roi_size: int = 14
    roi_sampling_ratio: int = 2  # bilinear samples per RoIAlign bin side (box and mask pooling)
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    width: int = 64  # ResNet stem width; 64 is the standard network
    detections_per_tile: int = 1000
    rpn_pre_nms_top_n_test: int = 3000
    rpn_post_nms_top_n_test: int = 2000
    rpn_pre_nms_top_n_train: int = 3000
    rpn_post_nms_top_n_train: int = 2000
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25  # training only: share of sampled proposals that match a nucleus
    rpn_batch_size_per_image: int = 256  # training only: anchors sampled per crop for the RPN loss (half positive)
    score_thresh: float = 0.05
    nms_thresh: float = 0.4
    pretrained: str = ""  # "imagenet": training starts the backbone from ImageNet weights (see wsiseg.pretrained)
    class_temperature: float = 1.0  # class logits are divided by it before the softmax (calibration; 1: none)


    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field (``config.<name>``) of a wrong type or outside its range."""
        import math

        def whole(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"config.{name} must be a whole number in [{lo}, {hi}], got {v!r}")

        def number(name, lo, hi, low_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (
                    (lo < v) if low_open else (lo <= v)) or not v <= hi:
                raise ValueError(f"config.{name} must be a number in {'(' if low_open else '['}{lo}, {hi}], "
                                 f"got {v!r}")

        def numbers(name, lo, hi, low_open=False):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not v or not all(
                    not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)
                    and ((lo < x) if low_open else (lo <= x)) and x <= hi for x in v):
                raise ValueError(f"config.{name} must be a non-empty list of numbers in ({lo}, {hi}], got {v!r}")

        if self.backbone not in KNOWN_BACKBONES:
            raise ValueError(f"config.backbone must be one of {', '.join(KNOWN_BACKBONES)}, got {self.backbone!r}")
        if self.norm not in ("batchnorm", "groupnorm"):
            raise ValueError(f"config.norm must be batchnorm or groupnorm, got {self.norm!r}")
        if self.pretrained not in ("", "imagenet"):
            raise ValueError(f"config.pretrained must be '' or 'imagenet', got {self.pretrained!r}")
        whole("num_classes", 1, 1000)
        whole("tile_size", 32, 8192)
        numbers("anchor_sizes", 0, 4096, low_open=True)
        numbers("anchor_scales", 0, 16, low_open=True)
        numbers("aspect_ratios", 0, 16, low_open=True)
        whole("mask_roi_size", 4, 64)
        whole("roi_sampling_ratio", 0, 8)
        for name in ("fpn_channels", "box_head_dim", "mask_head_channels"):
            whole(name, 1, 8192)
        whole("width", 1, 1024)
        whole("detections_per_tile", 1, 100_000)
        for name in ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "rpn_pre_nms_top_n_train",
                     "rpn_post_nms_top_n_train", "box_batch_size_per_image", "rpn_batch_size_per_image"):
            whole(name, 1, 1_000_000)
        number("box_positive_fraction", 0, 1, low_open=True)
        number("score_thresh", 0, 1)
        number("nms_thresh", 0, 1, low_open=True)
        number("class_temperature", 0.01, 100)


@dataclass
class ModelCard:
    """What a user needs to know to run a model and read its output."""

    name: str
    classes: list[NucleusClass]
    mpp: float
    tile_size: int
    overlap: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    config: ModelConfig = field(default_factory=ModelConfig)
    score_threshold: float = 0.5
    min_area_um2: float = 5.0  # smaller objects are specks, not nuclei, and are dropped
    # a nucleus whose most likely class has a (calibrated) probability below this is "class uncertain": QuPath
    # gets it without a classification, the table flags it; 0: every nucleus keeps its most likely class
    class_min_probability: float = 0.0
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = "1"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        d = dict(d)
        d["classes"] = [NucleusClass(c["name"], tuple(c["color"]), c.get("description", "")) for c in d["classes"]]
        cfg = dict(d.get("config", {}))
        unknown = set(cfg) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)} (a newer wsiseg's model?)")
        for k in ("anchor_sizes", "anchor_scales", "aspect_ratios"):
            if isinstance(cfg.get(k), list):
                cfg[k] = tuple(cfg[k])
        d["config"] = ModelConfig(**cfg)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        card = cls(**d)
        card.validate()
        return card

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its plausible range."""
        import math

        def number(name, v, lo, hi):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")

        number("mpp", self.mpp, 0.01, 20)
        number("score_threshold", self.score_threshold, 0, 1)
        number("min_area_um2", self.min_area_um2, 0, 1000)
        number("class_min_probability", self.class_min_probability, 0, 1)
        if not isinstance(self.tile_size, int) or not 32 <= self.tile_size <= 8192:
            raise ValueError(f"tile_size must be a whole number of pixels in [32, 8192], got {self.tile_size!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be a whole number in [0, tile_size), got {self.overlap!r}")
        if not self.classes or len({c.name for c in self.classes}) != len(self.classes):
            raise ValueError("classes must name at least one class, each once")
        for c in self.classes:
            if not isinstance(c.name, str) or not c.name or len(c.color) != 3 or not all(
                    isinstance(v, int) and 0 <= v <= 255 for v in c.color):
                raise ValueError(f"class {c.name!r}: needs a name and an RGB colour of three integers 0-255")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have three values (R, G, B)")
        for i in range(3):
            number("mean", self.mean[i], -10, 10)
            number("std", self.std[i], 1e-6, 10)
        self.config.validate()
        if self.config.num_classes != len(self.classes):
            raise ValueError(f"config.num_classes ({self.config.num_classes}) differs from the {len(self.classes)} "
                             "classes")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def default_classes(names: list[str], taught_by: dict[str, str] | None = None) -> list[NucleusClass]:
    """Classes with the colours and meanings of NAMED_COLORS and NAMED_MEANINGS for the names they know, distinct
    colours for the rest; ``taught_by`` (class name -> the data that taught it) completes each description."""
    out = []
    for i, n in enumerate(names):
        meaning = NAMED_MEANINGS.get(n.lower(), "")
        taught = (taught_by or {}).get(n)
        desc = "; ".join(x for x in (meaning, f"learnt from {taught}" if taught else "") if x)
        out.append(NucleusClass(n, NAMED_COLORS.get(n.lower(), DEFAULT_COLORS[i % len(DEFAULT_COLORS)]), desc))
    return out


class ModelLoadError(Exception):
    """A model file cannot be loaded; the message names the file."""


def load_card(path: str | os.PathLike) -> ModelCard:
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a safetensors model file ({exc})") from exc
    if "wsiseg_card" not in meta:
        raise ModelLoadError(f"{path}: safetensors file has no wsiseg model card in its metadata")
    try:
        return ModelCard.from_dict(json.loads(meta["wsiseg_card"]))
    except Exception as exc:
        raise ModelLoadError(f"{path}: invalid model card: {exc}") from exc


def default_model_path() -> str | None:
    """The model bundled with this installation, if there is one."""
    from importlib.resources import files

    p = files("wsiseg") / "models" / "default.safetensors"
    return str(p) if p.is_file() else None
