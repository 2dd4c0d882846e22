"""The ``wsiseg`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .slide import SlideError, open_slide

DEFAULT_MODEL_MPP = 0.5
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


def _add_slide_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file (SVS, TIFF, NDPI, MRXS, DICOM, PNG/JPEG with --mpp, ...)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 microns per pixel; overrides the file")
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


def cmd_info(args: argparse.Namespace) -> int:
    from .tiling import plan_slide

    slide = open_slide(args.slide, mpp=args.mpp, backend=args.backend)
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
        "mpp_source": "--mpp" if args.mpp is not None else ("file" if p.mpp_from_file else None),
        "objective_power": p.objective_power,
        "associated_images": list(p.associated_images),
    }
    if slide.mpp is not None:
        sp = plan_slide(slide, args.model_mpp, args.tile_size, args.overlap, tissue=_tissue(args, slide))
        info["plan"] = {
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
    print(f"model mpp        {plan['model_mpp']:g} (read level {plan['level']}, resize x{plan['resize_factor']:g})")
    print(f"model image      {plan['model_image_size'][0]} x {plan['model_image_size'][1]} px")
    print(f"tiles            {plan['tiles']} of {plan['grid'][0]} x {plan['grid'][1]} "
          f"({plan['tile_size']} px, overlap {plan['overlap']} px)")
    print(f"tissue           {plan['tissue_area_mm2']:.3f} mm² ({plan['tissue_source']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsiseg", description="Nucleus segmentation for H&E whole-slide images")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a slide's properties and the planned tile grid")
    _add_slide_args(p)
    p.add_argument("--model-mpp", type=float, default=DEFAULT_MODEL_MPP, help="model microns per pixel")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE)
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (SlideError, ValueError, FileNotFoundError) as exc:
        print(f"wsiseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
