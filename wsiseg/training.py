"""Training nucleus Mask R-CNNs from scratch, with partial labels.

A nucleus may lack a class (``class_known`` false: it adds nothing to the
classification loss and trains boxes and masks as "some nucleus") or a mask
(``mask_known`` false: it adds nothing to the mask loss). Both are handled
inside the ROI heads, per sampled proposal; no image is dropped.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from .atomic import file_sha256, write_text_atomic
from .augment import random_crop
from .card import ModelCard, ModelConfig, default_classes
from .datasets import Sample, load_dataset
from .evaluation import evaluate_predictor
from .model import TIMM_BACKBONES, NucleusRoIHeads, build_model, load_model, save_model, write_safetensors

if TYPE_CHECKING:
    from .inference import DeviceConfig

# ------------------------------------------------------------------ partial-label ROI heads


def partial_fastrcnn_loss(class_logits, box_regression, labels, regression_targets, class_known):
    """Classification and box losses over sampled proposals.

    The cross-entropy of a proposal splits into "is it a nucleus" (-log P(foreground), or -log P(background))
    and "which class, given a nucleus" (-log P(class | foreground)); their sum is the usual cross-entropy.
    ``class_known`` (per proposal) is false for proposals matched to a nucleus of unknown class: they train
    only the first part, so they add nothing to the class loss (the gradient of -log P(foreground) leaves
    the ratios between the classes unchanged), and their box regression is trained for every foreground
    class ("a nucleus").
    """
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    class_known = torch.cat(class_known).float()
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    log_fg = torch.logsumexp(class_logits[:, 1:], dim=1) - torch.logsumexp(class_logits, dim=1)
    unknown_fg = (class_known == 0) & (labels > 0)
    per = torch.where(unknown_fg, -log_fg, ce)
    cls_loss = per.sum() / max(1, labels.numel())

    n, _ = class_logits.shape
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    pos = torch.where(labels > 0)[0]
    known = class_known[pos] > 0
    reg_known = box_regression[pos[known], labels[pos[known]]]
    loss = F.smooth_l1_loss(reg_known, regression_targets[pos[known]], beta=1 / 9, reduction="sum")
    unk = pos[~known]
    if len(unk):
        fg = box_regression[unk, 1:]  # every foreground class
        tgt = regression_targets[unk][:, None, :].expand_as(fg)
        loss = loss + F.smooth_l1_loss(fg, tgt, beta=1 / 9, reduction="none").sum(dim=2).mean(dim=1).sum()
    return cls_loss, loss / labels.numel()


def partial_maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs, gt_class_known,
                          gt_mask_known):
    """Mask loss over positive proposals whose nucleus has a mask; unknown-class ones train every class's mask."""
    m = mask_logits.shape[-1]
    labels = [gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)]
    cls_known = torch.cat([k[idx] for k, idx in zip(gt_class_known, mask_matched_idxs)])
    mask_known = torch.cat([k[idx] for k, idx in zip(gt_mask_known, mask_matched_idxs)])
    targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, mask_matched_idxs)]
    labels = torch.cat(labels)
    targets = torch.cat(targets, dim=0)
    if targets.numel() == 0 or not mask_known.any():
        return mask_logits.sum() * 0
    keep = torch.where(mask_known)[0]
    lg, tg, lb, ck = mask_logits[keep], targets[keep], labels[keep], cls_known[keep]
    idx = torch.arange(len(keep), device=lg.device)
    own = F.binary_cross_entropy_with_logits(lg[idx, lb], tg, reduction="none").mean(dim=(1, 2))
    every = F.binary_cross_entropy_with_logits(lg[:, 1:], tg[:, None].expand_as(lg[:, 1:]),
                                               reduction="none").mean(dim=(1, 2, 3))
    return torch.where(ck, own, every).mean()


