"""Batched nucleus prediction on tiles.

All device decisions live in :func:`select_device`: CUDA with AMP, pinned
host memory and non-blocking copies when a GPU is present; CPU with bf16
autocast and channels_last otherwise.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from .card import ModelCard
from .detections import ModelOutput, RawDetections, TileDetections
from .errors import DeviceUnavailableError
from .model import fold_batchnorm


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    pin_memory: bool
    streams: int = 1  # batches run at once, each in a thread of its own (CPU: see select_device)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def select_device(name: str = "auto", precision: str = "auto") -> DeviceConfig:
    """Where and how the model runs.

    ``name``: auto, cpu, cuda or cuda:N. ``precision``: auto (fp16 AMP on CUDA,
    bf16 autocast on CPU), fp32, bf16 or fp16.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {name!r} requested but this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (cpu, cuda, cuda:N)")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif precision in dtypes:
        dtype = dtypes[precision]
    else:
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on the CPU")
    return DeviceConfig(
        device=device,
        autocast_dtype=dtype,
        channels_last=device.type == "cpu",
        pin_memory=device.type == "cuda",
        # On the CPU a good part of a Mask R-CNN forward pass runs on one core (RoIAlign, NMS, torchvision's
        # Python glue): two batches at once, each with half the intra-op threads, keep every core busy
        # (benchmarks/cpu_speed.py: 1.4x on 2 cores). A GPU takes one batch at a time.
        streams=2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1,
    )


class HeapTrimmer:
    """Hands freed heap memory back to the operating system whenever the process has grown ``slack_mb``
    since the last hand-back (glibc's ``malloc_trim``; a no-op elsewhere).

    Tiles with different numbers of detections make differently sized tensors,
    and glibc keeps the freed blocks: without this, resident memory climbs with
    every tile processed, so with slide size. Trimming after every batch costs
    about a tenth of the forward time; at a watermark it costs next to nothing.
    """

    def __init__(self, slack_mb: float = 128, rss=None, trim=None):
        self.slack = int(slack_mb * 2**20)
        self._rss = rss or _rss_bytes
        self._trim = trim if trim is not None else _malloc_trim()
        self.limit: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        if self._trim is None:
            return
        rss = self._rss()
        if rss is None:
            return
        if self.limit is None:
            self.limit = rss + self.slack
        elif rss > self.limit:
            self._trim(0)
            self.trims += 1
            self.limit = (self._rss() or rss) + self.slack


def _rss_bytes() -> int | None:
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class Predictor(Protocol):
    """What the pipeline needs of a model: its card, its thresholds, where it runs, and its outputs per tile."""

    card: ModelCard
    score_threshold: float
    mask_threshold: float
    device_name: str
    streams: int  # how many batches ``infer`` may run at once in threads (1: one at a time)
    source: str | None  # the model file it was loaded from, if any (an input of the run)

    def infer(self, tiles: np.ndarray) -> list[ModelOutput]:
        """The model's output for a batch of RGB uint8 tiles (n, h, w, 3), as numpy; the writing side
        finishes each with ``finish(size, score_threshold, mask_threshold)``."""
        ...

    def predict(self, tiles: np.ndarray) -> list[TileDetections]:
        """Final detections for a batch of RGB uint8 tiles (n, h, w, 3)."""
        ...


