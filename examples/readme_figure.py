"""Draw the QuPath GeoJSON outlines of a `wsiseg segment` run over a region of its slide.

    python examples/readme_figure.py wsiseg-out/CMU-1 examples/CMU-1-Small-Region.svs docs/cmu1-nuclei.png

The outlines come from the GeoJSON (level-0 pixel coordinates), so the picture
also shows that they sit on the nuclei in the slide.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsiseg.slide import open_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("slide")
    ap.add_argument("png")
    ap.add_argument("--region", type=int, nargs=4, default=(900, 1000, 320, 240), metavar=("X", "Y", "W", "H"))
    ap.add_argument("--zoom", type=int, default=3)
    args = ap.parse_args()
    x, y, w, h = args.region
    z = args.zoom
    slide = open_slide(args.slide)
    rgb = cv2.resize(slide.read_region((x, y), 0, (w, h)), (w * z, h * z), interpolation=cv2.INTER_CUBIC)
    (gj,) = Path(args.outdir).glob("*.geojson*")
    opener = gzip.open if gj.suffix == ".gz" else open
    with opener(gj, "rt") as f:
        features = json.load(f)["features"]
    for feat in features:
        ring = np.asarray(feat.get("nucleusGeometry", feat["geometry"])["coordinates"][0], np.float64)
        if ring[:, 0].max() < x or ring[:, 0].min() > x + w or ring[:, 1].max() < y or ring[:, 1].min() > y + h:
            continue
        cls = feat["properties"].get("classification")  # none: the class is uncertain (QuPath: unclassified)
        colour = tuple(int(c) for c in cls["color"]) if cls else (160, 160, 160)
        pts = np.round((ring - (x, y)) * z * 4).astype(np.int32)  # 2 fractional bits for cv2's shift
        cv2.polylines(rgb, [pts], True, colour, 2, cv2.LINE_AA, shift=2)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(args.png, optimize=True)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
