"""The whole path for one slide: tiles → model → stitched nuclei → writers."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import OutputError, check_replaceable, make_staging, output_lock, publish, recover
from .inference import Predictor, infer_batches, predictor_identity
from .parts import Journal, fingerprint, journal_dir, part_tiles
from .sink import WriterSpec, make_sink
from .slide import open_slide
from .tiling import plan_slide, stream_tiles
from .timing import Timer
from .tissue import TissueMask


@dataclass
class SegmentOptions:
    mpp: float | None = None  # level-0 µm/px for slides that record none
    force_mpp: bool = False  # use ``mpp`` even where the slide records one (the summary says so)
    backend: str = "auto"
    tissue: str = "detect"  # detect | whole | path to GeoJSON
    tile_size: int | None = None  # default: the model card's
    overlap: int | None = None
    batch_size: int | None = None  # tiles per forward pass; None: see device_defaults()
    workers: int | None = None  # tile reader threads; None: see device_defaults()
    prefetch: int | None = None  # tiles read ahead of the model; None: see device_defaults()
    on_oversize: str = "error"
    writer: str = "process"  # process | thread: where stitching and the writers run beside the model
    writer_workers: int | None = None  # processes measuring nuclei for the writer; None: see device_defaults()
    geojson: str = "geojson.gz"  # geojson | geojson.gz | none
    table: str = "parquet"  # parquet | csv
    zarr: bool = True
    zarr_image_downsample: int = 4
    progress: bool = True
    overwrite: bool = False
    stats: bool = True
    density_cell_um: float = 100.0
    min_area_um2: float | None = None  # default: the model card's
    cell_expansion_um: float = 5.0  # each nucleus grows by this distance into its cell (QuPath's default); 0: none
    part_tiles: int = 256  # the model's outputs are kept per part of this many tiles, to resume a run; 0: not kept
    processes: int = 1  # CPU: the parts' model work in this many processes, the cores divided between them
    scheduler: str | None = None  # a Dask scheduler whose workers run the parts' model work of this slide


log = logging.getLogger("wsiseg")


class OutputExistsError(OutputError):
    pass


def _tissue(slide, how: str) -> TissueMask:
    from .tissue import detect_tissue, full_tissue, tissue_from_geojson

    if how == "detect":
        return detect_tissue(slide)
    if how == "whole":
        return full_tissue(slide)
    return tissue_from_geojson(how, slide)


def segment_slide(slide_path: str | os.PathLike, predictor: Predictor, out_dir: str | os.PathLike,
                  options: SegmentOptions | None = None, inputs: Sequence[str | os.PathLike] = ()) -> dict:
    """Segment one slide into ``out_dir``; returns the run summary.

    Everything is written under a hidden staging folder and published to
    ``out_dir`` only when complete (``wsiseg.atomic``), so a run that stops
    leaves no output that looks finished; an existing ``out_dir`` is replaced
    only with ``overwrite`` and only when wsiseg created it and it holds no
    input of the run: the slide, the region, the predictor's model file
    (``predictor.source``) and any other file in ``inputs``. One run at a time
    writes to ``out_dir`` (``wsiseg.atomic.output_lock``). With ``options.writer == "process"`` (the default) the
    writers run in a spawned process, so a calling script needs an
    ``if __name__ == "__main__":`` guard.
    """
    o = options or SegmentOptions()
    out_dir = Path(out_dir)
    inputs = run_inputs(slide_path, o, predictor, inputs)
    with output_lock(out_dir):
        recover(out_dir)
        if (out_dir.exists() or out_dir.is_symlink()) and not o.overwrite:
            raise OutputExistsError(f"{out_dir}: output folder exists (overwrite=True replaces it)")
        check_replaceable(out_dir, inputs)
        tmp_dir = make_staging(out_dir, "segment")
        try:
            summary = _run(Path(slide_path), predictor, tmp_dir, o, journal_dir(out_dir))
            (tmp_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            publish(tmp_dir, out_dir, inputs)
            Journal.discard(journal_dir(out_dir))  # published: the parts are no longer needed
            summary["outputs"] = {k: str(out_dir / Path(v).name) for k, v in summary["outputs"].items()}
            return summary
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            Journal.discard_if_empty(journal_dir(out_dir))  # finished parts stay for the rerun
            raise


def run_inputs(slide_path: str | os.PathLike, o: SegmentOptions, predictor: Predictor | None = None,
               extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Every file a run reads, which ``--overwrite`` must never delete: the slide, the region, the model file
    and ``extra`` (a config, a split file, ...)."""
    out = [Path(slide_path)]
    if o.tissue not in ("detect", "whole"):
        out.append(Path(o.tissue))
    source = getattr(predictor, "source", None)
    if source:
        out.append(Path(source))
    out += [Path(p) for p in extra if p]
    return out


