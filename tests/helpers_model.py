from __future__ import annotations

import torch

from wsiseg.card import ModelCard, ModelConfig, default_classes
from wsiseg.model import build_model


def tiny_config(tile_size: int = 128, num_classes: int = 1) -> ModelConfig:
    return ModelConfig(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64, mask_head_channels=16,
                       tile_size=tile_size, num_classes=num_classes, detections_per_tile=60,
                       rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)


def tiny_model(tmp_path, classes=("nucleus",), mpp=0.5, tile_size=128, overlap=48, seed=0):
    """A randomly initialised tiny Mask R-CNN saved with its card; returns the file path."""
    from wsiseg.model import save_model

    torch.manual_seed(seed)
    cfg = tiny_config(tile_size, len(classes))
    model = build_model(cfg)
    card = ModelCard(name="tiny-random", classes=default_classes(list(classes)), mpp=mpp, tile_size=tile_size,
                     overlap=overlap, config=cfg, score_threshold=0.0,
                     description="random weights, for tests of the machinery only")
    return save_model(model, card, tmp_path / "tiny.safetensors"), model, card
