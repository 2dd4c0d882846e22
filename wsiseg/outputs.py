"""Streaming writers: OME-Zarr labels, QuPath GeoJSON, the per-nucleus table.

Every writer writes to a hidden temporary name and renames on ``close()``
(``wsiseg.atomic``); a run that stops early leaves only ``.*.partial`` names behind.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np

from .atomic import commit, discard, temporary_name
from .card import ModelCard
from .features import CELL_COLUMNS, FEATURE_COLUMNS
from .stitching import Nucleus
from .tiling import ReadPlan, Tile, TileGrid

UUID_NAMESPACE = uuid.UUID("2f1b6a8e-8c1e-4f55-9a53-3c1f7b7d9e01")


def nucleus_uuid(slide_name: str, nucleus_id: int) -> str:
    """A UUID that is the same for the same nucleus id of the same slide in every run."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{slide_name}/{nucleus_id}"))


# --------------------------------------------------------------------- polygons
SIMPLIFY_SLIDE_PX = 0.25
SIMPLIFY_MAX_AREA_CHANGE = 0.01  # ... as long as the area stays within 1%


def mask_polygon(mask: np.ndarray, x0: int, y0: int, scale: float,
                 tolerance: float = SIMPLIFY_SLIDE_PX) -> list[list[float]] | None:
    """Closed outer ring of a boolean crop, in level-0 pixel-corner coordinates (y down), 2 decimals.

    The ring runs through pixel-edge midpoints (marching squares at 0.5), so its area is the pixel count less
    a small corner correction; it is then simplified (Douglas-Peucker, topology kept) within ``tolerance``
    level-0 pixels, or a tighter one where that would change the area by more than 1%, and only ever into a
    valid polygon (QuPath refuses a whole file for one invalid polygon). ``tolerance`` 0: not simplified.
    """
    import shapely
    from shapely.geometry import Polygon
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    if not contours:
        return None
    c = max(contours, key=len)
    # (row, col) in padded index space -> pixel-corner coordinates
    xs = (c[:, 1] - 1 + 0.5 + x0) * scale
    ys = (c[:, 0] - 1 + 0.5 + y0) * scale
    poly = Polygon(np.round(np.column_stack([xs, ys]), 2))
    if not poly.is_valid:
        poly = poly.buffer(0)
        if poly.geom_type == "MultiPolygon":
            poly = max(poly.geoms, key=lambda p: p.area)
    if poly.is_empty or poly.area <= 0 or poly.geom_type != "Polygon":
        return None
    poly = orient(poly, sign=1.0)
    coords = np.round(shapely.get_coordinates(poly.exterior), 2)
    if tolerance > 0:
        coords = _simplified(coords, tolerance)
    coords = coords.tolist()
    if len(coords) < 4:
        return None
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    return coords


