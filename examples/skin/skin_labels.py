"""Class labels for skin from region annotations: the nuclei of a segmented sample slide, labelled by where
they lie, as QuPath GeoJSON that ``wsiseg train`` reads (``datasets: [{path: ..., slide: ...}]``).

    wsiseg segment examples/CMU-1-Small-Region.svs --out wsiseg-out/CMU-1 --overwrite
    python examples/skin/skin_labels.py wsiseg-out/CMU-1 examples/skin/CMU-1-Small-Region.labels.geojson.gz
    python examples/skin/skin_labels.py wsiseg-out/CMU-1 examples/skin/CMU-1-Small-Region.dermis.geojson.gz \
        --label-region "label region 2"

The regions (``CMU-1-Small-Region.regions.geojson``, QuPath annotations drawn by eye; open them in QuPath over
the slide) say what is known: every nucleus the model found inside the ``label region`` rectangle is a training
nucleus (its outline is the model's); inside ``epidermis (train)`` its class is ``epithelial`` (stratified
squamous epithelium: keratinocytes, basal layer included), inside ``dermis (train)`` it takes the model's most
likely class (with ``--sure P`` only where that class is at least P likely; no class otherwise), and elsewhere
in the rectangle it has no class (the partial-label loss trains it as a nucleus only). ``--label-region "label
region 2"`` writes the second rectangle's nuclei (dermis only). The ``(check)`` regions
lie outside the rectangle and are never trained on: ``benchmarks/skin_classes.py`` counts the classes there.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from shapely.geometry import shape

HERE = Path(__file__).resolve().parent


def regions(path: Path) -> dict:
    """The named annotation polygons of a QuPath GeoJSON file."""
    doc = json.loads(path.read_text())
    return {f["properties"]["name"]: shape(f["geometry"]) for f in doc["features"]}


def label_nuclei(nuclei: list[dict], areas: dict, sure: float, label_region: str = "label region") -> list[dict]:
    """Detections (nucleus outlines) inside a label region, classified by the region rules above."""
    rect, epi, derm = areas[label_region], areas["epidermis (train)"], areas["dermis (train)"]
    colors = {c["name"]: c["color"] for f in nuclei if (c := (f.get("properties") or {}).get("classification"))}
    out = []
    for f in nuclei:
        geom = f.get("nucleusGeometry") or f["geometry"]
        c = shape(geom).centroid
        if not rect.contains(c):
            continue
        props = f.get("properties", {})
        cls = None
        if epi.contains(c):
            cls = "epithelial"
        elif derm.contains(c):
            m = props.get("measurements", {})
            probs = {k.split(": ", 1)[1]: v for k, v in m.items() if k.startswith("Class probability: ")}
            if probs and max(probs.values()) >= sure:
                cls = max(probs, key=probs.get)  # the model's most likely class, uncertain or not
        feat = {"type": "Feature", "geometry": geom, "properties": {"objectType": "detection"}}
        if cls:
            feat["properties"]["classification"] = {"name": cls, "color": colors.get(cls, [0, 200, 83])}
        out.append(feat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("segment_out", help="a `wsiseg segment` output folder of the sample slide")
    ap.add_argument("out", help="labels GeoJSON to write (.geojson or .geojson.gz)")
    ap.add_argument("--regions", default=str(HERE / "CMU-1-Small-Region.regions.geojson"))
    ap.add_argument("--label-region", default="label region", help="the rectangle whose nuclei to write")
    ap.add_argument("--sure", type=float, default=0.0,
                    help="dermis nuclei take the model's most likely class where it is at least this likely")
    args = ap.parse_args()
    seg = Path(args.segment_out)
    summary = json.loads((seg / "summary.json").read_text())
    src = next(seg.glob("*.geojson*"))
    with (gzip.open(src, "rt") if src.suffix == ".gz" else open(src)) as f:
        nuclei = json.load(f)["features"]
    feats = label_nuclei(nuclei, regions(Path(args.regions)), args.sure, args.label_region)
    doc = {"type": "FeatureCollection", "features": feats,
           "wsiseg_labels": {"outlines_from": summary.get("model"), "regions": Path(args.regions).name,
                             "label_region": args.label_region, "sure": args.sure}}
    text = json.dumps(doc, separators=(",", ":"))
    out = Path(args.out)
    if out.suffix == ".gz":
        with gzip.GzipFile(out, "wb", mtime=0) as g:
            g.write(text.encode())
    else:
        out.write_text(text)
    by = {}
    for f in feats:
        k = (f["properties"].get("classification") or {}).get("name", "(no class)")
        by[k] = by.get(k, 0) + 1
    print(f"{len(feats)} nuclei -> {out}: {by}")


if __name__ == "__main__":
    main()