class PartialLabelRoIHeads(NucleusRoIHeads):
    """torchvision ROI heads whose training losses honour ``class_known`` and ``mask_known`` in the targets."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_known = []
        for t, midx, lab in zip(targets, matched_idxs, labels):
            if t["class_known"].numel() == 0:  # a crop without nuclei: every proposal is background
                class_known.append(torch.ones_like(lab, dtype=torch.float32))
                continue
            ck = t["class_known"][midx.clamp(min=0)]
            class_known.append(torch.where(lab > 0, ck, torch.ones_like(ck)).float())
        feats = self.box_roi_pool(features, proposals, image_shapes)
        feats = self.box_head(feats)
        class_logits, box_regression = self.box_predictor(feats)
        loss_cls, loss_box = partial_fastrcnn_loss(class_logits, box_regression, labels, regression_targets,
                                                   [c.bool().float() for c in class_known])
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        pos_props, pos_idx = [], []
        for p, lab, midx in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            pos_props.append(p[pos])
            pos_idx.append(midx[pos])
        mf = self.mask_head(self.mask_roi_pool(features, pos_props, image_shapes))
        mask_logits = self.mask_predictor(mf)
        losses["loss_mask"] = partial_maskrcnn_loss(
            mask_logits, pos_props, [t["masks"] for t in targets], [t["labels"] for t in targets], pos_idx,
            [t["class_known"] for t in targets], [t["mask_known"] for t in targets])
        return [], losses


def enable_partial_labels(model: torch.nn.Module) -> torch.nn.Module:
    """Make a torchvision Mask R-CNN train with partial labels (same parameters, new loss)."""
    model.roi_heads.__class__ = PartialLabelRoIHeads
    return model


# ------------------------------------------------------------------------ hidden labels (the experiment)


def hide_labels(samples: list[Sample], class_fraction: float, mask_fraction: float, seed: int = 0) -> None:
    """Hide the class of ``class_fraction`` of nuclei and the mask of another ``mask_fraction``, at random."""
    rng = np.random.default_rng(seed)
    for s in samples:
        ids = np.unique(s.instances)[1:]
        r = rng.random(len(ids))
        for i, v in zip(ids, r):
            if v < class_fraction:
                s.classes.pop(int(i), None)
            elif v < class_fraction + mask_fraction:
                s.no_mask.add(int(i))


# ------------------------------------------------------------------------ config and loop


@dataclass
class TrainConfig:
    name: str = "wsiseg-nuclei"
    description: str = ""  # goes into the model card: what the model is for, and why this architecture
    data: str = "../shared/data/monuseg-train"  # label folder, COCO .json, or QuPath .geojson (with slide)
    images: str | None = None  # COCO: the image folder (default: beside the .json)
    slide: str | None = None  # GeoJSON: the slide the nuclei were drawn on
    data_mpp: float | None = None  # COCO: the images' mpp; GeoJSON: overrides the slide's
    extra_data: list[str] = field(default_factory=list)  # more label folders / COCO .json, for training only
    extra_share: float = 0.5  # share of training crops drawn from extra_data
    datasets: list[dict[str, Any]] = field(default_factory=list)  # several datasets: {path, share, split}; see Pool
    val_names: list[str] = field(default_factory=list)  # whole images for validation
    val_fraction: float = 0.2
    class_names: list[str] | None = None
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields
    mpp: float = 0.25
    tile_size: int = 256  # the tiles the model will run on (its card's)
    overlap: int = 64
    crop_size: int | None = None  # training crops (default: tile_size); the network is fully convolutional
    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    restarts: list[int] = field(default_factory=list)  # steps where the cosine schedule restarts at lr (SGDR)
    restart_peaks: list[float] = field(default_factory=list)  # peak of each restarted cycle, as a fraction of lr (default 1)
    swa_start: int | None = None  # from this step, stochastic weight averaging: the learning rate is held at swa_lr
    swa_every: int = 50  # ... the weights every swa_every steps join an equal-weight average, which is what
    swa_lr: float | None = None  # ... validation scores and the run exports (swa_lr default: the schedule's at swa_start)
    init: str | None = None  # start from a saved model's weights ("default": the bundled model), i.e. fine-tune
    clip_grad: float = 5.0
    val_every: int = 250
    seed: int = 0
    bf16: bool = True  # mixed precision (bf16 autocast) on the CPU and on CUDA
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N: see wsiseg.inference.select_device
    hed_jitter: bool = True
    hed_sigma: float = 0.05  # HED stain jitter: scale of each stain by 1 ± sigma
    hed_bias: float = 0.02  # ... and shift by ± bias (optical density)
    colour_jitter: float = 0.0  # brightness, contrast and saturation jitter strength
    low_res: float = 0.0  # share of crops made to look like a 20x scan resampled to the model's mpp
    blur: float = 0.0  # share of crops blurred as out of focus
    backbone_lr: float = 1.0  # the backbone's learning rate as a fraction of lr (a pretrained one: below 1)
    scale_jitter: float = 0.1
    glass: float = 0.0  # share of crops that reach past the image's edge onto blank glass (tissue edges)
    score_thresholds: list[float] = field(default_factory=list)  # validation tries each; the best (mean PQ) ships
    min_areas_um2: list[float] = field(default_factory=list)  # smallest nuclei kept: tried with each score threshold
    hide_class_fraction: float = 0.0
    hide_mask_fraction: float = 0.0
    partial_mode: str = "partial"  # partial | background | drop
    out: str = "runs/default"
    threads: int | None = None
    max_minutes: float | None = None  # stop early (validating and exporting) after this much training time

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        import yaml

        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a training config is a mapping of settings, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}")
        if not isinstance(d.get("model", {}), dict):
            raise ValueError(f"{path}: 'model' must be a mapping of network settings")
        from .card import ModelConfig

        bad = set(d.get("model", {})) - set(ModelConfig.__dataclass_fields__)
        if bad:
            raise ValueError(f"{path}: unknown network settings under 'model': {sorted(bad)} "
                             f"(known: {sorted(ModelConfig.__dataclass_fields__)})")
        cfg = cls(**d)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting of a wrong type or outside its range."""
        from dataclasses import fields

        for f in fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()
            if v is None or default is None and f.name not in ("crop_size", "threads", "max_minutes", "swa_start",
                                                               "swa_lr"):
                continue
            kind = type(default) if default is not None else (float if f.name in ("max_minutes", "swa_lr") else int)
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if kind is float else
                  isinstance(v, kind))
            if not ok:
                raise ValueError(f"{f.name} must be {kind.__name__}, got {v!r}")
        positive = {"steps": 10_000_000, "batch_size": 1024, "val_every": 10_000_000, "tile_size": 8192,
                    "crop_size": 8192, "threads": 1024, "swa_every": 10_000_000}
        for name, hi in positive.items():
            v = getattr(self, name)
            if v is not None and not 1 <= v <= hi:
                raise ValueError(f"{name} must be in [1, {hi}], got {v!r}")
        for name in ("lr", "mpp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)!r}")
        for name in ("val_fraction", "extra_share", "glass", "hide_class_fraction", "hide_mask_fraction", "low_res",
                     "blur", "scale_jitter", "colour_jitter", "backbone_lr"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {self.overlap!r}")
        if self.swa_start is not None and not 0 <= self.swa_start < self.steps:
            raise ValueError(f"swa_start must be a step in [0, steps), got {self.swa_start!r}")
        if self.swa_lr is not None and not self.swa_lr > 0:
            raise ValueError(f"swa_lr must be above 0, got {self.swa_lr!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be above 0, got {self.max_minutes!r}")
        if not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in self.score_thresholds):
            raise ValueError(f"score_thresholds must be numbers in [0, 1], got {self.score_thresholds!r}")
        if not all(isinstance(a, (int, float)) and 0 <= a <= 1000 for a in self.min_areas_um2):
            raise ValueError(f"min_areas_um2 must be areas in µm² in [0, 1000], got {self.min_areas_um2!r}")
        if not all(isinstance(n, str) for n in self.val_names):
            raise ValueError(f"val_names must be image names (strings), got {self.val_names!r}")
        if self.class_names is not None and (not self.class_names or not all(
                isinstance(n, str) and n for n in self.class_names)):
            raise ValueError(f"class_names must be a list of names, got {self.class_names!r}")
        ModelConfig(**{**self.model, "num_classes": len(self.class_names or ["x"]), "tile_size": self.tile_size}
                    ).validate()


