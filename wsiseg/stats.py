"""Slide-level nucleus statistics, streamed over the per-nucleus table.

Memory does not grow with the number of nuclei: the table is read in record
batches and every statistic is kept as a fixed-size accumulator (counts, sums,
fine histograms for quantiles, a density grid).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .features import FEATURE_COLUMNS
from .outputs import prob_column

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 4096
# Histogram ranges; values outside are counted in the end bins (min and max stay exact).
RANGES: dict[str, tuple[float, float]] = {
    "area_um2": (0.0, 500.0), "perimeter_um": (0.0, 200.0), "equivalent_diameter_um": (0.0, 50.0),
    "major_axis_um": (0.0, 60.0), "minor_axis_um": (0.0, 50.0), "eccentricity": (0.0, 1.0),
    "solidity": (0.0, 1.0), "circularity": (0.0, 1.0), "orientation_deg": (-90.0, 90.0),
    "mean_r": (0.0, 255.0), "mean_g": (0.0, 255.0), "mean_b": (0.0, 255.0),
    "hematoxylin_od": (0.0, 2.0), "eosin_od": (0.0, 2.0), "score": (0.0, 1.0),
    "max_diameter_um": (0.0, 60.0), "min_diameter_um": (0.0, 50.0),
    # cells (with cell expansion on)
    "cell_area_um2": (0.0, 1500.0), "nucleus_cell_area_ratio": (0.0, 1.0), "cell_eosin_od": (0.0, 2.0),
    "cytoplasm_eosin_od": (0.0, 2.0), "cytoplasm_hematoxylin_od": (0.0, 2.0),
}
CELL_STAT_FEATURES = ["cell_area_um2", "nucleus_cell_area_ratio", "cell_eosin_od", "cytoplasm_hematoxylin_od",
                      "cytoplasm_eosin_od"]
STAT_FEATURES = ["area_um2", *FEATURE_COLUMNS, "score", *CELL_STAT_FEATURES]


@dataclass
class FeatureAccumulator:
    """Count, mean, std, min, max and histogram quantiles of one feature, fed in batches."""

    lo: float
    hi: float
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        v = values[np.isfinite(values)].astype(np.float64)
        if v.size == 0:
            return
        self.n += v.size
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))
        idx = np.clip(((v - self.lo) / (self.hi - self.lo) * BINS).astype(np.int64), 0, BINS - 1)
        self.hist += np.bincount(idx, minlength=BINS)

    def quantile(self, q: float) -> float:
        """The q-quantile, exact to one bin width ((hi - lo) / BINS) inside the range."""
        if self.n == 0:
            return float("nan")
        cum = np.cumsum(self.hist)
        target = q * self.n
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, BINS - 1)
        before = cum[b - 1] if b > 0 else 0
        frac = (target - before) / self.hist[b] if self.hist[b] else 0.0
        width = (self.hi - self.lo) / BINS
        val = self.lo + (b + frac) * width
        return float(min(max(val, self.vmin), self.vmax))

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            return {"count": 0}
        mean = self.total / self.n
        var = max(self.total_sq / self.n - mean * mean, 0.0)
        out = {"count": self.n, "mean": mean, "std": math.sqrt(var), "min": self.vmin, "max": self.vmax}
        for q in QUANTILES:
            out[f"q{int(round(q * 100)):02d}"] = self.quantile(q)
        return out


@dataclass
class SlideStats:
    """Accumulates the statistics of one slide from table batches."""

    class_names: list[str]
    tissue_area_mm2: float | None
    extent_um: tuple[float, float] | None  # slide width, height in µm
    cell_um: float = 100.0
    cell_tissue_um2: np.ndarray | None = None  # (gh, gw) tissue area in each density cell

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.class_names) + 1, np.int64)  # index 0: unknown class
        self.expected = np.zeros(len(self.class_names), np.float64)  # sums of P(class | nucleus)
        self.uncertain = np.zeros(len(self.class_names) + 1, np.int64)  # nuclei whose class is uncertain
        self.with_probs = False
        self.acc = {c: {f: FeatureAccumulator(*RANGES[f]) for f in STAT_FEATURES} for c in ["all", *self.class_names]}
        self.rows = 0
        if self.extent_um:
            gw = max(1, math.ceil(self.extent_um[0] / self.cell_um))
            gh = max(1, math.ceil(self.extent_um[1] / self.cell_um))
            self.density = np.zeros((len(self.class_names) + 1, gh, gw), np.int64)
        else:
            self.density = None

    def add(self, batch: dict[str, np.ndarray]) -> None:
        cls = np.asarray(batch["class_id"], np.int64)
        cls = np.where((cls >= 1) & (cls <= len(self.class_names)), cls, 0)
        self.rows += len(cls)
        self.counts += np.bincount(cls, minlength=len(self.counts))
        probs = [_numeric(batch.get(prob_column(n))) for n in self.class_names]
        if len(self.class_names) > 1 and all(p is not None for p in probs):
            self.with_probs = True
            self.expected += [float(np.nansum(p)) for p in probs]
            unc = _numeric(batch.get("class_uncertain"))
            if unc is not None:
                self.uncertain += np.bincount(cls[unc.astype(bool)], minlength=len(self.uncertain))
        for f in STAT_FEATURES:
            if f not in batch:
                continue
            v = np.asarray(batch[f], np.float64)
            self.acc["all"][f].add(v)
            for i, name in enumerate(self.class_names, start=1):
                sel = cls == i
                if sel.any():
                    self.acc[name][f].add(v[sel])
        if self.density is not None:
            gh, gw = self.density.shape[1:]
            gx = np.clip((np.asarray(batch["centroid_x_um"]) / self.cell_um).astype(np.int64), 0, gw - 1)
            gy = np.clip((np.asarray(batch["centroid_y_um"]) / self.cell_um).astype(np.int64), 0, gh - 1)
            np.add.at(self.density, (cls, gy, gx), 1)

    def density_per_mm2(self) -> np.ndarray:
        """(classes + 1, gh, gw): layer 0 all nuclei, then one layer per class, in nuclei per mm² of the tissue
        in each cell (NaN where a cell holds no tissue); without a tissue mask, per mm² of cell."""
        counts = np.concatenate([self.density.sum(axis=0, keepdims=True), self.density[1:]], axis=0)
        if self.cell_tissue_um2 is None:
            return (counts / (self.cell_um / 1000.0) ** 2).astype(np.float32)
        area = self.cell_tissue_um2 / 1e6
        safe = np.where(area > 0, area, 1.0)
        return np.where(area > 0, counts / safe, np.nan).astype(np.float32)

    def outside_tissue(self) -> int:
        """Nuclei in density cells that hold no tissue (left out of the map)."""
        if self.cell_tissue_um2 is None or self.density is None:
            return 0
        return int(self.density[:, self.cell_tissue_um2 <= 0].sum())

    def summary(self) -> dict:
        total = int(self.counts.sum())
        per_class = {}
        for i, name in enumerate(self.class_names, start=1):
            n = int(self.counts[i])
            per_class[name] = {
                "count": n,
                "fraction": n / total if total else 0.0,
                "density_per_mm2": n / self.tissue_area_mm2 if self.tissue_area_mm2 else None,
            }
            if self.with_probs:  # the class's expected count: each nucleus adds its probability of the class
                e = float(self.expected[i - 1])
                per_class[name].update({
                    "probability_weighted_count": round(e, 2),
                    "probability_weighted_fraction": e / total if total else 0.0,
                    "class_uncertain": int(self.uncertain[i])})
        return {
            "nuclei": total,
            "unknown_class": int(self.counts[0]),
            "tissue_area_mm2": self.tissue_area_mm2,
            "density_per_mm2": total / self.tissue_area_mm2 if self.tissue_area_mm2 else None,
            "nuclei_outside_tissue_cells": self.outside_tissue(),
            "classes": per_class,
            # (features the table has: cell measurements only with cells)
            "features": {c: {f: a.summary() for f, a in feats.items() if self.acc["all"][f].n}
                         for c, feats in self.acc.items()},
        }


def _numeric(a) -> np.ndarray | None:
    """A table column as numbers, or None when the table has no such column (a CSV gives nulls)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype == object:
        if all(v is None for v in a[:1]):
            return None
        a = a.astype(np.float64)
    return a