def _simplified(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """``ring`` simplified within ``tolerance`` (then 40%, 16% of it) where the result, rounded as written, is
    a valid polygon of at least 4 points whose area is within 1% of the ring's; else ``ring`` itself."""
    import shapely

    area = float(shapely.area(shapely.polygons(ring)))
    for tol in (tolerance, 0.4 * tolerance, 0.16 * tolerance):
        simple = shapely.simplify(shapely.linearrings(ring), tol, preserve_topology=True)
        pts = np.round(shapely.get_coordinates(simple), 2)
        if len(pts) < 4:
            continue
        poly = shapely.polygons(pts)
        if shapely.is_valid(poly) and abs(float(shapely.area(poly)) - area) <= SIMPLIFY_MAX_AREA_CHANGE * area:
            return pts
    return ring


def prob_column(class_name: str) -> str:
    """The table column of a class's probability: ``prob_`` and the name in snake case."""
    import re

    return "prob_" + (re.sub(r"\W+", "_", class_name.strip().lower()).strip("_") or "class")


def class_columns(card: ModelCard) -> list[str]:
    """The class-probability columns of a model with several classes (none for one class)."""
    if len(card.classes) < 2:
        return []
    return [prob_column(c.name) for c in card.classes] + ["class_probability", "class_uncertain"]


def nucleus_record(n: Nucleus, plan: ReadPlan, slide_name: str, card: ModelCard) -> dict:
    """The table row of a nucleus: ids, centroid in level-0 px and µm, area, class, score and features.

    The colour features come from the nucleus's own pixels (``n.rgb``, the tile's pixels over its box);
    without them they are NaN. A model with several classes adds each class's probability given that the
    object is a nucleus (``prob_<class>``, calibrated), the most likely class's (``class_probability``) and
    ``class_uncertain``: that probability is below the card's ``class_min_probability``.
    """
    from .features import cell_features, nucleus_features

    rgb, have = n.pixels_over(n.box) or (None, None)
    feats = nucleus_features(n.mask, rgb, plan.model_mpp, have)
    if n.cell_mask is not None:
        cx0, cy0, cx1, cy1 = n.cell_box
        inner = np.zeros(n.cell_mask.shape, bool)
        x0, y0, x1, y1 = n.box
        inner[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = n.mask
        rgb, have = n.pixels_over(n.cell_box) or (None, None)
        feats.update(cell_features(n.cell_mask, inner, rgb, plan.model_mpp, have))
    f = plan.level0_per_model_px
    cx, cy = n.centroid[0] * f, n.centroid[1] * f
    cls = card.classes[n.label] if 0 <= n.label < len(card.classes) else None
    return {
        "id": n.id,
        "uuid": nucleus_uuid(slide_name, n.id),
        "centroid_x_px": round(cx, 2),
        "centroid_y_px": round(cy, 2),
        "centroid_x_um": round(cx * plan.level0_mpp, 3),
        "centroid_y_um": round(cy * plan.level0_mpp, 3),
        "area_um2": round(n.area * plan.model_mpp**2, 3),
        "class_id": n.label + 1,
        "class_name": cls.name if cls else "unknown",
        "score": round(float(n.score), 4),
        "bbox_x0_px": round(n.box[0] * f, 2),
        "bbox_y0_px": round(n.box[1] * f, 2),
        "bbox_x1_px": round(n.box[2] * f, 2),
        "bbox_y1_px": round(n.box[3] * f, 2),
        **{k: round(v, 4) for k, v in feats.items()},
        **_class_probabilities(n, card),
    }


def _class_probabilities(n: Nucleus, card: ModelCard) -> dict:
    if len(card.classes) < 2:
        return {}
    if n.probs is None or len(n.probs) != len(card.classes):  # a model that gives no probabilities: certain
        probs = np.zeros(len(card.classes), np.float32)
        probs[n.label] = 1.0
    else:
        probs = n.probs
    out = {prob_column(c.name): round(float(p), 4) for c, p in zip(card.classes, probs)}
    top = float(probs[n.label])
    out["class_probability"] = round(top, 4)
    out["class_uncertain"] = bool(top < card.class_min_probability)
    return out


# ---------------------------------------------------------------------- GeoJSON
# QuPath's names for the table's measurements: perimeters as its cell detection (WatershedCellDetection) writes
# them, the other shape features as qupath.lib.analysis.features.ObjectMeasurements does, "Detection
# probability" as its StarDist and InstanSeg extensions write a detector's score; the table keeps snake_case
QUPATH_NAMES = {
    "score": "Detection probability",
    "area_um2": "Nucleus: Area µm^2",
    "perimeter_um": "Nucleus: Perimeter µm",
    "circularity": "Nucleus: Circularity",
    "solidity": "Nucleus: Solidity",
    "max_diameter_um": "Nucleus: Max diameter µm",
    "min_diameter_um": "Nucleus: Min diameter µm",
    "hematoxylin_od": "Nucleus: Hematoxylin OD mean",
    "eosin_od": "Nucleus: Eosin OD mean",
    "eccentricity": "Nucleus: Eccentricity",
    "equivalent_diameter_um": "Nucleus: Equivalent diameter µm",
    "major_axis_um": "Nucleus: Major axis µm",
    "minor_axis_um": "Nucleus: Minor axis µm",
    "orientation_deg": "Nucleus: Orientation °",
    "mean_r": "Nucleus: Red mean",
    "mean_g": "Nucleus: Green mean",
    "mean_b": "Nucleus: Blue mean",
    "cell_area_um2": "Cell: Area µm^2",
    "cell_perimeter_um": "Cell: Perimeter µm",
    "cell_circularity": "Cell: Circularity",
    "cell_solidity": "Cell: Solidity",
    "cell_max_diameter_um": "Cell: Max diameter µm",
    "cell_min_diameter_um": "Cell: Min diameter µm",
    "nucleus_cell_area_ratio": "Nucleus/Cell area ratio",
    "cell_hematoxylin_od": "Cell: Hematoxylin OD mean",
    "cell_eosin_od": "Cell: Eosin OD mean",
    "cytoplasm_hematoxylin_od": "Cytoplasm: Hematoxylin OD mean",
    "cytoplasm_eosin_od": "Cytoplasm: Eosin OD mean",
    "class_probability": "Class probability",
    "centroid_x_um": "Centroid X µm",
    "centroid_y_um": "Centroid Y µm",
    "id": "Nucleus ID",
}


def qupath_measurements(record: dict, card: ModelCard) -> dict[str, float]:
    """A table record's measurements under QuPath's names (finite numbers only, as QuPath keeps them)."""
    out = {}
    for key, name in QUPATH_NAMES.items():
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = v
    if len(card.classes) > 1:
        for c in card.classes:
            v = record.get(prob_column(c.name))
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[f"Class probability: {c.name}"] = v
    return out


def geojson_feature(n: Nucleus, record: dict, plan: ReadPlan, card: ModelCard) -> str | None:
    """A nucleus as a QuPath detection, or with its cell as a QuPath cell (the cell as ``geometry``, the
    nucleus as ``nucleusGeometry`` beside it, where QuPath reads it), with its measurements under QuPath's
    names (compact JSON text)."""
    f = plan.level0_per_model_px
    coords = mask_polygon(n.mask, n.box[0], n.box[1], f)
    if coords is None:
        return None
    cell = None
    if n.cell_mask is not None:
        cell = mask_polygon(n.cell_mask, n.cell_box[0], n.cell_box[1], f)
    cls = card.classes[n.label] if 0 <= n.label < len(card.classes) else None
    properties: dict = {"objectType": "cell" if cell is not None else "detection"}
    if not record.get("class_uncertain", False):  # QuPath shows an object without one as unclassified
        properties["classification"] = {"name": cls.name if cls else "unknown",
                                        "color": list(cls.color) if cls else [128, 128, 128]}
    properties["measurements"] = qupath_measurements(record, card)
    feature = {"type": "Feature", "id": record["uuid"]}
    if cell is not None:
        feature["geometry"] = {"type": "Polygon", "coordinates": [cell]}
        feature["nucleusGeometry"] = {"type": "Polygon", "coordinates": [coords]}
    else:
        feature["geometry"] = {"type": "Polygon", "coordinates": [coords]}
    feature["properties"] = properties
    return json.dumps(feature, separators=(",", ":"), ensure_ascii=False)


class GeoJSONWriter:
    """A QuPath-readable FeatureCollection of detections, written one feature at a time."""

    def __init__(self, path: str | os.PathLike, plan: ReadPlan, card: ModelCard):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.plan, self.card = plan, card
        raw = open(self.tmp, "wb")
        self._raw = raw
        gz = self.path.suffix == ".gz"
        self._gz = gzip.GzipFile(filename=self.path.name, fileobj=raw, mode="wb", compresslevel=6, mtime=0) if gz else None
        self._f = io.TextIOWrapper(self._gz or raw, encoding="utf-8")
        self._f.write('{"type":"FeatureCollection","features":[\n')
        self.count = 0

    def write(self, n: Nucleus, record: dict) -> None:
        self.write_feature(geojson_feature(n, record, self.plan, self.card))

    def write_feature(self, text: str | None) -> None:
        """Append one feature made by :func:`geojson_feature` (``None``: a nucleus without an outline)."""
        if text is None:
            return
        if self.count:
            self._f.write(",\n")
        self._f.write(text)
        self.count += 1

    def close(self) -> Path:
        self._f.write("\n]}\n")
        self._f.flush()
        self._f.detach()
        if self._gz is not None:
            self._gz.close()
        self._raw.close()
        commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            discard(self.tmp)


# ------------------------------------------------------------------------ table
TABLE_COLUMNS = ["id", "uuid", "centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um", "area_um2",
                 "class_id", "class_name", "score", "bbox_x0_px", "bbox_y0_px", "bbox_x1_px", "bbox_y1_px",
                 *FEATURE_COLUMNS]


def extra_columns(card: ModelCard, cells: bool) -> list[str]:
    """The table's columns beyond ``TABLE_COLUMNS``: class probabilities (a model with several classes) and
    the cell's measurements (with cells)."""
    return class_columns(card) + (list(CELL_COLUMNS) if cells else [])


class TableWriter:
    """The per-nucleus table as Parquet (row groups of ``batch`` rows) or CSV, by file suffix.

    Rows wait for their row group in preallocated typed column buffers (about
    200 bytes a row), never as Python objects, so memory stays flat however
    many nuclei a slide has.
    """

    def __init__(self, path: str | os.PathLike, batch: int = 50_000, extra_cols: list[str] | tuple = ()):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.batch = batch
        self.count = 0
        self.kind = "csv" if self.path.suffix == ".csv" else "parquet"
        self.extra_cols = list(extra_cols)
        self._writer = None
        if self.kind == "csv":
            self._fh = open(self.tmp, "w", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._fh, fieldnames=TABLE_COLUMNS + self.extra_cols, extrasaction="ignore")
            self._csv.writeheader()
        else:
            self.schema = self._schema(self.extra_cols)
            self._numeric = {f.name: np.empty(batch, f.type.to_pandas_dtype()) for f in self.schema
                             if f.type.to_pandas_dtype() is not np.object_}
            self._text = {f.name: [] for f in self.schema if f.name not in self._numeric}
            self._n = 0

    @staticmethod
    def _schema(extra_cols: list[str] = ()):
        import pyarrow as pa

        return pa.schema([
            ("id", pa.uint32()), ("uuid", pa.string()),
            ("centroid_x_px", pa.float64()), ("centroid_y_px", pa.float64()),
            ("centroid_x_um", pa.float64()), ("centroid_y_um", pa.float64()),
            ("area_um2", pa.float64()), ("class_id", pa.int16()), ("class_name", pa.string()),
            ("score", pa.float32()), ("bbox_x0_px", pa.float64()), ("bbox_y0_px", pa.float64()),
            ("bbox_x1_px", pa.float64()), ("bbox_y1_px", pa.float64()),
            *[(c, pa.float32()) for c in FEATURE_COLUMNS],
            *[(c, pa.bool_() if c == "class_uncertain" else pa.float32()) for c in extra_cols],
        ])

    def write(self, record: dict) -> None:
        self.count += 1
        if self.kind == "csv":
            self._csv.writerow(record)
            return
        i = self._n
        for k, col in self._numeric.items():
            col[i] = record.get(k, False if col.dtype == bool else math.nan)
        for k, col in self._text.items():
            col.append(record.get(k))
        self._n = i + 1
        if self._n >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if self.kind == "csv":
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        if self._n:
            n = self._n
            cols = [pa.array(self._numeric[f.name][:n], f.type) if f.name in self._numeric
                    else pa.array(self._text[f.name], f.type) for f in self.schema]
            self._writer.write_table(pa.Table.from_arrays(cols, schema=self.schema))
        self._text = {k: [] for k in self._text}
        self._n = 0

    def close(self) -> Path:
        self._flush()  # a slide without nuclei still gets a valid, empty table
        if self.kind == "csv":
            self._fh.close()
        else:
            self._writer.close()
        commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self.kind == "csv":
                self._fh.close()
            elif self._writer is not None:
                self._writer.close()
        finally:
            discard(self.tmp)


# ---------------------------------------------------------------------- OME-Zarr
def _axes(unit: str = "micrometer") -> list[dict]:
    return [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": unit},
            {"name": "x", "type": "space", "unit": unit}]


def _multiscales(name: str, n_levels: int, mpp: float, base_factor: int = 1, method: str = "") -> list[dict]:
    datasets = [
        {"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * base_factor * 2**i, mpp * base_factor * 2**i]}]}
        for i in range(n_levels)
    ]
    ms = {"name": name, "axes": _axes(), "datasets": datasets}
    if method:
        ms["type"] = method
    return [ms]


def _n_levels(h: int, w: int, min_size: int = 512) -> int:
    n = 1
    while max(h, w) / 2**n >= min_size:
        n += 1
    return n


class ChunkBuffer:
    """Collects rectangle writes into a 2-D chunked Zarr array ``(c, y, x)`` and writes each chunk once, whole.

    ``rects`` are all the ``(y0, x0, y1, x1)`` rectangles that will be written
    (each once). A chunk is written when the last rectangle touching it
    arrives, so no chunk is read back and re-compressed per tile. Past
    ``max_bytes`` of buffers, the oldest buffer is written as it stands and
    later rectangles in its chunk go straight to the array.
    """

    def __init__(self, array, rects: list[tuple[int, int, int, int]], max_bytes: int = 96 << 20):
        self.array = array
        _, self.cy, self.cx = array.chunks
        self.max_bytes = max_bytes
        self.pending: dict[tuple[int, int], int] = {}
        for r in rects:
            for key in self._chunks(r):
                self.pending[key] = self.pending.get(key, 0) + 1
        self.buffers: dict[tuple[int, int], np.ndarray] = {}
        self.spilled: set[tuple[int, int]] = set()
        self.nbytes = 0
        self.max_nbytes = 0

    def _chunks(self, rect: tuple[int, int, int, int]):
        y0, x0, y1, x1 = rect
        for i in range(y0 // self.cy, -(-y1 // self.cy)):
            for j in range(x0 // self.cx, -(-x1 // self.cx)):
                yield (i, j)

    def _bounds(self, key: tuple[int, int]) -> tuple[int, int, int, int]:
        _, H, W = self.array.shape
        y, x = key[0] * self.cy, key[1] * self.cx
        return y, x, min(y + self.cy, H), min(x + self.cx, W)

    def write(self, rect: tuple[int, int, int, int], data: np.ndarray) -> None:
        """Write ``data`` (``(c, y1 - y0, x1 - x0)``) at ``rect``."""
        y0, x0, y1, x1 = rect
        if y1 <= y0 or x1 <= x0:
            return
        for key in self._chunks(rect):
            by0, bx0, by1, bx1 = self._bounds(key)
            iy0, ix0, iy1, ix1 = max(y0, by0), max(x0, bx0), min(y1, by1), min(x1, bx1)
            part = data[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            self.pending[key] -= 1
            if key in self.spilled:
                self.array[:, iy0:iy1, ix0:ix1] = part
                continue
            buf = self.buffers.get(key)
            if buf is None:
                buf = np.full((data.shape[0], by1 - by0, bx1 - bx0), self.array.fill_value, self.array.dtype)
                self.buffers[key] = buf
                self.nbytes += buf.nbytes
            buf[:, iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0] = part
            if self.pending[key] <= 0:
                self._flush(key)
        self.max_nbytes = max(self.max_nbytes, self.nbytes)
        while self.nbytes > self.max_bytes and self.buffers:
            key = next(iter(self.buffers))
            self._flush(key)
            self.spilled.add(key)

    def _flush(self, key: tuple[int, int]) -> None:
        buf = self.buffers.pop(key)
        self.nbytes -= buf.nbytes
        by0, bx0, by1, bx1 = self._bounds(key)
        self.array[:, by0:by1, bx0:bx1] = buf

    def close(self) -> None:
        """Write what is still buffered (chunks some rectangle never reached)."""
        for key in list(self.buffers):
            self._flush(key)


class ZarrWriter:
    """OME-Zarr 0.5 (Zarr v3): an RGB preview image with ``labels/nuclei`` and ``labels/classes``.

    Labels are at the model's resolution (``model_mpp`` µm per pixel); the
    preview image at ``image_downsample`` times coarser. Each tile's core is
    painted once its neighbours are done, so only the nuclei of tiles still
    bordering unfinished tiles are held in memory.
    """

    def __init__(self, path: str | os.PathLike, grid: TileGrid, plan: ReadPlan, card: ModelCard, slide_name: str,
                 chunk: int = 512, image_downsample: int = 4, cells: bool = False):
        import zarr
        from zarr.codecs import BloscCodec

        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        discard(self.tmp)
        self.grid, self.plan, self.card, self.slide_name = grid, plan, card, slide_name
        self.chunk = chunk
        # each tile rewrites the preview chunk it falls in: small chunks keep that cheap
        self.preview_chunk = max(64, chunk // 2)
        self.d = max(1, int(image_downsample))
        H, W = grid.height, grid.width
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        comp = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
        ih, iw = math.ceil(H / self.d), math.ceil(W / self.d)
        # OME-Zarr 0.5: an image's labels have as many multiscale levels as the image
        self.label_levels = self.image_levels = _n_levels(H, W)
        self.images = [self.root.create_array(
            str(i), shape=(3, max(1, ih >> i), max(1, iw >> i)), chunks=(3, self.preview_chunk, self.preview_chunk),
            dtype="uint8", fill_value=255, compressors=comp, dimension_names=("c", "y", "x")) for i in range(self.image_levels)]
        labels = self.root.create_group("labels")
        self.nuclei_grp = labels.create_group("nuclei")
        self.classes_grp = labels.create_group("classes")
        self.nuclei = [self.nuclei_grp.create_array(
            str(i), shape=(1, max(1, H >> i), max(1, W >> i)), chunks=(1, chunk, chunk), dtype="uint32",
            fill_value=0, compressors=comp, dimension_names=("c", "y", "x")) for i in range(self.label_levels)]
        self.classes = [self.classes_grp.create_array(
            str(i), shape=(1, max(1, H >> i), max(1, W >> i)), chunks=(1, chunk, chunk), dtype="uint8",
            fill_value=0, compressors=comp, dimension_names=("c", "y", "x")) for i in range(self.label_levels)]
        self.cells_grp = labels.create_group("cells") if cells else None
        self.cells = [self.cells_grp.create_array(
            str(i), shape=(1, max(1, H >> i), max(1, W >> i)), chunks=(1, chunk, chunk), dtype="uint32",
            fill_value=0, compressors=comp, dimension_names=("c", "y", "x")) for i in range(self.label_levels)] \
            if cells else []
        self._pos = {(t.row, t.col): t for t in grid.tiles}
        # cells whose core is painted: every tile's, and the tissue-free cores beside them, which the nuclei
        # of a tile may reach
        rows, cols = grid.shape
        self._cells = {(r + dr, c + dc) for r, c in self._pos for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                       if 0 <= r + dr < rows and 0 <= c + dc < cols}
        cores = [self._core(rc) for rc in sorted(self._cells)]
        self._ids_out = ChunkBuffer(self.nuclei[0], cores)
        self._cls_out = ChunkBuffer(self.classes[0], cores)
        self._cell_out = ChunkBuffer(self.cells[0], cores) if cells else None
        self._preview_out = ChunkBuffer(self.images[0], [self._preview_rect(t) for t in grid.tiles])
        self._done: set[tuple[int, int]] = set()
        self._painted: set[tuple[int, int]] = set()
        self._nuclei: dict[tuple[int, int], list[Nucleus]] = {}
        self.max_held = 0

    def _core(self, rc: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a cell's core."""
        xb, yb = self.grid.x_bounds, self.grid.y_bounds
        return (yb[rc[0]], xb[rc[1]], yb[rc[0] + 1], xb[rc[1] + 1])

    def _around(self, rc: tuple[int, int], within: set | dict):
        r, c = rc
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (r + dr, c + dc) in within:
                    yield (r + dr, c + dc)

    def add_final(self, tile: Tile, nuclei: list[Nucleus]) -> None:
        """A tile's final nuclei (disjoint from all others): hold them, paint the cores now complete."""
        rc = (tile.row, tile.col)
        self._nuclei[rc] = nuclei
        self._done.add(rc)
        newly = []
        for cell in self._around(rc, self._cells):
            if cell not in self._painted and all(x in self._done for x in self._around(cell, self._pos)):
                self._paint(cell)
                newly.append(cell)
        self.max_held = max(self.max_held, sum(len(v) for v in self._nuclei.values()))
        # a tile's nuclei are needed until every core they may reach is painted
        for p in newly:
            for nb in self._around(p, self._pos):
                if nb in self._nuclei and all(x in self._painted for x in self._around(nb, self._cells)):
                    del self._nuclei[nb]

    def _preview_rect(self, tile: Tile) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the preview pixels the tile's core reaches (inside the preview, as the core is
        inside the image and the preview is ``ceil(extent / d)`` long)."""
        x0, y0, x1, y1 = tile.core
        d = self.d
        return (y0 // d, x0 // d, -(-y1 // d), -(-x1 // d))

    def write_preview(self, tile: Tile, pixels: np.ndarray) -> None:
        import cv2

        rect = self._preview_rect(tile)
        py0, px0, py1, px1 = rect
        d = self.d
        crop = pixels[py0 * d - tile.y : py1 * d - tile.y, px0 * d - tile.x : px1 * d - tile.x]
        if d > 1:
            crop = cv2.resize(crop, (px1 - px0, py1 - py0), interpolation=cv2.INTER_AREA)
        self._preview_out.write(rect, np.moveaxis(crop, -1, 0))

    def _paint(self, rc: tuple[int, int]) -> None:
        y0, x0, y1, x1 = self._core(rc)
        ids = np.zeros((y1 - y0, x1 - x0), np.uint32)
        cls = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cands = [n for nb in self._around(rc, self._pos) for n in self._nuclei.get(nb, [])]
        cands.sort(key=lambda n: (-n.score, n.id))
        for n in cands:
            bx0, by0, bx1, by1 = n.box
            ix0, iy0, ix1, iy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            m = n.mask[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
            dst = ids[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            free = m & (dst == 0)
            dst[free] = n.id
            cls[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][free] = n.label + 1
        self._ids_out.write((y0, x0, y1, x1), ids[None])
        self._cls_out.write((y0, x0, y1, x1), cls[None])
        if self._cell_out is not None:  # cells are disjoint: each pixel gets at most one
            cell_ids = np.zeros((y1 - y0, x1 - x0), np.uint32)
            for n in cands:
                if n.cell_mask is None:
                    continue
                bx0, by0, bx1, by1 = n.cell_box
                ix0, iy0, ix1, iy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
                if ix1 > ix0 and iy1 > iy0:
                    m = n.cell_mask[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
                    cell_ids[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][m] = n.id
            self._cell_out.write((y0, x0, y1, x1), cell_ids[None])
        self._painted.add(rc)

    def _pyramid(self, arrays: list, mode: str) -> None:
        import cv2

        step = self.chunk * 2
        for i in range(1, len(arrays)):
            src, dst = arrays[i - 1], arrays[i]
            _, H, W = src.shape
            for y in range(0, H, step):
                for x in range(0, W, step):
                    block = src[:, y : y + step, x : x + step]
                    if mode == "nearest":
                        out = block[:, ::2, ::2]
                    else:
                        hwc = np.moveaxis(block, 0, -1)
                        h2, w2 = max(1, hwc.shape[0] // 2), max(1, hwc.shape[1] // 2)
                        out = np.moveaxis(cv2.resize(hwc, (w2, h2), interpolation=cv2.INTER_AREA), -1, 0)
                        if out.ndim == 2:
                            out = out[None]
                    oy, ox = y // 2, x // 2
                    _, dh, dw = dst.shape
                    out = out[:, : dh - oy, : dw - ox]
                    dst[:, oy : oy + out.shape[1], ox : ox + out.shape[2]] = out

    def close(self, colors_limit: int = 0) -> Path:
        missing = [rc for rc in self._cells if rc not in self._painted]
        if missing:
            raise RuntimeError(f"{len(missing)} tiles were never completed; the label image would be incomplete")
        for buf in (self._ids_out, self._cls_out, self._preview_out, self._cell_out):
            if buf is not None:
                buf.close()
        self._pyramid(self.images, "area")
        self._pyramid(self.nuclei, "nearest")
        self._pyramid(self.classes, "nearest")
        if self.cells:
            self._pyramid(self.cells, "nearest")
        mpp = self.plan.model_mpp
        self.root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": _multiscales(f"{self.slide_name} (preview)", self.image_levels, mpp, self.d, "area"),
            "omero": {
                "channels": [{"label": c, "color": col, "window": {"min": 0, "max": 255, "start": 0, "end": 255},
                              "active": True} for c, col in zip("RGB", ("FF0000", "00FF00", "0000FF"))],
                "rdefs": {"model": "color"},
            },
        }
        self.root.attrs["wsiseg"] = {"slide": self.slide_name, "model": self.card.name,
                                     "level0_per_label_px": self.plan.level0_per_model_px}
        self.root["labels"].attrs["ome"] = {"version": "0.5",
                                            "labels": ["nuclei", "classes"] + (["cells"] if self.cells else [])}
        if self.cells_grp is not None:
            self.cells_grp.attrs["ome"] = {
                "version": "0.5",
                "multiscales": _multiscales("cells", self.label_levels, mpp, 1, "nearest"),
                "image-label": {"version": "0.5", "source": {"image": "../../"}},
            }
        self.nuclei_grp.attrs["ome"] = {
            "version": "0.5",
            "multiscales": _multiscales("nuclei", self.label_levels, mpp, 1, "nearest"),
            "image-label": {"version": "0.5", "source": {"image": "../../"}},
        }
        self.classes_grp.attrs["ome"] = {
            "version": "0.5",
            "multiscales": _multiscales("classes", self.label_levels, mpp, 1, "nearest"),
            "image-label": {
                "version": "0.5",
                "source": {"image": "../../"},
                "colors": [{"label-value": i + 1, "rgba": [*c.color, 255]} for i, c in enumerate(self.card.classes)],
                "properties": [{"label-value": i + 1, "class": c.name} for i, c in enumerate(self.card.classes)],
            },
        }
        commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        discard(self.tmp)