def _batches(stream, size: int, timer: Timer):
    """``(tiles, pixels)`` batches of up to ``size`` tiles from a tile stream, timing the waits for tiles."""
    tiles, pixels = [], []
    for tile, px in stream:
        tiles.append(tile)
        pixels.append(px)
        if len(tiles) == size:
            timer.lap("read_wait")
            yield tiles, np.stack(pixels)
            tiles, pixels = [], []
    if tiles:
        timer.lap("read_wait")
        yield tiles, np.stack(pixels)


def _write_tissue_png(path: Path, mask: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), mask.astype(np.uint8) * 255):
        raise OSError(f"{path}: cannot write the tissue mask")


def _writer_spec(slide_path: Path, slide, sp, tissue_mm2: float, predictor: Predictor, tmp_dir: Path,
                 o: SegmentOptions, started: float) -> WriterSpec:
    """What the writing side needs to know of this run, including what the slide statistics need."""
    card = predictor.card
    stats_run = {"slide": str(slide_path), "slide_dimensions": list(slide.dimensions), "slide_mpp": slide.mpp,
                 "tissue_area_mm2": round(tissue_mm2, 5), "model": card.name,
                 "model_mpp": sp.plan.model_mpp, "started": started, "classes": _classes(card),
                 "tissue_mask": sp.tissue.mask, "tissue_downsample": sp.tissue.downsample}
    from .cells import expansion_px

    cell_px = expansion_px(o.cell_expansion_um, sp.plan.model_mpp, sp.grid)
    return WriterSpec(tmp_dir=tmp_dir, stem=slide_path.stem, grid=sp.grid, plan=sp.plan, slide_name=slide_path.name,
                      cell_px=cell_px, tissue_mask=sp.tissue.mask,
                      tissue_downsample=sp.tissue.downsample,
                      card=card, zarr=o.zarr, zarr_image_downsample=o.zarr_image_downsample, geojson=o.geojson,
                      table=o.table, on_oversize=o.on_oversize,
                      score_threshold=predictor.score_threshold, mask_threshold=predictor.mask_threshold,
                      stats_run=stats_run if o.stats else None,
                      stats_cell_um=o.density_cell_um, region_wkb=sp.tissue.region_wkb,
                      min_area_um2=card.min_area_um2 if o.min_area_um2 is None else o.min_area_um2,
                      workers=o.writer_workers)