class MaskRCNNPredictor:
    """Runs a torchvision Mask R-CNN on batches of tiles; masks stay as box-sized crops. It takes ``model`` as
    its own and changes it for inference (eval mode, BatchNorm folded, thresholds): pass a copy of a model
    that is still to be trained or saved."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: DeviceConfig | None = None,
                 score_threshold: float | None = None, prefilter: bool = True):
        self.card = card
        self.device = device or select_device()
        self.score_threshold = card.score_threshold if score_threshold is None else score_threshold
        self.mask_threshold = 0.5  # mask probability that counts as nucleus
        if prefilter:
            # boxes scoring below the threshold would be dropped after the mask head: drop them before it.
            # NMS and the top-k keep the same boxes above it, so the detections kept are the same
            model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, self.score_threshold)
        # BatchNorm folded into the convolutions before it: the same function, without a bf16 -> fp32 -> bf16
        # round trip per layer (the predictor owns its model: ``load_predictor`` builds one for it)
        model = fold_batchnorm(model.eval()).to(self.device.device)
        if self.device.channels_last:
            model = model.to(memory_format=torch.channels_last)
            # the mask head's GroupNorm on 14x14 channels-last maps is ~10x slower on the CPU than on NCHW ones
            model.roi_heads.mask_head.to(memory_format=torch.contiguous_format)
        self.model = model
        self.trim_heap = HeapTrimmer()
        self.source: str | None = None

    @property
    def device_name(self) -> str:
        return str(self.device.device)

    @property
    def streams(self) -> int:
        return self.device.streams

    def to_tensor(self, tiles: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.pin_memory:
            x = x.pin_memory()
        x = x.to(self.device.device, non_blocking=self.device.pin_memory)
        return x.permute(0, 3, 1, 2).float().div_(255.0)

    @torch.inference_mode()
    def forward(self, tiles: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """Boxes, scores, labels and M x M mask probabilities per tile (no full-size mask pasting)."""
        m = self.model
        x = self.to_tensor(tiles)
        with self.device.autocast():
            images, _ = m.transform(list(x))
            if self.device.channels_last:
                images.tensors = images.tensors.contiguous(memory_format=torch.channels_last)
            features = m.backbone(images.tensors)
            proposals, _ = m.rpn(images, features)
            dets, _ = m.roi_heads(features, proposals, images.image_sizes)
        out = []
        for d, (ih, iw) in zip(dets, images.image_sizes):
            sy, sx = tiles.shape[1] / ih, tiles.shape[2] / iw
            boxes = d["boxes"].float() * torch.tensor([sx, sy, sx, sy], device=d["boxes"].device)
            out.append({"boxes": boxes, "scores": d["scores"].float(), "labels": d["labels"],
                        "masks": d["masks"].float(), "class_probs": d["class_probs"].float()})
        self.trim_heap()
        return out

    def infer(self, tiles: np.ndarray) -> list[RawDetections]:
        return raw_detections(self.forward(tiles))

    def predict(self, tiles: np.ndarray) -> list[TileDetections]:
        return self.finish(self.infer(tiles), tiles.shape[1:3])

    def finish(self, raw: list[ModelOutput], size: tuple[int, int]) -> list[TileDetections]:
        """Thresholded, box-sized boolean masks with overlaps resolved, per tile."""
        return [r.finish(size, self.score_threshold, self.mask_threshold) for r in raw]


class CachedPredictor:
    """A predictor whose model output is computed once per batch of tiles, so that its score and mask thresholds
    can change between calls (validation trying several score thresholds, post-processing sweeps). Thresholds
    below the inner predictor's own score threshold see only the boxes above it (it prefilters)."""

    def __init__(self, inner: MaskRCNNPredictor):
        self.inner, self.card = inner, inner.card
        self.score_threshold, self.mask_threshold = inner.score_threshold, inner.mask_threshold
        self.cache: dict[bytes, list[ModelOutput]] = {}
        self.forward_seconds = 0.0

    def infer(self, tiles: np.ndarray) -> list[ModelOutput]:
        import hashlib
        import time

        key = hashlib.sha1(np.ascontiguousarray(tiles).tobytes()).digest() + bytes(str(tiles.shape), "ascii")
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = self.inner.infer(tiles)
            self.forward_seconds += time.perf_counter() - t
        return self.cache[key]

    def predict(self, tiles: np.ndarray) -> list[TileDetections]:
        return [r.finish(tiles.shape[1:3], self.score_threshold, self.mask_threshold) for r in self.infer(tiles)]


T = TypeVar("T")


