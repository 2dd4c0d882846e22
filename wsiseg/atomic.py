"""Writing outputs so that nothing a user owns is ever lost, and nothing half-written looks complete.

Three rules:

* **Files** are written to a temporary name beside them and renamed into place
  (``atomic_path``), so a reader sees the old file or the new one, never a torn one.
* **Output folders** are built under a hidden staging name (``.<name>.partial``)
  and published by ``publish``: the old folder is renamed aside
  (``.<name>.old``), the new one moved in, then the old one deleted. SIGINT and
  SIGTERM are held back during the two renames, and ``recover`` puts an aside
  folder back if a hard kill struck between them, so one complete output
  always survives.
* wsiseg **only deletes what it created**: every folder it creates holds a
  marker file (``MARKER``), and a folder without it, or one that contains an
  input of the run, is never replaced or removed.
* **One run per output**: a run holds an OS lock (``flock``) on a hidden file
  beside its output (``output_lock``) from before it looks at the output until
  it has published it; the kernel releases it when the process ends, however
  it ends, so a second run on the same output stops at once with
  ``OutputLockedError`` instead of taking the first one's folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

MARKER = ".wsiseg-output"


class OutputError(FileExistsError):
    """An output path that wsiseg refuses to create, replace or delete."""


class OutputLockedError(OutputError):
    """Another wsiseg run is writing to the same output."""


def lock_path(final: str | os.PathLike) -> Path:
    """The hidden lock file beside an output (``.<name>.lock``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


@contextlib.contextmanager
def output_lock(final: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``final`` for the block; ``OutputLockedError`` names the process
    holding it when another run has it. The lock file stays (removing it would race with a run about to take
    it); the lock itself dies with the process, even by ``kill -9``."""
    import fcntl

    final = Path(final)
    path = Path(lock_file) if lock_file is not None else lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise OutputError(f"{path}: the lock file of {final} is a symbolic link; remove it")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            raise OutputLockedError(f"{final}: another wsiseg run (pid {holder}) is writing to it; wait for it to "
                                    "finish or choose another output path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def staging_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def aside_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def is_owned(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a real folder (not a link) that wsiseg created."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_replaceable(final: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise ``OutputError`` unless ``final`` is absent or a folder wsiseg made that holds no input."""
    final = Path(final)
    if final.is_symlink():
        raise OutputError(f"{final}: is a symbolic link; wsiseg writes only to real folders it creates")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output path")
    for p in inputs:
        if p is not None and Path(p).exists() and _inside(Path(p), final):
            raise OutputError(f"{final}: holds an input of this run ({p}); wsiseg will not replace it")
    if not is_owned(final):
        raise OutputError(f"{final}: exists and was not created by wsiseg (no {MARKER} file); "
                          "move it away or choose another output path")


def remove_owned(folder: str | os.PathLike) -> None:
    """Delete ``folder`` if wsiseg created it; a folder it did not create is an ``OutputError``."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not is_owned(folder):
        raise OutputError(f"{folder}: exists and was not created by wsiseg (no {MARKER} file); "
                          "move it away and run again")
    shutil.rmtree(folder)


def recover(final: str | os.PathLike) -> None:
    """Finish a publish that a hard kill interrupted: restore the aside folder, or drop a stale one."""
    final, aside = Path(final), aside_path(final)
    if not is_owned(aside):
        return
    if not final.exists() and not final.is_symlink():
        os.rename(aside, final)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def make_staging(final: str | os.PathLike, kind: str = "output") -> Path:
    """A fresh, empty, marked staging folder for ``final``; a leftover one of wsiseg's is removed."""
    tmp = staging_path(final)
    remove_owned(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    write_marker(tmp, kind)
    return tmp


def write_marker(folder: str | os.PathLike, kind: str = "output") -> None:
    from . import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"created_by": "wsiseg", "version": __version__,
                                                   "kind": kind, "created": time.time()}) + "\n")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive during the block take effect when it ends, so it is never cut short.

    Handlers can only be changed in the main thread; elsewhere the block runs unprotected.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def publish(staging: str | os.PathLike, final: str | os.PathLike,
            inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Move the complete folder ``staging`` to ``final``, replacing an older output of wsiseg's atomically."""
    staging, final = Path(staging), Path(final)
    inputs = list(inputs)
    check_replaceable(final, inputs)
    aside = aside_path(final)
    remove_owned(aside)
    with signals_held():
        replaced = final.exists()
        if replaced:
            os.rename(final, aside)
        os.rename(staging, final)
    if replaced:
        shutil.rmtree(aside, ignore_errors=True)


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden name beside ``path`` that a file or folder is written under until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete ``tmp`` (a file, or a folder the caller wrote) to ``path``, replacing a file there."""
    with signals_held():
        os.replace(tmp, path)


def discard(tmp: str | os.PathLike) -> None:
    """Remove an unfinished ``tmp`` (file or folder), if it is there."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block ends without error."""
    tmp = temporary_name(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        discard(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
