"""The writing side of a run: per-tile detections → stitched nuclei → writers, beside the model.

It runs in a thread or in a process of its own. The process is the default:
the model's forward pass keeps both of its CPU threads busy, and Python code in
a thread of the same process (features, polygons, GeoJSON) takes the GIL from
the model's own Python glue, so the forward pass slows by about the writers'
CPU time. A process at low OS priority uses only the CPU the model leaves idle,
and imports neither torch nor the model. Nothing here imports torch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelCard
from .detections import ModelOutput
from .outputs import (
    GeoJSONWriter,
    TableWriter,
    ZarrWriter,
    extra_columns,
    geojson_feature,
    nucleus_record,
)
from .cells import CellGrower
from .stitching import Stitcher, min_area_px
from .tiling import ReadPlan, Tile, TileGrid
from .timing import Timer


@dataclass
class WriterSpec:
    """Everything the writing side needs to know about a run; plain data, so it can cross to a process."""

    tmp_dir: Path
    stem: str
    grid: TileGrid
    plan: ReadPlan
    slide_name: str  # the nucleus UUIDs are derived from it
    card: ModelCard
    zarr: bool = True
    zarr_image_downsample: int = 4
    geojson: str = "geojson.gz"  # geojson | geojson.gz | none
    table: str = "parquet"  # parquet | csv
    on_oversize: str = "error"
    score_threshold: float = 0.5  # applied to raw model output
    mask_threshold: float = 0.5
    stats_run: dict | None = None  # the run's description for the slide statistics; None: no statistics
    stats_cell_um: float = 100.0
    region_wkb: bytes | None = None  # keep only nuclei whose centroid lies in these level-0 polygons
    min_area_um2: float = 0.0  # smaller objects are dropped (and counted)
    workers: int = 1  # processes that finish detections and measure nuclei (1: all in the writer itself)
    cell_px: int = 0  # each nucleus grown by this many model pixels into its cell (0: no cells)
    tissue_mask: np.ndarray | None = None  # cells stay in the analysed tissue: this mask, one pixel ...
    tissue_downsample: float = 1.0  # ... this many level-0 pixels wide (None or all tissue: no limit)


def _describe(nuclei: list, plan: ReadPlan, slide_name: str, card: ModelCard, geojson: bool) -> list:
    """The table record and GeoJSON feature text of each of a tile's final nuclei (ids already given)."""
    out = []
    for n in nuclei:
        rec = nucleus_record(n, plan, slide_name, card)
        out.append((rec, geojson_feature(n, rec, plan, card) if geojson else None))
    return out


