"""wsiseg: nucleus segmentation and classification for H&E whole-slide images.

The public API, imported on first use so that ``import wsiseg`` stays cheap::

    slide = wsiseg.open_slide("slide.svs")
    predictor = wsiseg.load_predictor(wsiseg.default_model_path())
    summary = wsiseg.segment_slide("slide.svs", predictor, "out/", wsiseg.SegmentOptions())
    manifest = wsiseg.run_batch(slides, "batch-out/", model_path)
    metrics = wsiseg.evaluate(model_path, "labelled-folder/")

Where each job lives, in the order data flows (tests/test_architecture.py holds every module to
importing only upstream)::

    card, detections, features,     contracts between the stages; atomic (temporary names, publish),
    errors, timing                  typed errors, stage timings -- all torch-free
    slide                           one reader over OpenSlide, TiffSlide and plain images
    tissue → tiling                 tissue mask; level choice and the overlapping tile grid; tile streaming
    model → inference               Mask R-CNN builder and safetensors I/O; batched prediction, devices
    stitching                       the seam rule: every nucleus exactly once
    outputs, stats                  OME-Zarr / GeoJSON / table writers; slide statistics and report
    sink                            the writing side of a run, in a process of its own (no torch)
    pipeline → batch                one slide end to end; many slides, resumable, on Dask
    datasets, augment, evaluation   labelled images; training crops; PQ/AJI/F1/AP of a predictor
    training                        partial-label heads and losses, the config and the loop
    cli                             the command line: options, hints, exit codes
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "open_slide": "slide", "Slide": "slide", "SlideError": "slide", "MppUnknownError": "slide",
    "load_predictor": "inference", "default_model_path": "card", "load_card": "card", "ModelCard": "card",
    "segment_slide": "pipeline", "SegmentOptions": "pipeline", "run_batch": "batch", "evaluate": "evaluation",
    "OutputError": "atomic",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'wsiseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