def iter_table(path: str | os.PathLike, columns: Sequence[str], batch_rows: int = 262_144) -> Iterator[dict]:
    """Batches of a Parquet or CSV nucleus table as dicts of numpy arrays.

    Memory holds one Parquet row group (or one CSV block) at a time.
    """
    path = str(path)
    if path.endswith(".csv"):
        import pyarrow.csv as pcsv

        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 24),
                               convert_options=pcsv.ConvertOptions(include_columns=list(columns),
                                                                   include_missing_columns=True))
        for rb in reader:
            yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in columns}
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        have = [c for c in columns if c in pf.schema_arrow.names]
        # one row group at a time: iter_batches pre-buffers far ahead and grows with the file
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i, columns=have)
            for rb in t.to_batches(max_chunksize=batch_rows):
                yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in have}
            del t


def cell_tissue_area(mask: np.ndarray, mask_px_um: float, cell_um: float, grid_shape: tuple[int, int],
                     total_um2: float | None = None) -> np.ndarray:
    """Tissue area (µm²) in each density cell: each mask pixel counted in the cell holding its centre, scaled
    so that the cells add up to ``total_um2`` (the run's tissue area) when given."""
    gh, gw = grid_shape
    ys, xs = np.nonzero(mask)
    gx = np.clip(((xs + 0.5) * mask_px_um / cell_um).astype(np.int64), 0, gw - 1)
    gy = np.clip(((ys + 0.5) * mask_px_um / cell_um).astype(np.int64), 0, gh - 1)
    area = np.bincount(gy * gw + gx, minlength=gh * gw).astype(np.float64).reshape(gh, gw) * mask_px_um**2
    if total_um2 is not None and area.sum() > 0:
        area *= total_um2 / area.sum()
    return area


