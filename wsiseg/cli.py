"""The ``wsiseg`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .card import ModelLoadError, default_model_path
from .sink import WriterProcessError
from .slide import SlideError, open_slide
from .stitching import NucleusTooLargeError


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the option, with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, lo: float, hi: float, low_open: bool = False):
    """An argparse type: a finite ``kind`` in [lo, hi] (or (lo, hi])."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(v) or v < lo or v > hi or (low_open and v == lo):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{lo:g}, {hi:g}]")
        return v

    return parse


MPP = _number(float, 0.01, 20)
TILE = _number(int, 32, 8192)
OVERLAP = _number(int, 0, 4096)
BATCH = _number(int, 1, 1024)
WORKERS = _number(int, 1, 256)
PROB = _number(float, 0, 1)
CELL_UM = _number(float, 1, 100_000)
AREA = _number(float, 0, 1000)


def _add_slide_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file (SVS, TIFF, NDPI, MRXS, DICOM, PNG/JPEG with --mpp, ...)")
    p.add_argument("--mpp", type=MPP, default=None,
                   help="level-0 microns per pixel for a slide that records none (the file's value wins)")
    p.add_argument("--force-mpp", action="store_true",
                   help="use --mpp even where the slide records an mpp (the summary says so)")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"])
    p.add_argument("--region", default=None, help="GeoJSON polygons (level-0 pixels) to analyse instead of detected tissue")
    p.add_argument("--whole-slide", action="store_true", help="analyse the whole slide, skipping tissue detection")


def _tissue(args: argparse.Namespace, slide):
    from .tissue import detect_tissue, full_tissue, tissue_from_geojson

    if args.region:
        return tissue_from_geojson(args.region, slide)
    if args.whole_slide:
        return full_tissue(slide)
    return detect_tissue(slide)


def _model(model: str | None) -> str:
    """The model a command runs: ``model`` (a file or 'threshold'), or the bundled one."""
    path = model or default_model_path()
    if path is None:
        raise ValueError("no default model is bundled with this installation; "
                         "pass --model PATH.safetensors, or --model threshold for the classical baseline")
    return path


def _card(model: str | None):
    """The card of the model ``segment`` would run: ``model``, or the bundled one."""
    from .card import load_card
    from .inference import THRESHOLD_MODEL, threshold_card

    path = _model(model)
    return threshold_card() if path == THRESHOLD_MODEL else load_card(path)


def _segment_options(args: argparse.Namespace, **extra):
    """The SegmentOptions that ``segment`` and ``batch`` share, from their common options."""
    from .pipeline import SegmentOptions

    tissue = args.region or ("whole" if args.whole_slide else "detect")
    if args.force_mpp and args.mpp is None:
        raise ValueError("--force-mpp needs --mpp")
    return SegmentOptions(
        mpp=args.mpp, force_mpp=args.force_mpp, backend=args.backend, tissue=tissue, tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size, on_oversize=args.on_oversize, writer=args.writer,
        writer_workers=args.writer_workers, geojson=args.geojson,
        table=args.table, zarr=not args.no_zarr, stats=not args.no_stats, cell_expansion_um=args.cell_expansion,
        part_tiles=args.part_tiles, processes=args.processes,
        **extra)