def _inside(spec: WriterSpec):
    """Whether model-pixel centres lie in the analysed tissue: inside the user's region (exactly), or on the
    tissue mask; None where the whole slide is analysed."""
    f = spec.plan.level0_per_model_px
    if spec.region_wkb is not None:
        import shapely

        region = shapely.from_wkb(spec.region_wkb)
        shapely.prepare(region)
        return lambda xs, ys: shapely.contains_xy(region, xs * f, ys * f)
    mask = spec.tissue_mask
    if mask is None or mask.all():
        return None
    k = f / spec.tissue_downsample  # mask pixels per model pixel
    h, w = mask.shape

    def inside(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        mx = np.clip((xs * k).astype(np.int64), 0, w - 1)
        my = np.clip((ys * k).astype(np.int64), 0, h - 1)
        return mask[my, mx]

    return inside


class _Inline:
    """The part of an executor that SlideWriter uses, running each job at once in this process."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:
            f.set_exception(exc)
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class SlideWriter:
    """Stitches one slide's tiles and streams its nuclei into the Zarr, GeoJSON and table writers.

    ``add`` takes a batch of tiles with their pixels and the predictor's output for each
    (:class:`~wsiseg.detections.ModelOutput`), which it finishes with the run's thresholds.

    With ``spec.workers`` > 1 the per-tile work that depends on nothing else (finishing the model's
    output; measuring and outlining each final nucleus) runs in a pool of processes, while the decisions
    that depend on order (stitching, ids, every write) stay here, in tile order: the files are the same
    bytes for any number of workers.
    """

    def __init__(self, spec: WriterSpec):
        self.spec = spec
        self.timer = Timer()
        self.per_class = np.zeros(len(spec.card.classes), np.int64)
        self.writers: list = []
        self.zw = self.gj = None
        try:
            if spec.zarr:
                self.zw = ZarrWriter(spec.tmp_dir / f"{spec.stem}.ome.zarr", spec.grid, spec.plan, spec.card, spec.slide_name,
                                     image_downsample=spec.zarr_image_downsample, cells=spec.cell_px > 0)
                self.writers.append(self.zw)
            if spec.geojson != "none":
                self.gj = GeoJSONWriter(spec.tmp_dir / f"{spec.stem}.{spec.geojson}", spec.plan, spec.card)
                self.writers.append(self.gj)
            self.tw = TableWriter(spec.tmp_dir / f"{spec.stem}.nuclei.{spec.table}",
                                  extra_cols=extra_columns(spec.card, spec.cell_px > 0))
            self.writers.append(self.tw)
        except BaseException:
            self.abort()
            raise
        self.stitcher = Stitcher(spec.grid, on_oversize=spec.on_oversize,
                                 min_area=min_area_px(spec.min_area_um2, spec.plan.model_mpp), rgb_margin=spec.cell_px)
        self.grower = CellGrower(spec.grid, spec.cell_px, _inside(spec)) if spec.cell_px > 0 else None
        self.region = None
        self.outside_region = 0
        self.next_id = 1
        self.workers = 1 if mp.current_process().daemon else max(1, int(spec.workers))  # daemons have no children
        self.pool = (ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) if self.workers > 1
                     else _Inline())
        self.finishing: deque = deque()  # (tiles, pixels, futures of their detections), in tile order
        self.describing: deque = deque()  # (tile, final nuclei, future of their records), in final order
        if spec.region_wkb is not None:
            import shapely

            self.region = shapely.from_wkb(spec.region_wkb)
            shapely.prepare(self.region)

    def _in_region(self, kept: list) -> list:
        """The nuclei whose centroid (level-0 px) lies inside the user's region."""
        if self.region is None or not kept:
            return kept
        import shapely

        f = self.spec.plan.level0_per_model_px
        xy = np.array([n.centroid for n in kept], np.float64) * f
        inside = shapely.contains_xy(self.region, xy[:, 0], xy[:, 1])
        self.outside_region += int((~inside).sum())
        return [n for n, k in zip(kept, inside) if k]

    @property
    def nuclei(self) -> int:
        return int(self.per_class.sum())

    def add(self, tiles: list[Tile], pixels: np.ndarray, outputs: list[ModelOutput]) -> None:
        s = self.spec
        size = pixels.shape[1:3]
        jobs = [self.pool.submit(o.finish, size, s.score_threshold, s.mask_threshold) for o in outputs]
        self.finishing.append((tiles, pixels, jobs))
        self._advance()

    def _advance(self, drain: bool = False) -> None:
        """Stitch the batches whose detections are ready, in order, then write what is measured; with
        ``drain``, or when too much is in flight, wait for the oldest."""
        depth = 2 * self.workers
        while self.finishing and (drain or len(self.finishing) > depth
                                  or all(f.done() for f in self.finishing[0][2])):
            tiles, pixels, jobs = self.finishing.popleft()
            t0 = time.perf_counter()
            dets = [f.result() for f in jobs]
            t0 = self.timer.add("postprocess", t0)
            for tile, px, det in zip(tiles, pixels, dets):
                final = self.stitcher.add(tile, det, px)
                if self.zw is not None:
                    self.zw.write_preview(tile, px)
                t0 = self.timer.add("stitch", t0)
                self._measure(final)
            self._write(drain=False)
        self._write(drain)

    def _measure(self, final: list, closing: bool = False) -> None:
        """Number the nuclei of tiles that became final, grow their cells (once their neighbours' nuclei are
        final too), and have them measured and outlined."""
        ready = []
        for tile, nuclei in final:
            kept = self._in_region(nuclei)
            for n in kept:
                n.id = self.next_id  # numbered after the region filter: ids run 1..N
                self.next_id += 1
            ready += self.grower.add(tile, kept) if self.grower is not None else [(tile, kept)]
        if closing and self.grower is not None:
            ready += self.grower.close()
        s = self.spec
        for tile, kept in ready:
            job = self.pool.submit(_describe, kept, s.plan, s.slide_name, s.card, self.gj is not None)
            self.describing.append((tile, kept, job))

    def _write(self, drain: bool) -> None:
        """Stream measured nuclei, in order, to every writer."""
        t0 = time.perf_counter()
        depth = 8 * self.workers
        while self.describing and (drain or len(self.describing) > depth or self.describing[0][2].done()):
            tile, kept, job = self.describing.popleft()
            for n, (rec, feature) in zip(kept, job.result()):
                self.tw.write(rec)
                if self.gj is not None:
                    self.gj.write_feature(feature)
                self.per_class[n.label] += 1
                n.rgb = None
            if self.zw is not None:
                self.zw.add_final(tile, kept)
        self.timer.add("write", t0)

    def close(self) -> dict:
        """Finish every output; returns their paths, the counts and the stage timings."""
        t0 = time.perf_counter()
        self._advance(drain=True)
        self._measure(self.stitcher.close(), closing=True)
        self._write(drain=True)
        self.pool.shutdown()
        outputs = {}
        if self.zw is not None:
            outputs["zarr"] = str(self.zw.close())
        if self.gj is not None:
            outputs["geojson"] = str(self.gj.close())
        outputs["table"] = str(self.tw.close())
        self.writers.clear()
        t0 = self.timer.add("close", t0)
        if self.spec.stats_run is not None:
            from .stats import write_run_stats

            run = dict(self.spec.stats_run)
            if "started" in run:
                run["wall_s"] = round(time.time() - run.pop("started"), 1)
            write_run_stats(self.spec.tmp_dir, run, self.spec.stats_cell_um)
            outputs["stats"] = str(self.spec.tmp_dir / "stats")
            self.timer.add("stats", t0)
        return {"outputs": outputs, "per_class": self.per_class.tolist(),
                "dropped_oversize": self.stitcher.dropped_oversize,
                "dropped_small": self.stitcher.dropped_small,
                "redundant_detections": self.stitcher.duplicates,
                "outside_region": self.outside_region,
                "writer_workers": self.workers,
                "timings_s": dict(self.timer.totals)}

    def abort(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for w in self.writers:
            try:
                w.abort()
            except Exception:
                pass
        self.writers.clear()


class ThreadSink:
    """Runs a :class:`SlideWriter` in one background thread; errors surface in the producer."""

    kind = "thread"

    def __init__(self, spec: WriterSpec, maxsize: int = 2):
        self.writer = SlideWriter(spec)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="wsiseg-sink", daemon=True)
        self.thread.start()

    @property
    def nuclei(self) -> int:
        return self.writer.nuclei

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.add(*item)
                except BaseException as exc:  # re-raised in the producer
                    self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, tiles: list[Tile], pixels: np.ndarray, dets: list[ModelOutput]) -> None:
        self._check()
        while True:
            try:
                self.q.put((tiles, pixels, dets), timeout=0.5)
                return
            except queue.Full:
                self._check()

    def _put_end(self) -> None:
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> dict:
        """Wait for every queued batch, finish the outputs; raise the first error."""
        self._put_end()
        self.thread.join()
        self._check()
        return self.writer.close()

    def stop(self) -> None:
        """Abandon the run: drop what is queued, remove the unfinished outputs."""
        if self.thread.is_alive():
            while True:
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break
            self._put_end()
            self.thread.join(timeout=30)
        self.writer.abort()