def compute_stats(table: str | os.PathLike, class_names: list[str], tissue_area_mm2: float | None,
                  extent_um: tuple[float, float] | None, cell_um: float = 100.0,
                  batch_rows: int = 262_144, tissue_mask: np.ndarray | None = None,
                  mask_px_um: float | None = None) -> SlideStats:
    """Stream the table once into a :class:`SlideStats`; with the run's tissue mask (one pixel
    ``mask_px_um`` µm wide), densities are per mm² of tissue in each cell."""
    st = SlideStats(class_names, tissue_area_mm2, extent_um, cell_um)
    if tissue_mask is not None and st.density is not None and mask_px_um:
        st.cell_tissue_um2 = cell_tissue_area(tissue_mask, mask_px_um, cell_um, st.density.shape[1:],
                                              tissue_area_mm2 * 1e6 if tissue_area_mm2 else None)
    cols = ["class_id", "centroid_x_um", "centroid_y_um", *STAT_FEATURES,
            *[prob_column(n) for n in class_names], "class_uncertain"]
    for batch in iter_table(table, cols, batch_rows):
        st.add(batch)
    return st


# ----------------------------------------------------------------------- files
def summary_rows(summary: dict) -> list[dict]:
    """One CSV row per class (and 'all'): count, fraction, density, then every feature's statistics."""
    rows = []
    for name in ["all", *summary["classes"]]:
        if name == "all":
            row = {"class": "all", "count": summary["nuclei"], "fraction": 1.0 if summary["nuclei"] else 0.0,
                   "density_per_mm2": summary["density_per_mm2"]}
        else:
            c = summary["classes"][name]
            row = {"class": name, "count": c["count"], "fraction": c["fraction"],
                   "density_per_mm2": c["density_per_mm2"]}
            for k in ("probability_weighted_count", "probability_weighted_fraction", "class_uncertain"):
                if k in c:
                    row[k] = c[k]
        row["tissue_area_mm2"] = summary["tissue_area_mm2"]
        for f, s in summary["features"][name].items():
            for k, v in s.items():
                if k != "count":
                    row[f"{f}_{k}"] = v
        rows.append(row)
    return rows


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plots(st: SlideStats, colors: dict[str, tuple[int, int, int]]) -> dict[str, bytes]:
    # no pyplot: no global state, safe in worker threads
    from matplotlib.figure import Figure

    out = {}
    feats = ["area_um2", "circularity", "eccentricity", "hematoxylin_od", "eosin_od", "equivalent_diameter_um"]
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3)
    for ax, f in zip(axes.ravel(), feats):
        lo, hi = RANGES[f]
        centres = lo + (np.arange(BINS) + 0.5) * (hi - lo) / BINS
        for name in st.class_names:
            a = st.acc[name][f]
            if a.n == 0:
                continue
            coarse = a.hist.reshape(128, -1).sum(axis=1) / a.n
            c = np.asarray(colors.get(name, (80, 80, 80))) / 255
            ax.step(centres.reshape(128, -1).mean(axis=1), coarse, where="mid", color=c, label=f"{name} ({a.n})")
        ax.set_title(f)
        ax.set_ylabel("fraction")
        if st.acc["all"][f].n:
            top = min(hi, st.acc["all"][f].quantile(0.995) * 1.2 if f != "orientation_deg" else hi)
            if top > lo:  # identical nuclei (all at the range's start) keep the whole range
                ax.set_xlim(lo, top)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    # fixed margins: tight_layout draws every tick label twice and costs more than the plots
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.95, wspace=0.3, hspace=0.3)
    out["histograms.png"] = _png(fig)
    if st.density is not None:
        d = st.density_per_mm2()
        n = 1 if d.shape[0] == 2 else d.shape[0]  # one class: its map is the map of all nuclei
        fig = Figure(figsize=(4 * n, 4))
        axes = fig.subplots(1, n, squeeze=False)
        for i, ax in enumerate(axes[0]):
            im = ax.imshow(d[i], cmap="magma", interpolation="nearest")
            ax.set_title("all nuclei" if i == 0 else st.class_names[i - 1])
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, label=f"nuclei / mm² ({st.cell_um:g} µm cells)")
        fig.tight_layout()
        out["density.png"] = _png(fig)
    return out