def cmd_info(args: argparse.Namespace) -> int:
    from .tiling import plan_slide

    if args.force_mpp and args.mpp is None:
        raise ValueError("--force-mpp needs --mpp")
    slide = open_slide(args.slide, mpp=args.mpp, backend=args.backend, force_mpp=args.force_mpp)
    p = slide.properties
    info: dict = {
        "path": p.path,
        "backend": p.backend,
        "vendor": p.vendor,
        "dimensions": list(p.dimensions),
        "levels": [
            {"dimensions": list(d), "downsample": round(ds, 4)} for d, ds in zip(p.level_dimensions, p.level_downsamples)
        ],
        "mpp": slide.mpp,
        "mpp_source": {"user": "--mpp", "forced": "--mpp --force-mpp"}.get(slide.mpp_source, slide.mpp_source),
        "objective_power": p.objective_power,
        "associated_images": list(p.associated_images),
    }
    if slide.mpp is not None:
        card = _card(args.model)
        model_mpp = args.model_mpp or card.mpp
        tile_size = args.tile_size or card.tile_size
        overlap = card.overlap if args.overlap is None else args.overlap
        sp = plan_slide(slide, model_mpp, tile_size, overlap, tissue=_tissue(args, slide))
        info["plan"] = {
            "model": card.name,
            "model_mpp": sp.plan.model_mpp,
            "level": sp.plan.level,
            "resize_factor": round(sp.plan.scale, 6),
            "model_image_size": [sp.grid.width, sp.grid.height],
            "tile_size": sp.grid.tile_size,
            "overlap": sp.grid.overlap,
            "grid": list(sp.grid.shape),
            "tiles": len(sp.grid),
            "tissue_source": sp.tissue.source,
            "tissue_area_mm2": round(sp.tissue.area_mm2(slide.mpp), 4),
        }
    else:
        info["plan"] = None
        info["plan_note"] = "no mpp known: pass --mpp to plan the tile grid"
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _print_info(info: dict) -> None:
    print(f"slide            {info['path']}")
    print(f"backend          {info['backend']} (vendor: {info['vendor'] or 'unknown'})")
    print(f"dimensions       {info['dimensions'][0]} x {info['dimensions'][1]} px")
    mpp = info["mpp"]
    print(f"mpp              {mpp if mpp is not None else 'unknown'}" + (f" (from {info['mpp_source']})" if mpp else ""))
    if info["objective_power"]:
        print(f"objective        {info['objective_power']:g}x")
    for i, lv in enumerate(info["levels"]):
        print(f"level {i:<10} {lv['dimensions'][0]} x {lv['dimensions'][1]} (downsample {lv['downsample']:g})")
    print(f"associated       {', '.join(info['associated_images']) or 'none'}")
    plan = info["plan"]
    if plan is None:
        print(f"plan             {info['plan_note']}")
        return
    print(f"model            {plan['model']}")
    print(f"model mpp        {plan['model_mpp']:g} (read level {plan['level']}, resize x{plan['resize_factor']:g})")
    print(f"model image      {plan['model_image_size'][0]} x {plan['model_image_size'][1]} px")
    print(f"tiles            {plan['tiles']} of {plan['grid'][0]} x {plan['grid'][1]} "
          f"({plan['tile_size']} px, overlap {plan['overlap']} px)")
    print(f"tissue           {plan['tissue_area_mm2']:.3f} mm² ({plan['tissue_source']})")


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import load_predictor
    from .pipeline import segment_slide

    predictor = load_predictor(_model(args.model), device=args.device, precision=args.precision,
                               score_threshold=args.score_threshold)
    opts = _segment_options(args, workers=args.workers, prefetch=args.prefetch, progress=not args.quiet,
                            overwrite=args.overwrite, density_cell_um=args.density_cell_um,
                            min_area_um2=args.min_area_um2, scheduler=args.scheduler)
    out = args.out or str(Path(args.slide).stem) + "-wsiseg"
    summary = segment_slide(args.slide, predictor, out, opts)
    t = summary["timings_s"]
    print(f"{summary['nuclei']} nuclei in {summary['tiles']} tiles, {summary['tissue_area_mm2']:.3f} mm² tissue "
          f"({summary['nuclei_per_mm2']} /mm²) in {summary['wall_s']:.1f} s "
          f"[forward {t.get('forward', 0):.1f} s, read wait {t.get('read_wait', 0):.1f} s]")
    for k, v in summary["outputs"].items():
        print(f"  {k:<8} {v}")
    print(f"  summary  {Path(out) / 'summary.json'}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import collect_slides, run_batch, summarize

    model = _model(args.model)
    slides = collect_slides(args.slides, exclude=[args.out])
    if not slides:
        raise ValueError(f"no slides found in {' '.join(args.slides)}")
    opts = _segment_options(args, workers=args.read_workers)

    def report(name: str, entry: dict) -> None:
        extra = (f"{entry.get('nuclei')} nuclei" if entry["status"] == "done" else
                 _with_hint(entry.get("error") or entry.get("reason"), BATCH_HINTS.get(entry.get("reason"), "")))
        print(f"[{entry['status']}] {name}: {extra} ({entry.get('wall_s', 0):.1f} s)", flush=True)

    manifest = run_batch(slides, args.out, model, opts, workers=args.workers, scheduler=args.scheduler,
                         device=args.device, precision=args.precision, on_result=report)
    counts = summarize(manifest)
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"manifest: {Path(args.out) / 'manifest.json'}\ncohort:   {Path(args.out) / 'cohort.csv'}")
    return 0 if counts.get("failed", 0) == 0 else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    cfg = TrainConfig.from_yaml(args.config)
    if args.out:
        cfg.out = args.out
    if args.carry:
        from .training import carry_run

        path = carry_run(cfg.out, args.carry)
        print(f"carried {cfg.out} to {args.carry} ({path.name}: weights without optimizer state); go on with: "
              f"wsiseg train {args.config} --out {args.carry}")
        return 0
    if args.steps:
        cfg.steps = args.steps
    if args.max_minutes:
        cfg.max_minutes = args.max_minutes
    if args.init:
        cfg.init = args.init
    best = train(cfg)
    print(json.dumps({k: v for k, v in best.items() if not isinstance(v, dict)}, indent=2))
    print(f"best model: {Path(cfg.out) / 'best.safetensors'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    names = None
    if args.split:
        try:
            split = json.loads(Path(args.split).read_text())
        except ValueError as exc:
            raise ValueError(f"{args.split}: not a JSON split file ({exc})") from None
        if not isinstance(split, dict) or not isinstance(split.get("val"), list) or not all(
                isinstance(n, str) for n in split["val"]):
            raise ValueError(f"{args.split}: a split file needs a 'val' list of image names (strings)")
        names = split["val"]
    elif args.names:
        names = args.names
    metrics = evaluate(_model(args.model), args.data, names, args.score_threshold, device=args.device)
    text = json.dumps(_finite(metrics), indent=2, allow_nan=False)  # NaN (no nuclei of a kind) -> null
    print(text)
    if args.out:
        from .atomic import write_text_atomic

        write_text_atomic(args.out, text)
    return 0


def _model_and_new_file(args: argparse.Namespace, done: str) -> str:
    """The model a command reads (``--model`` or the bundled one), after checking that ``--out`` is another file."""
    model = _model(args.model)
    if Path(args.out).resolve() == Path(model).resolve():
        raise ValueError(f"{args.out}: is the model being {done}; write the {done} model to a new file")
    return model


def cmd_tune(args: argparse.Namespace) -> int:
    from .training import TrainConfig, tune_model

    model = _model_and_new_file(args, "tuned")
    m = tune_model(model, TrainConfig.from_yaml(args.config), args.out, args.score_thresholds, args.min_areas,
                   device=args.device)
    print(json.dumps(_finite(m), indent=2))
    print(f"tuned model: {args.out} (score threshold {m['score_threshold']:g}, smallest nucleus "
          f"{m['min_area_um2']:g} µm²: mean validation PQ {m['pq']:.4f})")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .training import average_models

    for m in args.models:
        if Path(args.out).resolve() == Path(m).resolve():
            raise ValueError(f"{args.out}: is one of the models being averaged; write the average to a new file")
    average_models(args.models, args.out)
    print(f"averaged model: {args.out} ({len(args.models)} models; settings and class temperature are "
          f"{Path(args.models[0]).name}'s until `wsiseg calibrate` and `wsiseg tune` measure the average)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_model
    from .training import TrainConfig, training_pools

    model = _model_and_new_file(args, "calibrated")
    cfg = TrainConfig.from_yaml(args.config)
    pools, _ = training_pools(cfg)
    samples = [s for p in pools for s in p.val if s.classes]
    if not samples:
        raise ValueError(f"{args.config}: no validation images with class labels to calibrate on")
    cal = calibrate_model(model, samples, args.out, args.min_probability, device=args.device)
    print(json.dumps(cal.as_dict(), indent=2))
    print(f"calibrated model: {args.out}")
    return 0


def _finite(obj):
    """``obj`` with every non-finite float replaced by None, so that it is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import write_stats

    s = write_stats(args.outdir, cell_um=args.density_cell_um)
    print(f"{s['nuclei']} nuclei, {s['density_per_mm2'] or 0:.1f} per mm² of tissue")
    for name, c in s["classes"].items():
        print(f"  {name:<16} {c['count']:>9}  {100 * c['fraction']:5.1f}%")
    print(f"report: {Path(args.outdir) / 'stats' / 'report.html'}")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by segment and batch: model, grid, device and outputs."""
    p.add_argument("--model", default=None, help="model .safetensors (default: the bundled model), or 'threshold'")
    p.add_argument("--tile-size", type=TILE, default=None, help="tile size in model pixels (default: model card)")
    p.add_argument("--overlap", type=OVERLAP, default=None, help="tile overlap in model pixels (default: model card)")
    p.add_argument("--batch-size", type=BATCH, default=None,
                   help="tiles per forward pass (default: 4 on the CPU, 32 tiles of 256² beside a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--on-oversize", default="error", choices=["error", "drop"],
                   help="what to do with a nucleus wider than the overlap allows")
    p.add_argument("--writer", default="process", choices=["process", "thread"],
                   help="run stitching and the writers in a low-priority process (default) or a thread")
    p.add_argument("--writer-workers", type=WORKERS, default=None,
                   help="processes that measure and outline nuclei for the writer "
                        "(default: 1 on the CPU, all cores but two beside a GPU)")
    p.add_argument("--geojson", default="geojson.gz", choices=["geojson", "geojson.gz", "none"])
    p.add_argument("--table", default="parquet", choices=["parquet", "csv"])
    p.add_argument("--no-zarr", action="store_true", help="skip the OME-Zarr label images")
    p.add_argument("--no-stats", action="store_true", help="skip the slide statistics and report")
    p.add_argument("--cell-expansion", type=_number(float, 0, 1000), default=5.0, metavar="UM",
                   help="grow each nucleus by this many µm into its cell, as QuPath's cell detection does "
                        "(default 5; 0: nuclei only, written as QuPath detections)")
    p.add_argument("--part-tiles", type=_number(int, 0, 10**7), default=256, metavar="N",
                   help="keep the model's outputs per part of N tiles (rounded up to whole batches) beside the "
                        "output until it is published, so that the same command run again after an interruption "
                        "continues from the finished parts (default 256; 0: keep none)")
    p.add_argument("--processes", type=_number(int, 1, 1024), default=1, metavar="N",
                   help="CPU: run the model over the parts in N processes, the cores divided between them "
                        "(default 1)")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a slide's properties and the tile grid segment would use")
    _add_slide_args(p)
    p.add_argument("--model", default=None, help="plan for this model (default: the bundled model)")
    p.add_argument("--model-mpp", type=MPP, default=None, help="model microns per pixel (default: the card's)")
    p.add_argument("--tile-size", type=TILE, default=None, help="default: the model card's")
    p.add_argument("--overlap", type=OVERLAP, default=None, help="default: the model card's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment and classify the nuclei of a slide")
    _add_slide_args(p)
    _add_run_args(p)
    p.add_argument("--out", default=None, help="output folder (default: <slide>-wsiseg)")
    p.add_argument("--workers", type=WORKERS, default=None,
                   help="tile reader threads (default: 2 on the CPU, a quarter of the cores beside a GPU)")
    p.add_argument("--prefetch", type=WORKERS, default=None,
                   help="tiles read ahead of the model (default: 8 on the CPU, two batches beside a GPU)")
    p.add_argument("--score-threshold", type=PROB, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--scheduler", default=None,
                   help="a Dask scheduler: its workers run the model over this slide's parts (the slide and the "
                        "model file must be at the same paths there); merging and writing stay here")
    p.add_argument("--density-cell-um", type=CELL_UM, default=100.0, help="density map cell size in µm")
    p.add_argument("--min-area-um2", type=AREA, default=None,
                   help="drop objects smaller than this, in µm² (default: the model card's)")
    p.set_defaults(func=cmd_segment)


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="segment many slides, resumably, on this machine or a Dask cluster")
    p.add_argument("slides", nargs="+", help="slide files, folders, glob patterns or .txt lists of paths")
    p.add_argument("--out", required=True, help="output folder: one subfolder per slide, manifest.json, cohort.csv")
    _add_run_args(p)
    p.add_argument("--workers", type=WORKERS, default=1, help="parallel slide workers (a Dask LocalCluster when > 1)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask distributed scheduler")
    p.add_argument("--mpp", type=MPP, default=None,
                   help="level-0 microns per pixel for slides that record none (a slide's own value wins)")
    p.add_argument("--force-mpp", action="store_true",
                   help="use --mpp for every slide, even those that record an mpp (each summary says so)")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"])
    p.add_argument("--region", default=None, help=argparse.SUPPRESS)
    p.add_argument("--whole-slide", action="store_true", help="analyse whole slides, skipping tissue detection")
    p.add_argument("--read-workers", type=WORKERS, default=2, help="tile reader threads per slide")
    p.set_defaults(func=cmd_batch)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a nucleus Mask R-CNN from a YAML config")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="run folder (default: the config's)")
    p.add_argument("--steps", type=_number(int, 1, 10_000_000), default=None)
    p.add_argument("--max-minutes", type=_number(float, 0, 1e6, low_open=True), default=None,
                   help="stop this sitting after this much training time (checkpointed; run again to resume)")
    p.add_argument("--init", default=None,
                   help="fine-tune: start from this model's weights ('default': the bundled model)")
    p.add_argument("--carry", default=None, metavar="DIR",
                   help="train nothing: copy what another machine needs to go on with the run (its last weights "
                        "without optimizer state, best model, logs) into DIR; then train with --out DIR")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="PQ, AJI, F1, Dice, COCO AP (and per class) of a model on labelled images")
    p.add_argument("--model", default=None, help="model file, or 'threshold' (default: the bundled model)")
    p.add_argument("--data", required=True, help="folder with images/, labels/, optional classes.csv")
    p.add_argument("--split", default=None, help="split.json of a training run: evaluate its validation images")
    p.add_argument("--names", nargs="*", default=None, help="image names to evaluate")
    p.add_argument("--score-threshold", type=PROB, default=None,
                   help="keep detections scoring at least this (default: the model card's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.set_defaults(func=cmd_evaluate)


def _add_model_config_out(p: argparse.ArgumentParser, config_help: str, done: str) -> None:
    """--model, --config and --out of a command that writes a changed copy of a model."""
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--out", required=True, help=f"the {done} model file to write")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a model's class temperature on the validation images of a training "
                                         "config (expected calibration error before and after)")
    _add_model_config_out(p, "training config whose validation images (with classes) are used", "calibrated")
    p.add_argument("--min-probability", type=PROB, default=None,
                   help="report a nucleus's class as uncertain below this probability (written to the card)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_calibrate)


def _add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of several runs of one network (a model soup)")
    p.add_argument("models", nargs="+", help="model files (.safetensors) of one network, classes and mpp")
    p.add_argument("--out", required=True, help="the averaged model file to write")
    p.set_defaults(func=cmd_average)


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="choose a model's score threshold and smallest nucleus on the validation "
                                    "images of a training config (best mean PQ; written to the card)")
    _add_model_config_out(p, "training config whose validation images are used", "tuned")
    p.add_argument("--score-thresholds", type=PROB, nargs="+", default=None, metavar="T",
                   help="score thresholds to try (default: the config's score_thresholds)")
    p.add_argument("--min-areas", type=AREA, nargs="+", default=None, metavar="UM2",
                   help="smallest nuclei to keep, in µm², to try (default: the config's min_areas_um2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_tune)


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="slide statistics and report of a segment output folder")
    p.add_argument("outdir", help="folder written by wsiseg segment")
    p.add_argument("--density-cell-um", type=CELL_UM, default=100.0, help="density map cell size in µm")
    p.set_defaults(func=cmd_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wsiseg", description="Nucleus segmentation for H&E whole-slide images")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_info, _add_segment, _add_batch, _add_train, _add_evaluate, _add_calibrate, _add_tune, _add_average,
                _add_stats):
        add(sub)
    return parser


EXIT_USAGE = 2  # bad input: a file, option, model or output path
EXIT_FAILED = 1  # the run failed (a slide of a batch, the writer process)
EXIT_RESOURCE = 3  # no space, read-only file system, permission denied
EXIT_DEVICE = 4  # the requested accelerator is absent
EXIT_SCHEDULER = 5  # the Dask scheduler cannot be reached
EXIT_INTERNAL = 70  # a bug of wsiseg's: please report it with --debug's traceback


# the command-line options that answer an error or warning the library raises in its own terms
HINTS = {
    "NucleusTooLargeError": "[options: --overlap N, or --on-oversize drop]",
    "MppUnknownError": "[option: --mpp, e.g. --mpp 0.25 for 40x]",
    "OutputExistsError": "[option: --overwrite]",
    "WriterProcessError": "[option: --writer thread]",
    "tissue='whole'": "[option: --whole-slide]",
}


BATCH_HINTS = {"no_mpp": "MppUnknownError"}


def _with_hint(message: str, kind: str) -> str:
    hint = HINTS.get(kind)
    return f"{message} {hint}" if hint else message


class _WarningHandler(logging.Handler):
    """The library's warnings on stderr, one line each, with the option that answers them."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        hint = next((h for k, h in HINTS.items() if k in msg), None)
        print(f"wsiseg: warning: {msg}" + (f" {hint}" if hint else ""), file=sys.stderr)


def _exit_code(exc: BaseException) -> tuple[int, str]:
    import errno

    from .errors import DeviceUnavailableError, SchedulerUnreachableError

    if isinstance(exc, (SlideError, ValueError, FileNotFoundError, FileExistsError, ModelLoadError,
                        NucleusTooLargeError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, _with_hint(str(exc), type(exc).__name__)
    if isinstance(exc, WriterProcessError):
        return EXIT_FAILED, _with_hint(str(exc), "WriterProcessError")
    if isinstance(exc, DeviceUnavailableError):
        return EXIT_DEVICE, str(exc)
    if isinstance(exc, SchedulerUnreachableError):
        return EXIT_SCHEDULER, str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}[exc.errno]
        return EXIT_RESOURCE, f"{exc.filename or ''}: {what}".lstrip(": ")
    return EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {exc}); run again with --debug for the traceback"


class _QuietPipe:
    """stdout that stops writing, without an error, once its reader has gone (``wsiseg ... | head -1``): the
    run goes on and its outputs are finished as if the reader were still there."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        self.closed_by_reader = True
        try:  # the interpreter's own flush at exit must not fail either
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    if not isinstance(sys.stdout, _QuietPipe) and sys.stdout is not None:
        sys.stdout = _QuietPipe(sys.stdout)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    log = logging.getLogger("wsiseg")
    if not any(isinstance(h, _WarningHandler) for h in log.handlers):
        log.addHandler(_WarningHandler(logging.WARNING))
        log.propagate = False
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("wsiseg: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        code, message = _exit_code(exc)
        print(f"wsiseg: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
