"""Audit a `wsiseg segment` output folder with the readers users use.

    python examples/audit_outputs.py wsiseg-out/CMU-1

Prints, and exits non-zero unless all are zero: pairs of GeoJSON nuclei that overlap with IoU > 0.3, table ids
missing from the OME-Zarr label image, nuclei whose label-image area differs from the table's by more than 10%,
and OME-Zarr 0.5 validation errors (ome-zarr-models).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from shapely import STRtree
from shapely.geometry import shape


def audit(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    stem = Path(summary["slide"]).stem
    gj_path = next(out.glob(f"{stem}.geojson*"))
    opener = gzip.open if gj_path.suffix == ".gz" else open
    with opener(gj_path, "rt") as f:
        polys = [shape(ft.get("nucleusGeometry", ft["geometry"])) for ft in json.load(f)["features"]]
    tree = STRtree(polys)
    dup = 0
    for i, j in zip(*tree.query(polys, predicate="intersects")):
        if i < j:
            inter = polys[i].intersection(polys[j]).area
            dup += inter / (polys[i].area + polys[j].area - inter) > 0.3
    table = pd.read_parquet(next(out.glob(f"{stem}.nuclei.*")))
    root = zarr.open_group(str(out / f"{stem}.ome.zarr"), mode="r")
    labels = root["labels/nuclei/0"][0]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    mpp = summary["model_mpp"]
    table_px = table.set_index("id")["area_um2"] / mpp**2
    missing = sorted(set(table["id"]) - set(ids.tolist()))
    present = [(i, c) for i, c in zip(ids, counts) if i in table_px.index]
    off = sum(abs(c - table_px[i]) > 0.1 * table_px[i] for i, c in present)
    errors = []
    try:
        from ome_zarr_models.v05 import Image

        Image.from_zarr(root)
    except ImportError:
        errors.append("ome-zarr-models not installed")
    except Exception as exc:  # the validator's own message is the result
        errors.append(str(exc).splitlines()[0])
    return {"nuclei": len(table), "duplicate_pairs_iou_gt_0.3": int(dup), "ids_missing_from_labels": len(missing),
            "area_disagreements_gt_10pct": int(off), "ome_zarr_0.5_errors": errors}


if __name__ == "__main__":
    result = audit(Path(sys.argv[1]))
    print(json.dumps(result, indent=2))
    bad = any(v for k, v in result.items() if k != "nuclei")
    sys.exit(1 if bad else 0)
