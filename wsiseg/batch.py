"""Many slides: serially with the model loaded once, or on a Dask distributed cluster.

Each slide is segmented into ``<out>/<name>/`` (``name``: the slide's sanitised
stem, made unique) through ``segment_slide``, which writes under a hidden
staging folder and publishes only when complete; a folder wsiseg did not create
is never replaced. The manifest
(``<out>/manifest.json``, rewritten atomically by the driver alone) records the
status, reason, timings, nuclei and checksums of every slide; a rerun skips
slides that are done and whose outputs are present, and redoes the rest.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .atomic import (
    MARKER,
    OutputError,
    atomic_path,
    file_sha256,
    output_lock,
    remove_owned,
    staging_path,
    write_text_atomic,
)
from .pipeline import SCHEDULER_TIMEOUT_S, SegmentOptions, connect_scheduler  # noqa: F401 (re-exported)

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
                  ".png", ".jpg", ".jpeg"}
MANIFEST = "manifest.json"
BATCH_LOCK = ".wsiseg-batch.lock"
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}

_PREDICTORS: dict = {}


def collect_slides(inputs: Sequence[str], exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Slides named by files, folders (their slide files), glob patterns (``**`` recursive) or list files (one
    path a line). Recursive patterns never enter wsiseg's own output folders (``exclude``, and any folder
    holding wsiseg's marker) or hidden folders, and visit each real folder once, so links that loop end."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES)
        elif p.is_file() and p.suffix.lower() in {".txt", ".lst", ".list"}:
            base = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    found.append(q if q.is_absolute() else base / q)
        elif p.is_file():
            found.append(p)
        else:
            matches = _glob(item, exclude)
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or matching slides")
            found += matches
    unique, seen = [], set()
    for f in found:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _glob_regex(parts: Sequence[str]) -> re.Pattern:
    """A regex for a relative path matching the glob components ``parts`` (``**``: any number of folders)."""
    import fnmatch

    rx = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            rx += ".*" if last else "(?:[^/]+/)*"
        else:
            rx += fnmatch.translate(part)[4:-3].replace(".*", "[^/]*") + ("" if last else "/")
    return re.compile(rx + r"\Z", re.S)


def _glob(pattern: str, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Files matching ``pattern``; ``**`` walks folders without following a link back to a folder seen."""
    if "**" not in pattern:
        return [Path(m) for m in sorted(glob.glob(pattern)) if Path(m).is_file()]
    parts = Path(pattern).parts
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:k]) if k else Path(".")
    regex = _glob_regex(parts[k:])
    skip = {os.path.realpath(e) for e in exclude}
    seen: set[str] = set()
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skip or os.path.exists(os.path.join(dirpath, MARKER)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            r = (rel / f).as_posix()
            if regex.match(r) and os.path.isfile(os.path.join(dirpath, f)):
                out.append(Path(dirpath) / f)
    return out


RESERVED_NAMES = {"manifest.json", "cohort.csv"}


def safe_name(stem: str) -> str:
    """A folder name made from a slide's file stem that cannot escape or clash with the batch's own files.

    Letters, digits, ``_``, ``-``, ``+`` and inner dots are kept; anything else becomes ``_``. The name never
    starts with a dot (so never ``.`` or ``..``, nor a hidden staging name) and is never a batch file's name.
    """
    import re
    import unicodedata

    name = re.sub(r"[^\w.+-]", "_", unicodedata.normalize("NFC", stem))
    name = name.lstrip(".-").rstrip(". ")
    if not name:
        name = "slide"
    if name.casefold() in RESERVED_NAMES:
        name = "slide-" + name
    return name[:150]


def output_names(slides: Sequence[Path]) -> dict[str, Path]:
    """A distinct, safe output folder name for every slide: its sanitised stem, with a short path hash where
    names collide (compared without case, as on case-insensitive file systems), and a number after that
    where even those collide (a slide may be named like another's hashed name). Every slide gets a name."""
    counts: dict[str, int] = {}
    for s in slides:
        key = safe_name(s.stem).casefold()
        counts[key] = counts.get(key, 0) + 1
    names: dict[str, Path] = {}
    taken = {safe_name(s.stem).casefold() for s in slides if counts[safe_name(s.stem).casefold()] == 1}
    for s in slides:
        name = safe_name(s.stem)
        if counts[name.casefold()] > 1:
            base = name + "-" + hashlib.sha1(os.path.abspath(s).encode()).hexdigest()[:8]
            name, k = base, 1
            while name.casefold() in taken:
                k += 1
                name = f"{base}-{k}"
            taken.add(name.casefold())
        names[name] = s
    if len(names) != len(slides):  # cannot happen: every name above is distinct
        raise RuntimeError(f"{len(slides)} slides got {len(names)} output names")
    return names


def _predictor(model: str, device: str, precision: str):
    """The worker's predictor, loaded once per process."""
    from .inference import load_predictor

    key = (model, device, precision)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = load_predictor(model, device=device, precision=precision)
    return _PREDICTORS[key]


def output_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a slide's output (relative paths), but its summary and marker, which hold
    timings and times."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("summary.json", MARKER)}


def settings_fingerprint(model: str, options: dict) -> str:
    """What a slide's result depends on: the model's bytes (or name) and every option that changes outputs."""
    ignore = {"progress", "overwrite", "workers", "prefetch", "writer", "writer_workers"}
    model_id = file_sha256(model) if Path(model).is_file() else str(model)
    text = json.dumps({"model": model_id, **{k: v for k, v in sorted(options.items()) if k not in ignore}},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def process_slide(slide: str, out_dir: str, model: str, options: dict, device: str = "auto",
                  precision: str = "auto") -> dict:
    """Segment one slide; never raises for a bad slide, returns its manifest entry instead."""
    from .pipeline import segment_slide
    from .slide import MppUnknownError, SlideError

    t0 = time.time()
    entry = {"slide": str(slide), "output": str(out_dir), "started": t0, "host": os.uname().nodename,
             "pid": os.getpid()}
    try:
        opts = SegmentOptions(**{**options, "overwrite": True, "progress": False})
        summary = segment_slide(slide, _predictor(model, device, precision), out_dir, opts)
    except MppUnknownError as exc:
        entry.update(status="failed", reason="no_mpp", error=str(exc))
    except SlideError as exc:
        entry.update(status="failed", reason="unreadable", error=str(exc))
    except OutputError as exc:
        entry.update(status="failed", reason="output_not_replaceable", error=str(exc))
    except OSError as exc:
        entry.update(status="failed", reason=type(exc).__name__, error=str(exc), errno=exc.errno,
                     filename=str(exc.filename or out_dir))
    except Exception as exc:  # a slide-specific failure must not stop the batch
        entry.update(status="failed", reason=type(exc).__name__, error=str(exc))
    else:
        status = "done" if summary["tiles"] else "no_tissue"
        entry.update(status=status, reason=None if status == "done" else "no tissue detected",
                     nuclei=summary["nuclei"], tiles=summary["tiles"], tissue_area_mm2=summary["tissue_area_mm2"],
                     nuclei_per_class=summary["nuclei_per_class"], timings_s=summary["timings_s"],
                     checksums=output_checksums(Path(out_dir)))
    import gc

    gc.collect()  # a failed run's exception cycles hold its writer's queues: release their semaphores now
    entry["finished"] = time.time()
    entry["wall_s"] = round(entry["finished"] - t0, 3)
    return entry


def load_manifest(out: Path) -> dict:
    p = out / MANIFEST
    if not p.exists():
        return {"version": 1, "slides": {}}
    try:
        m = json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{p}: manifest is not valid JSON ({exc}); move it away to start the batch afresh") from None
    if not isinstance(m, dict) or not isinstance(m.get("slides"), dict) or not all(
            isinstance(e, dict) for e in m["slides"].values()):
        raise ValueError(f"{p}: not a wsiseg batch manifest (no 'slides' mapping); move it away to start afresh")
    return m


def save_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))