def overlay_thumbnail(zarr_path: str | os.PathLike, colors: list[tuple[int, int, int]],
                      names: list[str] | None = None, max_side: int = 1200) -> np.ndarray:
    """RGB preview of the slide with every nucleus outlined in its class colour, in place, read from the run's
    OME-Zarr; below it a legend of the classes and a scale bar.

    Each preview pixel takes the label at its centre (from a label level at least four times finer than the
    preview, so outlines sit within a fraction of a preview pixel of the nuclei's edges).
    """
    import zarr

    root = zarr.open_group(str(zarr_path), mode="r")
    ms = root.attrs["ome"]["multiscales"][0]["datasets"]
    level = 0
    for i, _ in enumerate(ms):
        if max(root[str(i)].shape[1:]) >= max_side:
            level = i
    img = np.moveaxis(root[str(level)][:], 0, -1).copy()
    s_img = ms[level]["coordinateTransformations"][0]["scale"][1]
    lab_ds = root["labels/nuclei"].attrs["ome"]["multiscales"][0]["datasets"]
    scales = [d["coordinateTransformations"][0]["scale"][1] for d in lab_ds]
    fine = [i for i, sc in enumerate(scales) if sc <= s_img / 4 + 1e-9] or [0]
    li = fine[-1]
    ids_arr, cls_arr = root[f"labels/nuclei/{li}"], root[f"labels/classes/{li}"]
    r = s_img / scales[li]
    h, w = img.shape[:2]
    rows = np.minimum(((np.arange(h) + 0.5) * r).astype(np.int64), ids_arr.shape[1] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * r).astype(np.int64), ids_arr.shape[2] - 1)
    ids = ids_arr.oindex[0, rows, cols]
    cls = cls_arr.oindex[0, rows, cols]
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge &= ids > 0
    palette = np.array([(0, 0, 0), *colors], np.uint8)
    img[edge] = palette[np.clip(cls[edge], 0, len(colors))]
    return np.concatenate([img, _legend(w, colors, names or [f"class {i + 1}" for i in range(len(colors))],
                                        s_img)], axis=0)