CLASS_HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def init_weights(model: torch.nn.Module, class_names: list[str], path: str | os.PathLike) -> dict[str, Any]:
    """Copy the weights of the saved model at ``path`` into ``model`` (fine-tuning).

    The per-class output layers are copied only when the classes are the same
    (names and order); otherwise they stay as built and learn the new classes.
    Any other difference in architecture is an error that names the file.
    """
    from safetensors.torch import load_file

    from .card import load_card

    src = load_card(path)
    same_classes = src.class_names == list(class_names)
    state = load_file(str(path))
    own = model.state_dict()
    copied, fresh = {}, []
    expanded = []
    for k, v in own.items():
        if k.startswith(CLASS_HEADS) and not same_classes:
            fresh.append(k)
            continue
        if k.startswith(RPN_OUTPUTS) and k in state and state[k].shape[1:] == v.shape[1:] \
                and state[k].shape[0] != v.shape[0]:
            copied[k] = _more_anchor_scales(state[k], v, src.config, path, k)
            expanded.append(k)
            continue
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            got = tuple(state[k].shape) if k in state else "missing"
            raise ValueError(f"{path}: cannot initialise from this model: {k} is {got}, the configured network "
                             f"needs {tuple(v.shape)} (the 'model' settings must match the source model's)")
        copied[k] = state[k].to(v.dtype)
    model.load_state_dict({**own, **copied})
    return {"from": str(path), "source_model": src.name, "source_classes": src.class_names,
            "copied_tensors": len(copied), "fresh_tensors": fresh, "expanded_tensors": expanded}


RPN_OUTPUTS = ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")


def _more_anchor_scales(old: torch.Tensor, new: torch.Tensor, src_cfg, path, key: str) -> torch.Tensor:
    """An RPN output layer of a source model with one anchor per aspect ratio, repeated for each of the
    configured network's anchor scales (anchors are ordered ratio-major, scale-minor; a box output has four
    channels per anchor), so that fine-tuning starts from the source's proposals."""
    n_ratios = len(src_cfg.aspect_ratios)
    per = old.shape[0] // n_ratios  # 1 (objectness) or 4 (box deltas) per anchor
    k = new.shape[0] // old.shape[0]
    if len(src_cfg.anchor_scales) != 1 or old.shape[0] % n_ratios or new.shape[0] != k * old.shape[0]:
        raise ValueError(f"{path}: cannot initialise from this model: {key} is {tuple(old.shape)}, the configured "
                         f"network needs {tuple(new.shape)} (only a model with one anchor scale can be widened)")
    groups = old.reshape(n_ratios, 1, per, *old.shape[1:]).expand(n_ratios, k, per, *old.shape[1:])
    return groups.reshape(new.shape).to(new.dtype).clone()


