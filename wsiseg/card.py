"""The model card: what a user needs to know to run a model and read its output (no torch needed)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_COLORS = [(220, 50, 50), (50, 160, 50), (40, 90, 220), (230, 160, 20), (150, 60, 200), (20, 180, 190)]


@dataclass
class NucleusClass:
    name: str
    color: tuple[int, int, int]


@dataclass
class ModelConfig:
    """Architecture of a nucleus Mask R-CNN.

    ``backbone``: resnet50, resnet34, resnet18 (FPN) or mobilenet_v3_large
    (FPN); ``width`` scales a ResNet's channels down for tiny test models.
    ``norm``: batchnorm or groupnorm (models train from scratch, so no
    frozen BatchNorm). Anchors are sized for nuclei at the model's mpp.
    """

    backbone: str = "resnet50"
    norm: str = "groupnorm"
    num_classes: int = 1  # nucleus classes, background excluded
    tile_size: int = 512
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    mask_roi_size: int = 14
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
    score_thresh: float = 0.05
    nms_thresh: float = 0.4


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
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = "1"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        d = dict(d)
        d["classes"] = [NucleusClass(c["name"], tuple(c["color"])) for c in d["classes"]]
        cfg = dict(d.get("config", {}))
        for k in ("anchor_sizes", "aspect_ratios"):
            if k in cfg:
                cfg[k] = tuple(cfg[k])
        d["config"] = ModelConfig(**cfg)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def default_classes(names: list[str]) -> list[NucleusClass]:
    return [NucleusClass(n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, n in enumerate(names)]


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