def _legend(width: int, colors: list[tuple[int, int, int]], names: list[str], um_per_px: float) -> np.ndarray:
    """A white strip: a swatch and name per class, then a scale bar of a round length in µm."""
    import cv2

    strip = np.full((34, width, 3), 255, np.uint8)
    x = 8
    for c, n in zip(colors, names):
        cv2.rectangle(strip, (x, 10), (x + 14, 24), tuple(int(v) for v in c), thickness=2)
        cv2.putText(strip, n, (x + 20, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
        x += 20 + cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] + 16
    target = width * 0.2 * um_per_px
    length_um = max(v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if v <= max(target, 1))
    px = int(round(length_um / um_per_px))
    x1 = width - 10
    cv2.line(strip, (x1 - px, 20), (x1, 20), (0, 0, 0), 3)
    label = f"{length_um:g} um"
    tw = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]
    cv2.putText(strip, label, (x1 - px - tw - 6, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _tissue_mask(out_dir: Path, run: dict) -> tuple[np.ndarray | None, float | None]:
    """The run's tissue mask and the width of its pixels in µm: given in ``run``, or the output's
    ``tissue.png``."""
    mask, ds = run.get("tissue_mask"), run.get("tissue_downsample")
    if mask is None:
        info = run.get("tissue_mask_file") or {}
        path = out_dir / str(info.get("file", ""))
        if info and path.is_file():
            import cv2

            mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0
            ds = info.get("level0_px_per_pixel")
    if mask is None or not ds or not run.get("slide_mpp"):
        return None, None
    return np.asarray(mask, bool), float(ds) * float(run["slide_mpp"])


def write_stats(out_dir: str | os.PathLike, cell_um: float = 100.0) -> dict:
    """Compute and write the statistics of a ``wsiseg segment`` output folder into ``<out_dir>/stats``.

    Writes summary.json, summary.csv, density.zarr, density.png, histograms.png and report.html.
    """
    out_dir = Path(out_dir)
    sp = out_dir / "summary.json"
    if not sp.is_file():
        raise FileNotFoundError(f"{out_dir}: not a wsiseg output folder (no summary.json)")
    try:
        run = json.loads(sp.read_text())
    except ValueError as exc:
        raise ValueError(f"{sp}: not valid JSON ({exc})") from None
    need = ("wsiseg_version", "slide", "slide_dimensions", "slide_mpp", "model", "nuclei_per_class")
    if not isinstance(run, dict) or any(k not in run for k in need):
        raise ValueError(f"{sp}: not the summary of a wsiseg segment run (needs {', '.join(need)})")
    _check_run(sp, run)
    return write_run_stats(out_dir, run, cell_um)


def _check_run(sp: Path, run: dict) -> None:
    """Raise ``ValueError`` naming the first field of a summary that the statistics cannot use."""

    def num(v, lo=0.0):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > lo

    dims = run["slide_dimensions"]
    if not (isinstance(dims, list) and len(dims) == 2 and all(num(v) for v in dims)):
        raise ValueError(f"{sp}: slide_dimensions must be [width, height] in pixels, got {dims!r}")
    if not num(run["slide_mpp"]) or run["slide_mpp"] > 1000:
        raise ValueError(f"{sp}: slide_mpp must be a positive number, got {run['slide_mpp']!r}")
    t = run.get("tissue_area_mm2")
    if t is not None and not (num(t, -1) and t >= 0):
        raise ValueError(f"{sp}: tissue_area_mm2 must be a number, got {t!r}")
    per = run["nuclei_per_class"]
    if not isinstance(per, dict) or not all(isinstance(k, str) for k in per):
        raise ValueError(f"{sp}: nuclei_per_class must map class names to counts, got {per!r}")
    classes = run.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("color"), list)
            and len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
            for c in classes)):
        raise ValueError(f"{sp}: classes must be a list of {{name, color: [r, g, b]}}")
    info = run.get("tissue_mask_file")
    if info is not None and not (isinstance(info, dict) and isinstance(info.get("file", ""), str)
                                 and num(info.get("level0_px_per_pixel", 1))):
        raise ValueError(f"{sp}: tissue_mask_file must be {{file, level0_px_per_pixel}}, got {info!r}")


def write_run_stats(out_dir: str | os.PathLike, run: dict, cell_um: float = 100.0) -> dict:
    """:func:`write_stats` with the run's description given (``classes``, ``slide``, ``slide_dimensions``,
    ``slide_mpp``, ``tissue_area_mm2``, ``model``; optionally ``model_mpp``, ``wall_s``) instead of read
    from its ``summary.json``."""
    out_dir = Path(out_dir)
    tables = sorted(out_dir.glob("*.nuclei.parquet")) + sorted(out_dir.glob("*.nuclei.csv"))
    if not tables:
        raise FileNotFoundError(f"{out_dir}: no nucleus table (*.nuclei.parquet or *.nuclei.csv)")
    classes = run.get("classes") or [{"name": n, "color": [128, 128, 128]} for n in run["nuclei_per_class"]]
    names = [c["name"] for c in classes]
    colors = {c["name"]: tuple(c["color"]) for c in classes}
    w, h = run["slide_dimensions"]
    mpp = run["slide_mpp"]
    mask, mask_px_um = _tissue_mask(out_dir, run)
    st = compute_stats(tables[0], names, run.get("tissue_area_mm2"), (w * mpp, h * mpp), cell_um,
                       tissue_mask=mask, mask_px_um=mask_px_um)
    summary = st.summary()
    summary.update({"slide": run["slide"], "model": run["model"], "density_cell_um": cell_um})
    return _write_artifacts(out_dir, run, st, summary, colors)


