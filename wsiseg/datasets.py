"""Labelled nucleus images for training and evaluation: instance-label folders, COCO, QuPath GeoJSON.

Every source becomes a list of :class:`Sample` (an RGB image, its instance labels, each nucleus's class
where known, the nuclei whose mask is unknown, and the mpp). No torch here.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Sample:
    name: str
    image: np.ndarray  # RGB uint8
    instances: np.ndarray  # int32 instance ids, 0 background
    classes: dict[int, int]  # instance -> 0-based class; missing: unknown
    no_mask: set[int] = field(default_factory=set)  # instances whose mask is unknown (box only)
    mpp: float = 0.25


class InstanceFolder:
    """The ``images/``, ``labels/``, optional ``classes.csv`` and ``meta.json`` layout, held in memory."""

    def __init__(self, root: str | os.PathLike, names: list[str] | None = None, class_names: list[str] | None = None):
        from PIL import Image

        root = Path(root)
        if not (root / "images").is_dir() or not (root / "labels").is_dir():
            raise FileNotFoundError(f"{root}: expected images/ and labels/ folders")
        meta = json.loads((root / "meta.json").read_text()) if (root / "meta.json").exists() else {}
        self.mpp = float(meta.get("mpp", 0.25))
        self.class_names = class_names or meta.get("classes") or ["nucleus"]
        table: dict[str, dict[int, int]] = {}
        if (root / "classes.csv").exists():
            with open(root / "classes.csv") as f:
                for row in csv.DictReader(f):
                    if row["class"] in self.class_names:
                        table.setdefault(row["image"], {})[int(row["instance"])] = self.class_names.index(row["class"])
        files = {p.stem: p for p in (root / "images").iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif"}}
        wanted = sorted(files) if names is None else list(names)
        unknown = [n for n in wanted if n not in files]
        if unknown:
            raise ValueError(f"{root / 'images'}: no image named {', '.join(unknown[:5])}"
                             + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        if not wanted:
            raise ValueError(f"{root / 'images'}: holds no images (.png, .jpg, .tif)")
        self.samples = []
        for n in wanted:
            try:
                img = np.asarray(Image.open(files[n]).convert("RGB"))
                lab = np.asarray(Image.open(root / "labels" / f"{n}.png")).astype(np.int32)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{files[n]}: cannot read the image or its label map ({exc})") from None
            if lab.shape != img.shape[:2]:
                raise ValueError(f"{root / 'labels' / n}.png: shape {lab.shape} differs from its image {img.shape[:2]}")
            if table or (root / "classes.csv").exists():
                cls = table.get(n)
            else:  # no class labels: one class for a one-class model, unknown for several
                cls = {int(i): 0 for i in np.unique(lab)[1:]} if len(self.class_names) == 1 else {}
            self.samples.append(Sample(n, img, lab, dict(cls or {}), set(), self.mpp))

    def __len__(self) -> int:
        return len(self.samples)


def _paint(shape: tuple[int, int], boxes: list, polygons: list) -> np.ndarray:
    """An instance label image: box-only nuclei painted as rectangles first, then polygons (pixel-centre
    coordinates, x then y) over them; a pixel belongs to a polygon when its centre lies inside."""
    from skimage.draw import polygon as fill

    lab = np.zeros(shape, np.int32)
    for i, (x0, y0, x1, y1) in boxes:
        lab[max(0, int(round(y0))):max(0, int(round(y1))), max(0, int(round(x0))):max(0, int(round(x1)))] = i
    for i, rings in polygons:
        for r in rings:
            r = np.asarray(r, np.float64)
            if len(r) >= 3:
                rr, cc = fill(r[:, 1], r[:, 0], shape)
                lab[rr, cc] = i
    return lab


class CocoInstances:
    """COCO instance annotations: polygons or RLE masks, or only a box (a nucleus without a mask).

    Categories are the nucleus classes; an annotation whose category is not in ``class_names`` (or is
    absent) is a nucleus of unknown class. ``mpp`` applies to every image.
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike | None = None, mpp: float = 0.25,
                 class_names: list[str] | None = None):
        from PIL import Image
        from pycocotools import mask as mask_utils

        annotations = Path(annotations)
        try:
            coco = json.loads(annotations.read_text())
            cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
            imgs = coco["images"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{annotations}: not a COCO instance annotation file ({e})") from None
        root = Path(images) if images is not None else annotations.parent
        self.mpp = float(mpp)
        self.class_names = class_names or sorted(set(cats.values())) or ["nucleus"]
        by_image: dict[int, list] = {}
        for a in coco.get("annotations", []):
            by_image.setdefault(a["image_id"], []).append(a)
        self.samples = []
        for im in imgs:
            path = root / im["file_name"]
            if not path.exists():
                raise FileNotFoundError(f"{annotations}: image {path} does not exist")
            rgb = np.asarray(Image.open(path).convert("RGB"))
            h, w = rgb.shape[:2]
            lab = np.zeros((h, w), np.int32)
            classes, no_mask, boxes = {}, set(), []
            for k, a in enumerate(by_image.get(im["id"], []), start=1):
                name = cats.get(a.get("category_id"))
                if name in self.class_names:
                    classes[k] = self.class_names.index(name)
                seg = a.get("segmentation")
                if not seg:
                    x, y, bw, bh = a["bbox"]
                    boxes.append((k, (x, y, x + bw, y + bh)))
                    no_mask.add(k)
                    continue
                if isinstance(seg, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg.get("counts"), list):
                    rle = mask_utils.frPyObjects(seg, h, w)
                else:
                    rle = seg
                m = mask_utils.decode(rle).astype(bool)
                lab[m & (lab == 0)] = k
            if boxes:
                painted = _paint((h, w), boxes, [])
                lab = np.where(lab > 0, lab, painted)
            self.samples.append(Sample(Path(im["file_name"]).stem, rgb, lab, classes, no_mask, self.mpp))

    def __len__(self) -> int:
        return len(self.samples)


class GeoJSONRegion:
    """QuPath GeoJSON nuclei (level-0 pixel polygons) over a region of a slide, as one training sample.

    ``region`` is ``(x, y, width, height)`` in level-0 pixels; by default the bounding box of the
    polygons. A feature's ``classification.name`` is its class; features without one, or with a name
    not in ``class_names``, are nuclei of unknown class.
    """

    def __init__(self, slide: str | os.PathLike, geojson: str | os.PathLike,
                 region: tuple[int, int, int, int] | None = None, class_names: list[str] | None = None,
                 mpp: float | None = None):
        import gzip

        from .slide import open_slide

        geojson = Path(geojson)
        opener = gzip.open if geojson.suffix == ".gz" else open
        try:
            with opener(geojson, "rt") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{geojson}: not a GeoJSON file ({e})") from None
        feats = doc.get("features", []) if isinstance(doc, dict) else doc
        shapes = []
        for f in feats:
            # a QuPath cell's nucleus is its nucleusGeometry (its geometry is the whole cell)
            g = f.get("nucleusGeometry") or f.get("geometry") or {}
            polys = [g["coordinates"]] if g.get("type") == "Polygon" else (
                g["coordinates"] if g.get("type") == "MultiPolygon" else [])
            if not polys:
                continue
            name = ((f.get("properties") or {}).get("classification") or {}).get("name")
            shapes.append((name, [np.asarray(poly[0], np.float64) for poly in polys]))
        if not shapes:
            raise ValueError(f"{geojson}: no Polygon or MultiPolygon features")
        sl = open_slide(slide, mpp=mpp)
        if region is None:
            pts = np.concatenate([r for _, rings in shapes for r in rings])
            x0, y0 = np.floor(pts.min(0)).astype(int) - 8
            x1, y1 = np.ceil(pts.max(0)).astype(int) + 8
            x0, y0 = max(0, x0), max(0, y0)
            x1, y1 = min(sl.dimensions[0], x1), min(sl.dimensions[1], y1)
            region = (int(x0), int(y0), int(x1 - x0), int(y1 - y0))
        x, y, w, h = region
        named = sorted({n for n, _ in shapes if n})
        self.class_names = class_names or named or ["nucleus"]
        self.mpp = sl.mpp
        rgb = sl.read_region((x, y), 0, (w, h))
        classes, polygons = {}, []
        for k, (name, rings) in enumerate(shapes, start=1):
            if name in self.class_names:
                classes[k] = self.class_names.index(name)
            elif len(self.class_names) == 1 and name is None:
                classes[k] = 0
            polygons.append((k, [r - (x + 0.5, y + 0.5) for r in rings]))  # corners -> pixel centres
        lab = _paint((h, w), [], polygons)
        keep = set(np.unique(lab)[1:].tolist())
        classes = {k: c for k, c in classes.items() if k in keep}
        self.samples = [Sample(f"{Path(slide).stem}_{x}_{y}", np.ascontiguousarray(rgb), lab, classes, set(), self.mpp)]

    def __len__(self) -> int:
        return len(self.samples)


def load_dataset(data: str, class_names: list[str] | None = None, slide: str | None = None,
                 images: str | None = None, mpp: float | None = None):
    """An instance-label folder, a COCO ``.json`` (with ``images``), or a QuPath ``.geojson`` over ``slide``."""
    path = Path(data)
    if path.is_dir():
        return InstanceFolder(path, class_names=class_names)
    if path.name.endswith((".geojson", ".geojson.gz")):
        if slide is None:
            raise ValueError(f"{path}: GeoJSON annotations need the slide they were drawn on (slide: ...)")
        return GeoJSONRegion(slide, path, class_names=class_names, mpp=mpp)
    if path.suffix == ".json":
        return CocoInstances(path, images, mpp if mpp is not None else 0.25, class_names)
    raise FileNotFoundError(f"{path}: not an instance-label folder, COCO .json or QuPath .geojson")