class WriterProcessError(RuntimeError):
    """The writer process stopped without saying why."""


def _pack_error(exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
    except Exception:
        payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return pickle.dumps(("error", payload, tb))


def _peak_rss_mb() -> float | None:
    """This process's own peak resident memory (``VmHWM``; ``ru_maxrss`` would include the parent's at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _end_with_parent() -> None:
    """SIGTERM this process when its parent dies, by any signal: at once on Linux (``PR_SET_PDEATHSIG``),
    within a second elsewhere (a thread watching the parent's pid); a child that ignores it ends 10 s later."""
    # the parent as spawn knew it: had it died already, os.getppid() would name whoever adopted this process
    known = mp.parent_process()
    parent = known.pid if known is not None and known.pid else os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)
        os._exit(1)

    threading.Thread(target=watch, name="wsiseg-parent-watch", daemon=True).start()


def _serve(inq, outq, nuclei, nice: int) -> None:
    """The writer process: take its pickled :class:`WriterSpec` from ``inq``, add batches from ``inq`` until
    ``None``, then close and report on ``outq``."""
    # terminate() from the parent: unwind normally, so the unfinished outputs are removed and the
    # libraries' own resources (numcodecs' lock, say) are released rather than reported as leaked
    signal.signal(signal.SIGTERM, _exit_on_signal)
    _end_with_parent()
    try:
        if nice and hasattr(os, "nice"):
            os.nice(nice)
    except OSError:
        pass
    writer = None
    parent = mp.parent_process()

    def take():
        while True:
            try:
                return inq.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise WriterProcessError("the segmenting process ended; outputs abandoned") from None

    try:
        spec = pickle.loads(take())
        writer = SlideWriter(spec)
        if spec.stats_run is not None:
            import matplotlib.figure  # noqa: F401  imported now, while the model runs, not at the end

            from . import stats  # noqa: F401
        while True:
            item = take()
            if item is None:
                break
            writer.add(*item)
            nuclei.value = writer.nuclei
        result = writer.close()
        result["writer_peak_rss_mb"] = _peak_rss_mb()
        outq.put(pickle.dumps(("done", result)))
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        outq.put(_pack_error(exc))
    finally:
        # reported: from here on a terminate() from the parent ends the process quietly, even in the libraries'
        # exit handlers, instead of raising SystemExit inside them
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ProcessSink:
    """Runs a :class:`SlideWriter` in a child process at low OS priority; same interface as :class:`ThreadSink`.

    The child is started with ``spawn`` (never ``fork``: the parent runs
    torch's thread pools), so scripts that call it need the usual
    ``if __name__ == "__main__":`` guard.
    """

    kind = "process"

    def __init__(self, spec: WriterSpec, maxsize: int = 2, nice: int = 19):
        ctx = mp.get_context("spawn")
        self.inq = ctx.Queue(maxsize=maxsize)
        self.outq = ctx.Queue()
        self._nuclei = ctx.Value("q", 0, lock=False)
        self.result: dict | None = None
        self._reported = False  # the child sent its result or its error, and is ending by itself
        # the spec (tissue mask, grid, card: often more than a pipe holds) goes through the queue, not through
        # the process's start: a child that dies while starting (a script without the __main__ guard) would
        # leave start() blocked on a full pipe for ever, instead of being reported by _poll
        spec_bytes = pickle.dumps(spec)
        self.proc = ctx.Process(target=_serve, args=(self.inq, self.outq, self._nuclei, nice),
                                name="wsiseg-writer", daemon=spec.workers <= 1)  # a daemon has no pool
        self.proc.start()
        self.inq.put(spec_bytes)

    @property
    def nuclei(self) -> int:
        return int(self._nuclei.value)

    def _poll(self, block: bool = False, timeout: float = 0.5) -> None:
        """Take the child's report if there is one: raise its error, or keep its result."""
        try:
            msg = self.outq.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            if not self.proc.is_alive() and self.result is None:
                try:  # the report may have landed between the two checks
                    msg = self.outq.get(timeout=1.0)
                except queue.Empty:
                    raise WriterProcessError(
                        f"the writer process stopped (exit code {self.proc.exitcode}) without finishing the outputs; "
                        "its own error, if it had one, is printed above (a script that calls segment_slide needs an "
                        "'if __name__ == \"__main__\":' guard; writer='thread' avoids the process)"
                    ) from None
            else:
                return
        kind, *rest = pickle.loads(msg)
        self._reported = True
        if kind == "done":
            self.result = rest[0]
            return
        exc = pickle.loads(rest[0])
        if hasattr(exc, "add_note"):
            exc.add_note("raised in the writer process:\n" + rest[1])
        raise exc

    def _send(self, item) -> None:
        """Queue ``item`` for the child, raising its error instead if it has one."""
        while True:
            self._poll()
            try:
                self.inq.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def put(self, tiles: list[Tile], pixels: np.ndarray, dets: list[ModelOutput]) -> None:
        self._send((tiles, pixels, dets))

    def close(self) -> dict:
        """Wait for the child to write every queued batch and finish the outputs; raise its error."""
        self._send(None)
        while self.result is None:
            self._poll(block=True)
        self.proc.join(timeout=30)
        return self.result

    def stop(self) -> None:
        """Abandon the run: end the child; its unfinished outputs are left for the caller to remove."""
        if self._reported:  # it is ending by itself: let it release its resources (a kill would leak them)
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout=30)
        for q in (self.inq, self.outq):
            q.cancel_join_thread()
            q.close()
        self.inq = self.outq = None  # let their semaphores be released now, not at interpreter exit


def make_sink(spec: WriterSpec, kind: str = "process", maxsize: int = 2) -> ThreadSink | ProcessSink:
    """A writer beside the model: ``process`` (default) or ``thread``.

    A daemonic process (a Dask worker, say) may not start children, so there
    the writer runs in a thread.
    """
    if kind not in ("process", "thread"):
        raise ValueError(f"writer must be 'process' or 'thread', not {kind!r}")
    if kind == "process" and not mp.current_process().daemon:
        return ProcessSink(spec, maxsize=maxsize)
    return ThreadSink(spec, maxsize=maxsize)