def _write_artifacts(out_dir: Path, run: dict, st: SlideStats, summary: dict, colors: dict) -> dict:
    import zarr

    from .atomic import make_staging, publish

    stats_dir = out_dir / "stats"
    tmp = make_staging(stats_dir, "stats")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = summary_rows(summary)
    with open(tmp / "summary.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        wr.writeheader()
        wr.writerows(rows)
    images = _plots(st, colors)
    if st.density is not None:
        d = st.density_per_mm2()
        g = zarr.open_group(str(tmp / "density.zarr"), mode="w", zarr_format=3)
        a = g.create_array("0", shape=d.shape, chunks=d.shape, dtype="float32", dimension_names=("c", "y", "x"))
        a[:] = d
        g.attrs["ome"] = {"version": "0.5", "multiscales": [{
            "name": "nuclei per mm²", "axes": [{"name": "c", "type": "channel"},
                                               {"name": "y", "type": "space", "unit": "micrometer"},
                                               {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, st.cell_um, st.cell_um]}]}]}]}
        g.attrs["wsiseg"] = {"channels": ["all", *st.class_names], "unit": "nuclei per mm² of tissue",
                             "cell_um": st.cell_um, "tissue_um2": "tissue area in each cell (µm²), NaN density "
                                                                 "where it is 0"}
        if st.cell_tissue_um2 is not None:
            t = g.create_array("tissue_um2", shape=st.cell_tissue_um2.shape, chunks=st.cell_tissue_um2.shape,
                               dtype="float64", dimension_names=("y", "x"))
            t[:] = st.cell_tissue_um2
    zarrs = sorted(out_dir.glob("*.ome.zarr"))
    if zarrs:
        import cv2

        thumb = overlay_thumbnail(zarrs[0], [colors[n] for n in st.class_names], st.class_names)
        ok, png = cv2.imencode(".png", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
        images["overlay.png"] = png.tobytes()
    for name, data in images.items():
        (tmp / name).write_bytes(data)
    (tmp / "report.html").write_text(_report_html(run, summary, rows, images, colors))
    publish(tmp, stats_dir)
    return summary


def _report_html(run: dict, summary: dict, rows: list[dict], images: dict[str, bytes], colors: dict) -> str:
    from html import escape

    def img(name: str, alt: str) -> str:
        if name not in images:
            return ""
        b64 = base64.b64encode(images[name]).decode()
        return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{b64}"><figcaption>{escape(alt)}</figcaption></figure>'

    def fmt(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return escape(str(v))

    cols = ["class", "count", "fraction", "density_per_mm2", "area_um2_q50", "area_um2_q05", "area_um2_q95",
            "circularity_q50", "eccentricity_q50", "hematoxylin_od_q50", "eosin_od_q50"]
    if any("probability_weighted_count" in r for r in rows):  # beside the most-likely-class counts
        cols[2:2] = ["probability_weighted_count", "class_uncertain"]
    if any("cell_area_um2_q50" in r for r in rows):  # with cells: the cell around each nucleus
        cols += ["cell_area_um2_q50", "nucleus_cell_area_ratio_q50", "cytoplasm_eosin_od_q50"]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        sw = colors.get(r["class"])
        chip = (f'<span class="chip" style="background:rgb{tuple(sw)}"></span>' if sw else "")
        body += "<tr>" + "".join(
            f"<td>{chip if c == 'class' else ''}{fmt(r.get(c))}</td>" for c in cols) + "</tr>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsiseg report: {escape(Path(run['slide']).name)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.chip{{display:inline-block;width:.8em;height:.8em;margin-right:.4em}}
img{{max-width:100%}}figure{{margin:1em 0}}dl{{display:grid;grid-template-columns:max-content auto;gap:2px 1em}}
</style></head><body>
<h1>{escape(Path(run['slide']).name)}</h1>
<dl><dt>nuclei</dt><dd>{summary['nuclei']:,}</dd>
<dt>tissue area</dt><dd>{fmt(summary['tissue_area_mm2'])} mm²</dd>
<dt>density</dt><dd>{fmt(summary['density_per_mm2'])} nuclei / mm² of tissue</dd>
<dt>model</dt><dd>{escape(str(run['model']))} at {fmt(run.get('model_mpp'))} µm/px</dd>
<dt>run time</dt><dd>{fmt(run.get('wall_s'))} s</dd></dl>
<h2>Summary by class</h2><table><tr>{head}</tr>{body}</table>
<p>Full statistics (quantiles of every feature per class): <code>summary.csv</code>, <code>summary.json</code>.</p>
<h2>Slide</h2>{img('overlay.png', 'Slide preview with nuclei tinted by class')}
<h2>Density</h2>{img('density.png', 'Nuclei per mm² on a grid')}
<h2>Distributions</h2>{img('histograms.png', 'Feature distributions by class')}
</body></html>
"""