def predictor_identity(predictor: Predictor) -> dict:
    """What makes a predictor's outputs what they are: its card, thresholds, device, precision, streams and
    weights (a digest of every tensor); two predictors with the same identity give the same outputs."""
    import hashlib

    inner = getattr(predictor, "inner", predictor)  # a wrapper (CachedPredictor) gives its model's outputs
    ident = {"type": type(inner).__name__, "card": predictor.card.to_json(),
             "score_threshold": predictor.score_threshold, "mask_threshold": predictor.mask_threshold,
             "device": predictor.device_name, "streams": predictor.streams}
    if isinstance(inner, MaskRCNNPredictor):
        h = hashlib.sha256()
        for name, t in inner.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        ident["weights_sha256"] = h.hexdigest()
        ident["precision"] = str(inner.device.autocast_dtype)
        ident["channels_last"] = inner.device.channels_last
    else:
        ident["params"] = {k: v for k, v in vars(inner).items() if isinstance(v, (int, float, str, bool))}
    return ident


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the duration (it is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def infer_batches(predictor: Predictor, batches: Iterable[tuple[T, np.ndarray]]
                  ) -> Iterator[tuple[T, np.ndarray, list[ModelOutput]]]:
    """``(key, tiles, predictor.infer(tiles))`` for each batch, in the order given.

    With ``predictor.streams`` > 1, that many batches run at once in threads,
    sharing torch's intra-op threads between them; results still come in order,
    and each batch's result does not depend on the others.
    """
    streams = max(1, int(predictor.streams))
    if streams == 1:
        for key, tiles in batches:
            yield key, tiles, predictor.infer(tiles)
        return
    with intra_op_threads(torch.get_num_threads() // streams), \
            ThreadPoolExecutor(streams, thread_name_prefix="wsiseg-infer") as pool:
        pending: deque = deque()
        try:
            for key, tiles in batches:
                pending.append((key, tiles, pool.submit(predictor.infer, tiles)))
                if len(pending) >= streams:
                    key0, tiles0, fut = pending.popleft()
                    yield key0, tiles0, fut.result()
            while pending:
                key0, tiles0, fut = pending.popleft()
                yield key0, tiles0, fut.result()
        finally:
            for *_, fut in pending:
                fut.cancel()


def raw_detections(raw: list[dict[str, torch.Tensor]]) -> list[RawDetections]:
    """torchvision's per-tile output dicts as numpy detections on the CPU (labels 0-based).

    A batch leaves the device in two copies (boxes, scores, labels and class probabilities packed in one;
    mask probabilities in the other), not several per tile.
    """
    if not raw:
        return []
    counts = [len(d["scores"]) for d in raw]
    with_probs = all("class_probs" in d for d in raw)
    packed = torch.cat([torch.cat([d["boxes"].float(), d["scores"].float()[:, None], d["labels"].float()[:, None],
                                   *([d["class_probs"].float()] if with_probs else [])], 1)
                        for d in raw]).cpu().numpy()
    masks = torch.cat([d["masks"][:, 0].float() for d in raw]).cpu().numpy()
    out, at = [], 0
    for n in counts:
        rows = packed[at : at + n]
        probs = np.ascontiguousarray(rows[:, 6:]) if with_probs else None
        out.append(RawDetections(np.ascontiguousarray(rows[:, :4]), np.ascontiguousarray(rows[:, 4]),
                                 rows[:, 5].astype(np.int32) - 1, masks[at : at + n], probs))
        at += n
    return out


class ThresholdPredictor:
    """A classical baseline: hematoxylin by colour deconvolution, a fixed threshold, connected components.

    It has no learned weights and one class; it is deterministic and local, so
    it also serves to check that tiling and stitching change nothing.
    """

    device_name = "cpu"
    mask_threshold = 0.5
    streams = 1
    source = None

    def __init__(self, card: ModelCard, min_area: int = 12, smooth: float = 1.0, threshold: float = 0.6):
        self.card = card
        self.score_threshold = card.score_threshold
        self.threshold = threshold
        self.min_area = min_area
        self.smooth = smooth

    def predict(self, tiles: np.ndarray) -> list[TileDetections]:
        return [self._one(t) for t in tiles]

    def infer(self, tiles: np.ndarray) -> list[TileDetections]:
        return self.predict(tiles)

    def _one(self, tile: np.ndarray) -> TileDetections:
        import cv2
        from scipy import ndimage
        from skimage.color import hed_from_rgb

        od = -np.log10(np.maximum(tile.astype(np.float32), 1.0) / 255.0)
        # colour deconvolution (Ruifrok & Johnston): hematoxylin optical density
        hema = od @ np.asarray(hed_from_rgb, np.float32)[:, 0]
        if self.smooth:
            hema = cv2.GaussianBlur(hema, (0, 0), self.smooth)
        fg = hema > self.threshold
        fg = ndimage.binary_opening(fg, iterations=1)
        labels, n = ndimage.label(fg)
        if n == 0:
            return TileDetections.empty()
        boxes, masks, scores = [], [], []
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            m = ndimage.binary_fill_holes(labels[sl] == i)
            if m.sum() < self.min_area:
                continue
            boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
            masks.append(m)
            scores.append(min(1.0, float(hema[sl][m].mean()) / (2 * self.threshold)))
        if not boxes:
            return TileDetections.empty()
        return TileDetections(np.asarray(boxes, np.int32), np.asarray(scores, np.float32),
                              np.zeros(len(boxes), np.int32), masks)


THRESHOLD_MODEL = "threshold"


def threshold_card(mpp: float = 0.5, tile_size: int = 512, overlap: int = 64) -> ModelCard:
    from .card import default_classes

    return ModelCard(name="threshold-baseline", classes=default_classes(["nucleus"]), mpp=mpp,
                     tile_size=tile_size, overlap=overlap, score_threshold=0.0,
                     description="Classical baseline: hematoxylin threshold and connected components; no learning.")


def load_predictor(model: str, device: str = "auto", precision: str = "auto",
                   score_threshold: float | None = None) -> Predictor:
    """A predictor from a model file (.safetensors) or the name ``threshold``."""
    if model == THRESHOLD_MODEL:
        return ThresholdPredictor(threshold_card())
    from .model import load_model

    net, card = load_model(model)
    predictor = MaskRCNNPredictor(net, card, select_device(device, precision), score_threshold)
    predictor.source = str(model)  # an input of every run: never inside an output that --overwrite replaces
    return predictor
