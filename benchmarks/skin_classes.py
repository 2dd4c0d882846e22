"""Classes on skin: what each model calls the nuclei of hand-drawn regions of the bundled sample slide.

    python benchmarks/skin_classes.py MODEL.safetensors [MODEL2.safetensors ...] [--out benchmarks/results/skin_classes.json]

Segments ``examples/CMU-1-Small-Region.svs`` (20x skin) with each model as ``wsiseg segment`` does and counts, per
region of ``examples/skin/CMU-1-Small-Region.regions.geojson`` (QuPath annotations drawn by eye), the share of
nuclei called each class and the share whose class is uncertain (nucleus centroids inside the region). The
``(check)`` regions are never trained on: ``epidermis (check)`` holds nearly only keratinocytes (epithelial),
``dermis (check)`` fibroblasts (spindle) and a few inflammatory cells. The ``(train)`` regions are where
``examples/skin/skin_labels.py`` takes class labels from; read them as training fit, not as a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from shapely import contains_xy
from shapely.geometry import shape

sys.path.insert(0, str(Path(__file__).parent))
from common import SAMPLE_SLIDE as SLIDE  # noqa: E402
from common import segment_sample, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REGIONS = REPO / "examples" / "skin" / "CMU-1-Small-Region.regions.geojson"


def region_classes(table: pd.DataFrame, regions: dict) -> dict:
    """Per region: nuclei, the share called each class, and the share with an uncertain class."""
    out = {}
    for name, poly in regions.items():
        inside = table[contains_xy(poly, table.centroid_x_px.to_numpy(), table.centroid_y_px.to_numpy())]
        n = len(inside)
        share = (inside.class_name.value_counts() / max(n, 1)).round(3).to_dict()
        out[name] = {"nuclei": n, "class_share": share,
                     "uncertain_share": round(float(inside.class_uncertain.mean()) if n else 0.0, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "skin_classes.json"))
    args = ap.parse_args()
    doc = json.loads(REGIONS.read_text())
    regions = {f["properties"]["name"]: shape(f["geometry"]) for f in doc["features"]
               if not f["properties"]["name"].startswith("label region")}
    results = {}
    for model in args.models:
        _, table = segment_sample(model, cell_expansion_um=0.0)
        results[model] = region_classes(table, regions)
    classes = ["epithelial", "inflammatory", "spindle", "other"]
    print(f"| model | region | nuclei | {' | '.join(classes)} | uncertain |")
    print("|---|---|---|" + "---|" * (len(classes) + 1))
    for model, per in results.items():
        for name, r in per.items():
            print(f"| {Path(model).name} | {name} | {r['nuclei']} | "
                  + " | ".join(f"{100 * r['class_share'].get(c, 0):.0f}%" for c in classes)
                  + f" | {100 * r['uncertain_share']:.0f}% |")
    write_result(args.out, {"benchmark": "skin_classes", "slide": SLIDE.name, "regions": REGIONS.name,
                            "results": results})


if __name__ == "__main__":
    main()