def device_defaults(device_name: str, tile_size: int, cores: int | None = None) -> dict[str, int]:
    """Batch size, tile reader threads, tiles read ahead and writer processes that keep a device busy.

    On the CPU the model needs the cores: 4 tiles a batch, 2 readers, the writer alone. Beside a GPU the CPU
    side sets the pace: 32 tiles of 256² a batch (the same pixels in fewer, larger tiles), readers for a
    quarter of the cores, and writer processes on all cores but two (the model's feeding thread and the
    writer itself).
    """
    if not device_name.startswith("cuda"):
        return {"batch_size": 4, "workers": 2, "prefetch": 8, "writer_workers": 1}
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    batch = max(1, 32 * 256**2 // tile_size**2)
    return {"batch_size": batch, "workers": max(2, min(8, cores // 4)), "prefetch": 2 * batch,
            "writer_workers": max(1, min(16, cores - 2))}


def _with_device_defaults(o: SegmentOptions, device_name: str, tile_size: int) -> SegmentOptions:
    """``o`` with every option left to the device filled in."""
    d = device_defaults(device_name, tile_size)
    return replace(o, **{k: v for k, v in d.items() if getattr(o, k) is None})


def _classes(card) -> list[dict]:
    return [{"name": c.name, "color": list(c.color)} for c in card.classes]


def _warnings(sp, card, tile_size: int, slide=None) -> list[str]:
    """What the user should know about this run's plan (also written to summary.json)."""
    warnings = list(sp.tissue.notes)
    if slide is not None and slide.mpp_note:
        warnings.append(slide.mpp_note)
    if tile_size != card.tile_size:
        warnings.append(f"tile size {tile_size} px differs from the {card.tile_size} px the model was trained and "
                        "validated with; accuracy may differ")
    if not len(sp.grid) and sp.tissue.source == "detected":
        warnings.append("no tissue was detected; for a small crop or an image that is all tissue, analyse the "
                        "whole image (tissue='whole')")
    return warnings


def _by_part(predictor: Predictor, batches, journal: Journal | None, size: int, ids: list[int], wait=None):
    """``(tiles, pixels, outputs)`` per batch, in order: a finished part's outputs from the journal, the others'
    from the model (each part saved to the journal once all its batches are out). ``wait(part)``, if given,
    returns once other processes have finished that part (or failed at it: then it is computed here)."""
    if journal is None:
        yield from infer_batches(predictor, batches)
        return
    from itertools import groupby

    def positioned():
        pos = 0
        for tiles, arr in batches:
            yield pos // size, (tiles, arr)
            pos += len(tiles)

    for part, group in groupby(positioned(), key=lambda item: item[0]):
        group = (b for _, b in group)
        part_ids = ids[part * size : (part + 1) * size]
        if wait is not None:
            wait(part)
        outs = journal.load(part, part_ids) if journal.has(part) else None
        if outs is not None:  # a part this run finished before it stopped: no model needed
            at = 0
            for tiles, arr in group:
                yield tiles, arr, outs[at : at + len(tiles)]
                at += len(tiles)
            continue
        done = []
        for tiles, arr, o in infer_batches(predictor, group):
            done += o
            yield tiles, arr, o
        journal.save(part, part_ids, done)


def _stream_through(predictor: Predictor, stream, sink, o: SegmentOptions, timer: Timer, progress,
                    journal: Journal | None = None, size: int = 0, ids: list[int] | None = None, wait=None) -> dict:
    """Every tile of ``stream`` through the model (or the journal) into the writing side; returns what the
    writers report."""
    try:
        for tiles, arr, outs in _by_part(predictor, _batches(stream, o.batch_size, timer), journal, size, ids or [],
                                         wait):
            timer.lap("forward")
            sink.put(tiles, arr, outs)  # finished by the writer
            timer.lap("sink_wait")
            if progress is not None:
                progress.update(len(tiles))
                post = {"nuclei": sink.nuclei}
                if journal is not None and size:  # parts merged (tqdm's bar gives the ETA)
                    n_parts = -(-progress.total // size)
                    post["parts"] = f"{n_parts if progress.n >= progress.total else progress.n // size}/{n_parts}"
                    post["reused"] = journal.reused
                progress.set_postfix(post, refresh=False)
        written = sink.close()
        timer.lap("finalize")
        return written
    finally:
        sink.stop()
        stream.close()
        if progress is not None:
            progress.close()


def _recipe(predictor: Predictor):
    """How a part process gets the same predictor: a model file loaded again as this one was, or the object."""
    inner = getattr(predictor, "model", None)
    if predictor.source is None or inner is None:
        return ("object", predictor)
    dtype = str(getattr(predictor.device, "autocast_dtype", None))
    precision = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dtype, "fp32")
    return ("file", predictor.source, precision, predictor.score_threshold)


SCHEDULER_TIMEOUT_S = 15.0


def connect_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT_S):
    """A Dask client of the scheduler at ``address``, or ``SchedulerUnreachableError`` within ``timeout``
    seconds: nothing listening, something else answering (however it answers), or nothing answering at all
    (the handshake is bounded too: the client is made in a thread that is abandoned when it overruns)."""
    import threading

    from distributed import Client

    from .errors import SchedulerUnreachableError

    result: dict = {}

    def make() -> None:
        try:
            result["client"] = Client(address, timeout=f"{max(1.0, timeout - 2):g}s")
        except BaseException as exc:  # anything the handshake with a stranger raises (even MemoryError)
            result["error"] = exc

    t = threading.Thread(target=make, name="wsiseg-connect", daemon=True)
    t.start()
    t.join(timeout)
    if "client" in result:
        return result["client"]
    if t.is_alive():
        raise SchedulerUnreachableError(f"Dask scheduler {address}: no answer within {timeout:g} s (is it a Dask "
                                        "scheduler? dask-scheduler prints its address, e.g. tcp://host:8786)")
    exc = result.get("error")
    raise SchedulerUnreachableError(f"Dask scheduler {address}: cannot connect ({type(exc).__name__}: {exc})")


def recipe_predictor(recipe) -> Predictor:
    """The predictor a recipe (``_recipe``) describes, loaded once per process."""
    global _RECIPE_CACHE
    key = repr(recipe[1:]) if recipe[0] == "file" else id(recipe[1])
    if _RECIPE_CACHE is None or _RECIPE_CACHE[0] != key:
        if recipe[0] == "file":
            from .inference import load_predictor

            pred = load_predictor(recipe[1], device="cpu", precision=recipe[2], score_threshold=recipe[3])
        else:
            pred = recipe[1]
        _RECIPE_CACHE = (key, pred)
    return _RECIPE_CACHE[1]


_RECIPE_CACHE = None


def missing_parts(grid, journal: Journal, size: int):
    """``(part, grid of its tiles)`` for each part of ``grid`` (``size`` tiles, in grid order) not yet in the
    journal: what other processes or a cluster are to compute."""
    from dataclasses import replace as dc_replace

    for part in range(-(-len(grid.tiles) // size)):
        if not journal.has(part):
            yield part, dc_replace(grid, tiles=tuple(grid.tiles[part * size : (part + 1) * size]))


def compute_part(recipe, slide_path: str, o: SegmentOptions, plan, sub) -> list:
    """The model's outputs for the tiles of ``sub`` (a part's grid: ``missing_parts``), read from the slide, in the
    run's batches, in any process."""
    predictor = recipe_predictor(recipe)
    slide = open_slide(slide_path, mpp=o.mpp, backend=o.backend, force_mpp=o.force_mpp)
    outs = []
    stream = stream_tiles(slide, plan, sub, workers=1, prefetch=o.batch_size)
    for _, _, out in infer_batches(predictor, _batches(stream, o.batch_size, Timer())):
        outs += out
    return outs


def _part_worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _part_worker_run(recipe, slide_path: str, o: SegmentOptions, plan, journal_path: str, fp: str, part: int,
                     sub) -> int:
    """Run the model over one part's tiles and save the part; returns the part."""
    outs = compute_part(recipe, slide_path, o, plan, sub)
    Journal.attach(journal_path, fp).save(part, [t.index for t in sub.tiles], outs)
    return part


class PartProcesses:
    """The parts of a run not yet in its journal, computed by ``n`` processes (spawned, each with the cores
    divided between them); ``wait(part)`` returns once a part is done or its process failed."""

    def __init__(self, n: int, predictor: Predictor, slide_path: Path, o: SegmentOptions, sp, journal: Journal,
                 size: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if not predictor.device_name.startswith("cpu"):
            raise ValueError(f"processes > 1 runs parts on the CPU; this model runs on {predictor.device_name}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_part_worker_init,
                                        initargs=(max(1, cores // n),))
        self.futures = {}
        self.computed = 0  # parts the processes finished
        job = (_recipe(predictor), str(slide_path), o, sp.plan, str(journal.path), journal.fingerprint)
        for part, sub in missing_parts(sp.grid, journal, size):
            self.futures[part] = self.pool.submit(_part_worker_run, *job, part, sub)

    def wait(self, part: int) -> None:
        fut = self.futures.pop(part, None)
        if fut is None:
            return
        try:
            fut.result()
            self.computed += 1
        except Exception as exc:  # a process that failed or died: this process computes the part
            log.warning(f"part {part} failed in its process ({type(exc).__name__}: {exc}); computing it here")

    def close(self, abort: bool = False) -> None:
        """Shut the processes down; ``abort``: at once, without waiting for the parts in flight (their files are
        written to a temporary name and renamed, so a part is in the journal whole or not at all)."""
        for fut in self.futures.values():
            fut.cancel()
        if abort:
            for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskParts:
    """The parts of a run not yet in its journal, computed by the workers of a Dask cluster (each worker loads
    the model file once and reads the slide itself: both must be at the same path there); the outputs come back
    to this process, which saves each part in the journal. Dask's own machinery does the rest: a part whose
    worker is lost is computed again elsewhere, a failing part is retried twice (``retries``)."""

    def __init__(self, scheduler: str, predictor: Predictor, slide_path: Path, o: SegmentOptions, sp,
                 journal: Journal, size: int):
        import time as _time

        self.client = connect_scheduler(scheduler)
        self.journal, self.computed = journal, 0
        recipe = _recipe(predictor)
        self.futures = {}
        self.parts = {}
        for part, sub in missing_parts(sp.grid, journal, size):
            self.parts[part] = [t.index for t in sub.tiles]
            self.futures[part] = self.client.submit(
                compute_part, recipe, str(slide_path), o, sp.plan, sub, pure=False, retries=2,
                key=f"wsiseg-part-{journal.fingerprint[:12]}-{part}-{_time.time_ns()}")

    def wait(self, part: int) -> None:
        fut = self.futures.pop(part, None)
        if fut is None:
            return
        try:
            outs = fut.result()
        except Exception as exc:  # lost too often, or failing: this process computes the part
            log.warning(f"part {part} failed on the cluster ({type(exc).__name__}: {exc}); computing it here")
            return
        self.journal.save(part, self.parts[part], outs)
        self.computed += 1

    def close(self, abort: bool = False) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.client.close()


def _journal(slide_path: Path, predictor: Predictor, sp, o: SegmentOptions, where: Path) -> tuple[Journal, int]:
    """The run's journal of finished parts (its fingerprint: the slide file, the predictor's identity, the
    plan and tiles, the batching) and the tiles per part."""
    size = part_tiles(o.part_tiles, o.batch_size)
    st = slide_path.stat()
    ident = {"wsiseg": __version__, "slide": [str(slide_path.resolve()), st.st_size, st.st_mtime_ns],
             "predictor": predictor_identity(predictor), "plan": repr(sp.plan),
             "tiles": [(t.index, t.x, t.y, t.size) for t in sp.grid.tiles], "batch_size": o.batch_size,
             "part_tiles": size, "backend": o.backend}
    return Journal(where, fingerprint(ident)), size


def _run(slide_path: Path, predictor: Predictor, tmp_dir: Path, o: SegmentOptions, journal_at: Path | None = None
         ) -> dict:
    timer = Timer()
    started = time.time()
    t0 = time.perf_counter()
    card = predictor.card
    slide = open_slide(slide_path, mpp=o.mpp, backend=o.backend, force_mpp=o.force_mpp)
    tile_size = o.tile_size or card.tile_size
    overlap = card.overlap if o.overlap is None else o.overlap
    sp = plan_slide(slide, card.mpp, tile_size, overlap, tissue=_tissue(slide, o.tissue))
    o = _with_device_defaults(o, predictor.device_name, sp.grid.tile_size)
    t0 = timer.add("plan", t0)
    tissue_mm2 = sp.tissue.area_mm2(slide.require_mpp())
    _write_tissue_png(tmp_dir / "tissue.png", sp.tissue.mask)
    spec = _writer_spec(slide_path, slide, sp, tissue_mm2, predictor, tmp_dir, o, started)
    n_tiles = len(sp.grid)
    warnings = _warnings(sp, card, tile_size, slide)
    for w in warnings:
        log.warning(w)
    progress = None
    if o.progress:
        from tqdm import tqdm

        progress = tqdm(total=n_tiles, desc=slide_path.name, unit="tile", dynamic_ncols=True, disable=None)
    journal, size = _journal(slide_path, predictor, sp, o, journal_at) if o.part_tiles and journal_at else (None, 0)
    helpers = None
    if (o.processes > 1 or o.scheduler) and journal is None:
        raise ValueError("processes > 1 and a scheduler need the parts journal (part_tiles > 0)")
    if o.scheduler:
        helpers = DaskParts(o.scheduler, predictor, slide_path, o, sp, journal, size)
    elif o.processes > 1:
        helpers = PartProcesses(o.processes, predictor, slide_path, o, sp, journal, size)
    stream = stream_tiles(slide, sp.plan, sp.grid, workers=o.workers, prefetch=max(o.prefetch, o.batch_size))
    sink = make_sink(spec, o.writer)
    timer.add("start_writer", t0)
    try:
        written = _stream_through(predictor, stream, sink, o, timer, progress, journal, size,
                                  [t.index for t in sp.grid.tiles], helpers.wait if helpers else None)
    except BaseException:
        if helpers is not None:
            helpers.close(abort=True)
        raise
    if helpers is not None:
        helpers.close()
    for k, v in written["timings_s"].items():
        timer.totals[k] = v
    outputs = dict(written["outputs"])
    per_class = np.asarray(written["per_class"], np.int64)
    wall = time.time() - started
    n_nuclei = int(per_class.sum())
    mp = n_tiles * sp.grid.tile_size**2 / 1e6
    return {
        "wsiseg_version": __version__,
        "slide": str(slide_path),
        "slide_dimensions": list(slide.dimensions),
        "slide_mpp": slide.mpp,
        "slide_mpp_source": slide.mpp_source,
        "model": card.name,
        "model_mpp": sp.plan.model_mpp,
        "read_level": sp.plan.level,
        "resize_factor": sp.plan.scale,
        "tile_size": sp.grid.tile_size,  # smaller than asked when the slide is
        "overlap": overlap,
        "tiles": n_tiles,
        "grid": list(sp.grid.shape),
        "tissue_source": sp.tissue.source,
        "tissue_area_mm2": round(tissue_mm2, 5),
        "nuclei": n_nuclei,
        "nuclei_per_class": {c.name: int(k) for c, k in zip(card.classes, per_class)},
        "classes": _classes(card),
        "nuclei_per_mm2": round(n_nuclei / tissue_mm2, 2) if tissue_mm2 > 0 else None,
        "tissue_mask_file": {"file": "tissue.png", "level0_px_per_pixel": sp.tissue.downsample},
        "dropped_oversize": written["dropped_oversize"],
        "outside_region": written.get("outside_region", 0),
        "dropped_small": written.get("dropped_small", 0),
        "redundant_detections": written.get("redundant_detections", 0),
        "writer": sink.kind,
        "writer_peak_rss_mb": written.get("writer_peak_rss_mb"),
        "timings_s": {k: round(v, 3) for k, v in timer.totals.items()},
        "wall_s": round(wall, 3),
        "tiles_per_s": round(n_tiles / wall, 3) if wall > 0 else None,
        "megapixels_per_s": round(mp / wall, 3) if wall > 0 else None,
        "nuclei_per_s": round(n_nuclei / wall, 2) if wall > 0 else None,
        "device": predictor.device_name,
        "platform": platform.platform(),
        "outputs": {k: Path(v).name for k, v in outputs.items()},
        "note": None if n_tiles else "no tissue found: outputs are empty",
        "warnings": warnings,
        "parts": None if journal is None else {
            "tiles_per_part": size, "parts": -(-n_tiles // size),
            "reused": journal.reused - (helpers.computed if helpers else 0), "redone": journal.redone,
            "processes": o.processes, "scheduler": o.scheduler,
            "computed_by_workers": helpers.computed if helpers else 0},
        "settings": {"score_threshold": spec.score_threshold, "mask_threshold": spec.mask_threshold,
                     "nms_threshold": card.config.nms_thresh, "tile_size": sp.grid.tile_size, "overlap": overlap,
                     "batch_size": o.batch_size, "mpp_given": o.mpp, "force_mpp": o.force_mpp, "tissue": o.tissue,
                     "on_oversize": o.on_oversize, "backend": o.backend, "writer_workers": written.get("writer_workers", 1),
                     "min_area_um2": spec.min_area_um2,
                     "cell_expansion_um": o.cell_expansion_um if spec.cell_px else 0.0,
                     "cell_expansion_px": spec.cell_px},
    }