def split_names(names: list[str], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Train/validation split by whole source image (CoNSeP tiles of one image stay together)."""
    if cfg.val_names:
        known = set(names) | {_source(n) for n in names}
        unknown = [n for n in cfg.val_names if n not in known]
        if unknown:
            raise ValueError(f"val_names: no image or source image named {unknown[:5]} in the data "
                             f"(e.g. {sorted(names)[:3]})")
        val = [n for n in names if n in set(cfg.val_names) or _source(n) in set(cfg.val_names)]
        return [n for n in names if n not in set(val)], val
    sources = sorted({_source(n) for n in names})
    rng = random.Random(cfg.seed)
    rng.shuffle(sources)
    k = max(1, int(round(len(sources) * cfg.val_fraction))) if cfg.val_fraction > 0 else 0  # 0: training only
    val_src = set(sources[:k])
    return [n for n in names if _source(n) not in val_src], [n for n in names if _source(n) in val_src]


def _source(name: str) -> str:
    parts = name.rsplit("_", 1)
    return parts[0] if len(parts) == 2 and parts[1].isdigit() else name


def apply_partial_mode(samples: list[Sample], mode: str) -> list[Sample]:
    """The baselines of the partial-label experiment: hidden labels as background, or images dropped."""
    if mode == "partial":
        return samples
    if mode == "drop":
        return [s for s in samples
                if not s.no_mask and all(int(i) in s.classes for i in np.unique(s.instances)[1:])]
    if mode == "background":
        out = []
        for s in samples:
            lab = s.instances.copy()
            for i in np.unique(lab)[1:]:
                if int(i) not in s.classes or int(i) in s.no_mask:
                    lab[lab == i] = 0
            out.append(Sample(s.name, s.image, lab, s.classes, set(), s.mpp))
        return out
    raise ValueError(f"unknown partial_mode {mode!r} (partial, background, drop)")


def _to_torch(t: dict) -> dict:
    return {"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"]),
            "masks": torch.from_numpy(t["masks"]), "class_known": torch.from_numpy(t["class_known"]),
            "mask_known": torch.from_numpy(t["mask_known"])}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at each of ``restarts`` and at ``steps``.

    The cycle after the i-th restart peaks at ``lr * restart_peaks[i]`` (``lr`` where not given). From
    ``swa_start`` on the rate stays at ``swa_lr`` (where not given, the schedule's rate at ``swa_start``).
    """
    if cfg.swa_start is not None and step >= cfg.swa_start:
        return cfg.swa_lr if cfg.swa_lr is not None else lr_at(cfg.swa_start, replace(cfg, swa_start=None))
    if step < cfg.warmup_steps:
        return cfg.lr * (0.05 + 0.95 * step / max(1, cfg.warmup_steps))
    restarts = sorted(r for r in cfg.restarts if cfg.warmup_steps < r < cfg.steps)
    bounds = [cfg.warmup_steps] + restarts + [cfg.steps]
    for cycle, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if step < end:
            break
    peak = cfg.restart_peaks[cycle - 1] if 0 < cycle <= len(cfg.restart_peaks) else 1.0
    p = (step - start) / max(1, end - start)
    return cfg.lr * peak * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _truncate_log(path: Path, step: int) -> None:
    """Drop loss-log rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
    if len(keep) != len(lines):
        path.write_text("".join(keep))


def training_data(cfg: TrainConfig) -> tuple[list[Sample], list[Sample], list[str], tuple[list[str], list[str]]]:
    """The training samples (labels hidden and ``partial_mode`` applied), the validation samples, the class
    names, and the split by name (training names before any image is dropped)."""
    data = load_dataset(cfg.data, cfg.class_names, slide=cfg.slide, images=cfg.images, mpp=cfg.data_mpp)
    train_names, val_names = split_names([s.name for s in data.samples], cfg)
    by_name = {s.name: s for s in data.samples}
    train_s = [by_name[n] for n in train_names]
    hide_labels(train_s, cfg.hide_class_fraction, cfg.hide_mask_fraction, cfg.seed)
    train_s = apply_partial_mode(train_s, cfg.partial_mode)
    if not train_s:
        raise ValueError("no training images left")
    return train_s, [by_name[n] for n in val_names], data.class_names, (train_names, val_names)


def extra_training_data(cfg: TrainConfig, class_names: list[str]) -> list[Sample]:
    """Every image of ``cfg.extra_data``, all for training, labelled with the main data's classes: a nucleus
    whose class is not among them has an unknown class (the partial-label loss ignores it), and a
    one-class model sees every nucleus as that class."""
    if not 0.0 <= cfg.extra_share < 1.0:
        raise ValueError(f"extra_share must be in [0, 1), got {cfg.extra_share}")
    one_class = len(class_names) == 1
    out: list[Sample] = []
    for path in cfg.extra_data:
        data = load_dataset(path, class_names)
        if not data.samples:
            raise ValueError(f"{path}: extra_data holds no images")
        if one_class:
            for s in data.samples:
                s.classes = {int(i): 0 for i in np.unique(s.instances)[1:]}
        out.extend(data.samples)
    return out


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    seconds: float = 0.0, swa: torch.optim.swa_utils.AveragedModel | None = None) -> None:
    """Weights, optimizer state, step and the weight average (when averaging), written to a temporary name and
    renamed (a kill leaves the old one)."""
    from .atomic import atomic_path

    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "seconds": float(seconds)}
    if swa is not None:
        state["swa"] = swa.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_checkpoint(path: Path) -> tuple[dict, int]:
    """A ``save_checkpoint`` file's contents (never unpickling objects) and its step."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        return state, int(state["step"])
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise ValueError(f"{path}: training checkpoint is damaged or not a wsiseg checkpoint ({type(exc).__name__}: "
                         f"{exc}); move it away to train from the start (or from 'init')") from None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    swa: torch.optim.swa_utils.AveragedModel | None = None) -> tuple[int, float]:
    """Restore a checkpoint of ``save_checkpoint`` (and its weight average into ``swa``, where it has one);
    returns its step and the training seconds spent up to it."""
    state, step = _read_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if swa is not None and "swa" in state:
            swa.load_state_dict(state["swa"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: checkpoint does not fit the configured network (the 'model' settings changed "
                         f"since it was written?): {str(exc).splitlines()[0]}") from None
    return step, float(state.get("seconds", 0.0))


CARRIED_WEIGHTS = "carried.safetensors"
SWA_PREFIX = "swa."  # the carried weight average's tensors
CARRIED_FILES = ("best.safetensors", "best.json", "val.jsonl", "loss.csv", "split.json", "pretrained.json")


def carry_run(run: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy what another machine needs to go on with a training run into ``dest``: the last checkpoint's
    weights as fp16 safetensors with its step (``carried.safetensors``, no optimizer state), the best model,
    and the logs. ``wsiseg train CONFIG --out DEST`` then continues at that step, with AdamW's moments
    started afresh."""
    import shutil

    run, dest = Path(run), Path(dest)
    ckpt = run / "last.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run}: no last.pt to carry (has this run trained a step?)")
    state, step = _read_checkpoint(ckpt)
    dest.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        if (run / name).exists() and (run / name).resolve() != (dest / name).resolve():
            shutil.copyfile(run / name, dest / name)
    weights = dict(state["model"])
    if "swa" in state:  # the weight average goes on too (fp16, like the weights)
        weights.update({SWA_PREFIX + k: v for k, v in state["swa"].items()})
    write_safetensors(weights, dest / CARRIED_WEIGHTS,
                      {"step": str(step), "seconds": repr(float(state.get("seconds", 0.0)))}, half=True)
    if (dest / "loss.csv").exists():
        _truncate_log(dest / "loss.csv", step)  # rows past the checkpoint would be trained again
    return dest / CARRIED_WEIGHTS


def load_carried(path: Path, model: torch.nn.Module,
                 swa: torch.optim.swa_utils.AveragedModel | None = None) -> tuple[int, float]:
    """Load the weights :func:`carry_run` wrote into ``model`` (and their weight average into ``swa``, where
    they have one); returns their step and training seconds."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        step, seconds = int(meta["step"]), float(meta.get("seconds", 0.0))
    except Exception as exc:  # safetensors raises several kinds for a damaged file
        raise ValueError(f"{path}: not weights carried from a training run ({type(exc).__name__}: {exc}); "
                         f"move it away to train from the start") from None
    averaged = {k[len(SWA_PREFIX):]: v for k, v in state.items() if k.startswith(SWA_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(SWA_PREFIX)}
    try:
        model.load_state_dict(state)
        if swa is not None and averaged:
            own = swa.state_dict()  # n_averaged stays an integer
            swa.load_state_dict({k: v.to(own[k].dtype) for k, v in averaged.items()})
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{path}: the carried weights do not fit the configured network (the 'model' settings "
                         f"changed?): {str(exc).splitlines()[0]}") from None
    return step, seconds


@dataclass
class Pool:
    """One dataset's training and validation images, and its share of the training crops."""

    name: str
    share: float
    train: list[Sample]
    val: list[Sample]
    split: dict[str, list[str]]


DATASET_KEYS = {"path", "name", "share", "split", "val_fraction", "mpp", "slide"}


def _dataset_pool(d: dict[str, Any], cfg: TrainConfig, class_names: list[str] | None) -> tuple[Pool, list[str]]:
    """A ``datasets:`` entry as a pool: its split file (``{"train": [...], "val": [...]}``) or a seeded split
    by whole source image, the run's hidden labels applied to its training images."""
    from dataclasses import replace

    if not isinstance(d, dict) or "path" not in d or set(d) - DATASET_KEYS:
        raise ValueError(f"datasets: each entry is a mapping with 'path' and optionally {sorted(DATASET_KEYS - {'path'})}"
                         f", got {d!r}")
    data = load_dataset(d["path"], class_names, slide=d.get("slide"), mpp=d.get("mpp"))
    if not data.samples:
        raise ValueError(f"{d['path']}: holds no images")
    class_names = class_names or data.class_names
    by_name = {s.name: s for s in data.samples}
    if len(class_names) == 1:
        for s in data.samples:
            s.classes = {int(i): 0 for i in np.unique(s.instances)[1:]}
    if d.get("split"):
        try:
            split = json.loads(Path(d["split"]).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{d['split']}: cannot read the split file ({exc})") from None
        if not isinstance(split, dict) or not all(
                isinstance(split.get(k, []), list) and all(isinstance(n, str) for n in split.get(k, []))
                for k in ("train", "val")):
            raise ValueError(f"{d['split']}: a split file is {{\"train\": [names], \"val\": [names]}} "
                             "with image names as strings")
        missing = [n for n in split.get("train", []) + split.get("val", []) if n not in by_name]
        if missing or "val" not in split:
            raise ValueError(f"{d['split']}: needs 'train' and 'val' lists of image names of {d['path']} "
                             f"(unknown: {missing[:5]})")
        train_names, val_names = list(split["train"]), list(split["val"])
    else:
        sub = replace(cfg, val_names=[], val_fraction=float(d.get("val_fraction", cfg.val_fraction)))
        train_names, val_names = split_names(list(by_name), sub)
    train_s = [by_name[n] for n in train_names]
    hide_labels(train_s, cfg.hide_class_fraction, cfg.hide_mask_fraction, cfg.seed)
    train_s = apply_partial_mode(train_s, cfg.partial_mode)
    share = float(d.get("share", 1.0))
    if not train_s:
        raise ValueError(f"{d['path']}: no training images left after the validation split")
    if not share > 0:
        raise ValueError(f"{d['path']}: share must be above 0, got {share}")
    name = d.get("name") or Path(d["path"]).name
    return Pool(name, share, train_s, [by_name[n] for n in val_names],
                {"train": train_names, "val": val_names}), class_names


def training_pools(cfg: TrainConfig) -> tuple[list[Pool], list[str]]:
    """The datasets a run draws its crops from, with shares summing to 1, and the class names."""
    if cfg.datasets:
        pools, class_names = [], cfg.class_names
        for d in cfg.datasets:
            pool, class_names = _dataset_pool(d, cfg, class_names)
            pools.append(pool)
        if len({p.name for p in pools}) != len(pools):
            raise ValueError("datasets: names must be distinct (give each a 'name')")
    else:
        train_s, val_s, class_names, (train_names, val_names) = training_data(cfg)
        extra_s = extra_training_data(cfg, class_names)
        main_share = 1.0 - cfg.extra_share if extra_s else 1.0
        pools = [Pool(Path(cfg.data).name, main_share, train_s, val_s, {"train": train_names, "val": val_names})]
        if extra_s:
            pools.append(Pool("extra_data", cfg.extra_share, extra_s, [], {"train": [s.name for s in extra_s],
                                                                           "val": []}))
    total = sum(p.share for p in pools)
    for p in pools:
        p.share /= total
    return pools, class_names


def _pick_pool(pools: list[Pool], rng: np.random.Generator) -> Pool:
    if len(pools) == 1:
        return pools[0]
    r, acc = rng.random(), 0.0
    for p in pools:
        acc += p.share
        if r < acc:
            return p
    return pools[-1]


def validate_pools(model: torch.nn.Module, card: ModelCard, pools: list[Pool], class_names: list[str],
                   device: DeviceConfig, score_thresholds: list[float] | None = None,
                   min_areas_um2: list[float] | None = None) -> dict:
    """Validation metrics; with several validated datasets, the mean PQ/F1/AJI over them and each one's.

    With several ``score_thresholds`` or ``min_areas_um2`` (smallest nucleus kept), every pair of them is tried
    and the metrics are those of the pair with the best (mean) PQ; ``score_threshold`` and ``min_area_um2`` always
    name the pair the metrics were measured at; ``pq_by_score_threshold`` (at the chosen smallest nucleus) and
    ``pq_by_min_area_um2`` (at the chosen threshold) give the PQ of the others. The model runs once per tile."""
    from .inference import CachedPredictor, MaskRCNNPredictor

    thresholds = sorted(set(score_thresholds or [card.score_threshold]))
    areas = sorted(set(min_areas_um2 or [card.min_area_um2]))
    pred = MaskRCNNPredictor(copy.deepcopy(model), card, device, score_threshold=thresholds[0])  # it folds BatchNorm
    if len(thresholds) * len(areas) > 1:  # the model's output is kept only when it is read again
        pred = CachedPredictor(pred)
    results = {}
    for t in thresholds:
        pred.score_threshold = t
        for a in areas:
            per = {p.name: evaluate_predictor(pred, p.val, class_names, a) for p in pools if p.val}
            if len(per) == 1:
                results[t, a] = next(iter(per.values()))
            else:
                results[t, a] = {k: float(np.mean([m[k] for m in per.values()]))
                                 for k in ("pq", "f1", "aji", "dq", "sq")}
                results[t, a]["datasets"] = per
    bt, ba = max(results, key=lambda ta: results[ta]["pq"])
    out = {**results[bt, ba], "score_threshold": bt, "min_area_um2": ba}
    if len(results) > 1:
        out["pq_by_score_threshold"] = {str(t): results[t, ba]["pq"] for t in thresholds}
    if len(areas) > 1:
        out["pq_by_min_area_um2"] = {f"{a:g}": results[bt, a]["pq"] for a in areas}
    return out


def tune_model(model: str | os.PathLike, cfg: TrainConfig, out: str | os.PathLike,
               score_thresholds: list[float] | None = None, min_areas_um2: list[float] | None = None,
               device: str = "auto") -> dict:
    """Write ``out``: the model (same weights) with the score threshold and smallest nucleus, of those given or
    else the config's, that give the best mean PQ on ``cfg``'s validation images, and those metrics in its card
    (``metrics["validation"]``; the previous ones kept as ``metrics["validation_before_tuning"]``). Returns the
    metrics. Where the card names the images held out from the model's training, the config's validation images must
    be among them."""
    from .inference import select_device

    net, card = load_model(model)
    pools, class_names = training_pools(cfg)
    if class_names != card.class_names:
        raise ValueError(f"{model}: its classes {card.class_names} are not the config's {class_names}")
    val_names = [n for p in pools for n in p.split["val"]]
    if not val_names:
        raise ValueError("the config holds out no validation images to tune on")
    held_out = card.metrics.get("val_images")
    unseen = sorted(set(val_names) - set(held_out)) if held_out is not None else []
    if unseen:
        raise ValueError(f"{model}: its card does not list {unseen[:5]} among the images held out from its "
                         "training; tuning on images it may have been trained on would overstate it")
    thresholds = score_thresholds or cfg.score_thresholds or [card.score_threshold]
    areas = min_areas_um2 or cfg.min_areas_um2 or [card.min_area_um2]
    metrics = validate_pools(net, card, pools, class_names, select_device(device), thresholds, areas)
    card.score_threshold, card.min_area_um2 = metrics["score_threshold"], metrics["min_area_um2"]
    before = card.metrics.get("validation")
    tuned = dict(metrics)
    if before is not None and "step" in before:  # the weights are still those of that training step
        tuned = {"step": before["step"], **tuned}
    tuned["images"] = len(val_names)
    # the images held out from training stay what the card said; without a list, those tuned on are named
    card.metrics = {**card.metrics, "validation": tuned, "val_images": held_out if held_out is not None else val_names}
    if before is not None:
        card.metrics["validation_before_tuning"] = before
    save_model(net, card, Path(out), half=True)
    return card.metrics["validation"]


AVERAGE_IGNORES = ("class_temperature", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                   "box_batch_size_per_image", "box_positive_fraction", "rpn_batch_size_per_image", "pretrained")


def average_models(models: list[str | os.PathLike], out: str | os.PathLike) -> ModelCard:
    """Write ``out``: the element-wise mean of the weights of ``models`` (a "model soup": runs of one network,
    e.g. from one starting point), with the first model's card and settings. The card names the models averaged
    (``training.averaged_from``), sums their CPU hours, keeps as held out only the images every one of them held
    out, and drops the first's validation metrics, which were measured on other weights: ``wsiseg calibrate``
    and ``wsiseg tune`` measure the average. Networks, classes, mpp or tile size that differ are an error."""
    if len(models) < 2:
        raise ValueError("averaging needs at least two models")
    nets, cards = zip(*(load_model(path) for path in models))  # each checked against its card's network
    states = [n.state_dict() for n in nets]
    first = cards[0]

    def network(c: ModelCard) -> ModelConfig:  # the network, without calibration and training-only settings
        return replace(c.config, **{k: getattr(first.config, k) for k in AVERAGE_IGNORES})

    for path, c in zip(models[1:], cards[1:]):
        what = ("network" if network(c) != network(first) else "classes" if c.class_names != first.class_names else
                "mpp" if c.mpp != first.mpp else "tile size" if c.tile_size != first.tile_size else None)
        if what:
            raise ValueError(f"{path}: its {what} differs from {models[0]}'s; only runs of one network average")
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            avg[k] = torch.stack([s[k].float() for s in states]).mean(0)
        elif all(torch.equal(s[k], v) for s in states):
            avg[k] = v
        else:
            raise ValueError(f"{models[0]}: its {k} (not a weight) differs between the models; they do not average")
    net, card = nets[0], first
    net.load_state_dict(avg)
    held = [c.metrics.get("val_images") for c in cards]
    card.metrics = {} if any(h is None for h in held) else {
        "val_images": [n for n in held[0] if all(n in h for h in held[1:])]}
    hours = [c.training.get("cpu_hours") for c in cards]
    card.training = {**first.training, "averaged_from": [
        {"file": Path(p).name, "name": c.name, "steps_done": c.training.get("steps_done"),
         "cpu_hours": c.training.get("cpu_hours"), "sha256": file_sha256(p)} for p, c in zip(models, cards)]}
    if all(h is not None for h in hours):
        card.training["cpu_hours"] = round(sum(hours), 2)
    save_model(net, card, Path(out), half=True)
    return card


def class_sources(pools: list[Pool], class_names: list[str]) -> dict[str, str]:
    """For each class, the datasets whose training nuclei carry it, with their counts ("consep: 3,210 nuclei")."""
    counts = {p.name: np.bincount([c for s in p.train for c in s.classes.values()], minlength=len(class_names))
              for p in pools}
    return {n: ", ".join(f"{name}: {int(k[c]):,} training nuclei" for name, k in counts.items() if k[c])
            for c, n in enumerate(class_names) if any(k[c] for k in counts.values())}


def _training_card(cfg: TrainConfig, pools: list[Pool], class_names: list[str]) -> ModelCard:
    """The card the trained model is exported with: architecture, classes, data and the whole config."""
    mcfg = ModelConfig(**{**cfg.model, "num_classes": len(class_names), "tile_size": cfg.tile_size})
    data_info = {"train_images": sum(len(p.train) for p in pools), "val_images": sum(len(p.val) for p in pools)}
    if len(pools) > 1:
        data_info["datasets"] = {p.name: {"share": round(p.share, 4), "train_images": len(p.train),
                                          "val_images": len(p.val)} for p in pools}
    if cfg.extra_data and not cfg.datasets:
        data_info["extra_images"] = sum(len(p.train) for p in pools if p.name == "extra_data")
    norm = {}
    if mcfg.backbone in TIMM_BACKBONES:  # the input normalisation its ImageNet weights were trained with
        import timm

        pc = timm.get_pretrained_cfg(TIMM_BACKBONES[mcfg.backbone])
        norm = {"mean": tuple(pc.mean), "std": tuple(pc.std)}
    return ModelCard(name=cfg.name, classes=default_classes(class_names, class_sources(pools, class_names)),
                     mpp=cfg.mpp, tile_size=cfg.tile_size, **norm,
                     overlap=cfg.overlap, config=mcfg, description=cfg.description,
                     training={**asdict(cfg), **data_info})


def _init_source(cfg: TrainConfig, card: ModelCard) -> str | None:
    """The model file whose weights start the run (``init``), after taking its input normalisation and, for
    weights that descend from an ImageNet backbone, that backbone's provenance."""
    if not cfg.init:
        return None
    from .card import default_model_path, load_card

    src = default_model_path() if cfg.init == "default" else cfg.init
    if src is None:
        raise ValueError("init: default, but no default model is bundled with this installation")
    source = load_card(src)
    card.mean, card.std = source.mean, source.std  # the weights expect their own input normalisation
    if source.training.get("pretrained_backbone"):
        card.training["pretrained_backbone"] = source.training["pretrained_backbone"]
    return src


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, without weight decay on biases and norm parameters; the backbone's body at ``backbone_lr`` times
    the learning rate (each group's ``lr_scale``)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    groups = []
    for body in (True, False):
        scale = cfg.backbone_lr if body else 1.0
        ps = [(k, p) for k, p in named if k.startswith("backbone.body.") == body]
        for decay in (True, False):
            sel = [p for k, p in ps if (p.ndim > 1) == decay]
            if sel:
                groups.append({"params": sel, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=cfg.lr)


LOSS_COLUMNS = ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]


def _open_loss_log(path: Path, step: int):
    """The loss log (CSV), continued after ``step``; returns the file and its CSV writer."""
    if path.exists():
        _truncate_log(path, step)
    new_log = not path.exists()
    f = open(path, "a", newline="")
    w = csv.writer(f)
    if new_log:
        w.writerow(["step", "lr", "loss", *LOSS_COLUMNS, "seconds"])
    return f, w


def _sample_batch(pools: list[Pool], rng: np.random.Generator, cfg: TrainConfig, device: torch.device):
    """A batch of random training crops (images and targets) on ``device``."""
    imgs, tgts = [], []
    for _ in range(cfg.batch_size):
        pool = _pick_pool(pools, rng).train
        s = pool[int(rng.integers(len(pool)))]
        img, t = random_crop(s, cfg.crop_size or cfg.tile_size, cfg.mpp, rng, cfg.scale_jitter, cfg.hed_jitter,
                             glass=cfg.glass, hed_sigma=cfg.hed_sigma, hed_bias=cfg.hed_bias,
                             colour=cfg.colour_jitter, low_res=cfg.low_res, blur=cfg.blur)
        imgs.append((torch.from_numpy(img).permute(2, 0, 1).float() / 255).to(device))
        tgts.append({k: v.to(device) for k, v in _to_torch(t).items()})
    return imgs, tgts


def train(cfg: TrainConfig, log=print) -> dict:
    """Train, validating every ``val_every`` steps; exports the best model (by PQ) with its card. With
    ``swa_start``, what is validated and exported is the average of the weights taken every ``swa_every`` steps
    after it (stochastic weight averaging) once there is one.

    Resumes from ``<out>/last.pt`` when present (weights-only checkpoint).
    """
    from .inference import select_device

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = select_device(cfg.device, "bf16" if cfg.bf16 else "fp32")
    val_dev = select_device(cfg.device)  # validation runs as inference will
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pools, class_names = training_pools(cfg)
    splits = {p.name: p.split for p in pools}
    write_text_atomic(out / "split.json", json.dumps(pools[0].split if len(pools) == 1 else splits, indent=2))
    val_names = [n for p in pools for n in p.split["val"]]
    card = _training_card(cfg, pools, class_names)
    src = _init_source(cfg, card)
    torch.manual_seed(cfg.seed)
    model = enable_partial_labels(build_model(card.config, card.mean, card.std))
    ckpt = out / "last.pt"
    carried = out / CARRIED_WEIGHTS  # weights carried from another machine: go on from them without last.pt
    resuming = ckpt.exists() or carried.exists()
    provenance = out / "pretrained.json"  # where the backbone's ImageNet weights came from, for every sitting
    if src is None and card.config.pretrained and not resuming:
        from .pretrained import load_imagenet_backbone

        info = load_imagenet_backbone(model, card.config.backbone)
        write_text_atomic(provenance, json.dumps(info, indent=2))
        log(f"backbone {card.config.backbone} initialised with ImageNet weights ({info['file']})")
    if src is None and card.config.pretrained and provenance.exists():
        card.training["pretrained_backbone"] = json.loads(provenance.read_text())
    if src is not None and not resuming:
        info = init_weights(model, class_names, src)
        card.training["init_weights"] = info
        log(f"initialised from {src}: {info['copied_tensors']} tensors copied"
            + (f" ({len(info['expanded_tensors'])} RPN outputs repeated per anchor scale)"
               if info["expanded_tensors"] else "")
            + f", {len(info['fresh_tensors'])} class-head tensors new")
    model.to(dev.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(model, cfg)
    step, best, seconds_before = 0, {"pq": -1.0}, 0.0
    swa = torch.optim.swa_utils.AveragedModel(model) if cfg.swa_start is not None else None
    if ckpt.exists():
        step, seconds_before = load_checkpoint(ckpt, model, opt, swa)
        log(f"resumed from {ckpt} at step {step}")
    elif carried.exists():
        step, seconds_before = load_carried(carried, model, swa)
        log(f"went on from {carried} at step {step} (carried weights: AdamW's moments start afresh)")
    if resuming and (out / "best.json").exists():
        best = json.loads((out / "best.json").read_text())
    rng = np.random.default_rng(cfg.seed + step)
    logf, logw = _open_loss_log(out / "loss.csv", step)
    t0 = time.time()
    try:
        while step < cfg.steps:
            if cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60:
                log(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached")
                break
            model.train()
            imgs, tgts = _sample_batch(pools, rng, cfg, dev.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
            with dev.autocast():
                losses = model(imgs, tgts)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            step += 1
            if swa is not None and step > cfg.swa_start and (step - cfg.swa_start) % cfg.swa_every == 0:
                swa.update_parameters(model)
            logw.writerow([step, f"{lr_at(step, cfg):.6g}", f"{loss.item():.5f}",
                           *[f"{losses[k].item():.5f}" for k in LOSS_COLUMNS], f"{time.time() - t0:.1f}"])
            if step % 20 == 0:
                logf.flush()
                log(f"step {step}/{cfg.steps} loss {loss.item():.3f} "
                    + " ".join(f"{k[5:]}={v.item():.3f}" for k, v in losses.items()) + f" ({time.time() - t0:.0f} s)")
            out_of_time = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
            if step % cfg.val_every == 0 or step == cfg.steps or out_of_time:
                seconds = seconds_before + time.time() - t0
                save_checkpoint(ckpt, model, opt, step, seconds, swa)
                card.training.update(steps_done=step, cpu_hours=round(seconds * torch.get_num_threads() / 3600, 2),
                                     wall_hours=round(seconds / 3600, 2))
                if swa is not None and int(swa.n_averaged) > 0:
                    card.training["swa_snapshots"] = int(swa.n_averaged)
                if val_names:
                    best = _validate_and_keep_best(_exported(model, swa), card, pools, class_names, val_names,
                                                   val_dev, cfg, step, best, out, log)
    finally:
        logf.close()
    if not val_names:
        save_model(_exported(model, swa), card, out / "best.safetensors", half=True)
    return best


def _exported(model: torch.nn.Module, swa: torch.optim.swa_utils.AveragedModel | None) -> torch.nn.Module:
    """The weights a run validates and exports: the weight average once it holds a snapshot, else the model."""
    return swa.module if swa is not None and int(swa.n_averaged) > 0 else model


def _validate_and_keep_best(model, card: ModelCard, pools: list[Pool], class_names: list[str], val_names: list[str],
                            dev: DeviceConfig, cfg: TrainConfig, step: int, best: dict, out: Path, log) -> dict:
    """Validate, log to val.jsonl, and export the model when it beats ``best`` (by mean PQ); returns the best."""
    metrics = validate_pools(model, card, pools, class_names, dev, cfg.score_thresholds, cfg.min_areas_um2)
    log(f"validation at step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    with open(out / "val.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if metrics["pq"] <= best["pq"]:
        return best
    best = {"step": step, **metrics}
    card.score_threshold = metrics["score_threshold"]  # the exported model runs at the settings it was validated at
    card.min_area_um2 = metrics["min_area_um2"]
    card.metrics = {"validation": best, "val_images": val_names}
    save_model(model, card, out / "best.safetensors", half=True)
    write_text_atomic(out / "best.json", json.dumps(best, indent=2))
    return best