def is_complete(entry: dict | None, out_dir: Path, fingerprint: str | None = None) -> bool:
    """Done (or validly empty) in the manifest with the same model and settings, and every output file is
    there with the checksum it was written with, and no other."""
    if not entry or entry.get("status") not in ("done", "no_tissue"):
        return False
    if fingerprint is not None and entry.get("settings_sha256") != fingerprint:
        return False
    if not (out_dir / "summary.json").is_file() or not (out_dir / MARKER).is_file():
        return False
    try:
        return output_checksums(out_dir) == entry.get("checksums")
    except OSError:
        return False


def run_batch(slides: Sequence[Path], out: str | os.PathLike, model: str, options: SegmentOptions | None = None,
              workers: int = 1, scheduler: str | None = None, device: str = "auto", precision: str = "auto",
              client=None, on_result=None) -> dict:
    """Segment ``slides`` into ``out``; returns the manifest.

    ``workers == 1`` without a scheduler runs in this process. Otherwise the
    slides go to a Dask cluster: ``client`` if given, else the scheduler at
    ``scheduler``, else a new ``LocalCluster`` of ``workers`` processes. A
    slide whose worker dies is retried on another worker.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, out / BATCH_LOCK):  # one batch run per folder: it alone writes the manifest
        return _run_batch_locked(slides, out, model, options, workers, scheduler, device, precision, client,
                                 on_result)


def _run_batch_locked(slides, out: Path, model, options, workers, scheduler, device, precision, client,
                      on_result) -> dict:
    opts = asdict(options or SegmentOptions())
    manifest = load_manifest(out)
    names = output_names(list(slides))
    fingerprint = settings_fingerprint(model, opts)
    todo = []
    for name, slide in names.items():
        entry = manifest["slides"].get(name)
        if is_complete(entry, out / name, fingerprint) and entry["slide"] == str(slide):
            continue
        manifest["slides"][name] = {"slide": str(slide), "output": str(out / name), "status": "pending"}
        todo.append(name)
    save_manifest(out, manifest)

    def record(name: str, entry: dict) -> None:
        entry["settings_sha256"] = fingerprint
        manifest["slides"][name] = entry
        save_manifest(out, manifest)
        if on_result is not None:
            on_result(name, entry)
        if entry.get("errno") in RESOURCE_ERRNOS:  # a full or read-only disk fails every slide after it too
            raise OSError(entry["errno"], os.strerror(entry["errno"]), entry.get("filename"))

    if todo and workers == 1 and scheduler is None and client is None:
        for name in todo:
            record(name, process_slide(str(names[name]), str(out / name), model, opts, device, precision))
    elif todo:
        _run_dask(todo, names, out, model, opts, workers, scheduler, device, precision, client, record)
    write_cohort(out, manifest)
    return manifest


def _run_dask(todo, names, out, model, opts, workers, scheduler, device, precision, client, record) -> None:
    from distributed import Client, LocalCluster, as_completed

    own = None
    if client is None:
        if scheduler:
            from .errors import SchedulerUnreachableError

            client = own = connect_scheduler(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = own = Client(cluster)
    try:
        futures = {}
        for name in todo:
            f = client.submit(process_slide, str(names[name]), str(out / name), model, opts, device, precision,
                              key=f"wsiseg-{name}-{time.time_ns()}", pure=False, retries=2)
            futures[f] = name
        for f in as_completed(futures):
            name = futures[f]
            try:
                entry = f.result()
            except Exception as exc:  # the worker died too often, or the task could not run
                entry = {"slide": str(names[name]), "output": str(out / name), "status": "failed",
                         "reason": type(exc).__name__, "error": str(exc)}
                with contextlib.suppress(OutputError):
                    remove_owned(staging_path(out / name))
            record(name, entry)
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None and not scheduler:
                cluster.close()


def write_cohort(out: Path, manifest: dict) -> Path:
    """``cohort.csv``: nuclei and density per slide and class (and 'all'), from each slide's summary."""
    rows = []
    for name, e in sorted(manifest["slides"].items()):
        base = {"slide": name, "path": e.get("slide"), "status": e.get("status"), "reason": e.get("reason")}
        if e.get("status") not in ("done", "no_tissue"):
            rows.append({**base, "class": "all"})
            continue
        tissue = e.get("tissue_area_mm2") or 0.0
        per = e.get("nuclei_per_class", {})
        total = sum(per.values())
        for cls, n in [("all", total), *per.items()]:
            rows.append({**base, "class": cls, "nuclei": n, "tissue_area_mm2": tissue,
                         "density_per_mm2": round(n / tissue, 3) if tissue else None,
                         "fraction": round(n / total, 5) if total else None})
    path = out / "cohort.csv"
    fields = ["slide", "path", "status", "reason", "class", "nuclei", "tissue_area_mm2", "density_per_mm2", "fraction"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def summarize(manifest: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in manifest["slides"].values():
        counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
    return counts
