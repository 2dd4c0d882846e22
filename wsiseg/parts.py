"""A slide's run in parts: the model's output for each part of the tile grid, kept on disk so that an
interrupted run continues where it stopped.

**Parts.** The tiles of a slide, in the order the run reads them, are cut into consecutive parts of
``tiles_per_part`` tiles, a whole number of batches, so that a batch never straddles two parts and a tile is
inferred in the same batch whether its part is computed in an uninterrupted run or after a resume. A part's
file holds the model's raw output for its tiles (``RawDetections`` or ``TileDetections``, exactly, as numpy
arrays in an ``.npz`` without pickles) and the run's fingerprint; it is written to a temporary name and renamed.

**Resume.** The journal is a hidden folder beside the output (``.OUT.parts``). A rerun with the same
fingerprint (slide file, model weights and card, thresholds, device and precision, tiling, batch size) reads
the finished parts instead of running the model on their tiles; the tiles' pixels are read again and
everything downstream (stitching, cells, every writer) runs as in one pass, so the outputs are the same bytes.
A part file that cannot be read, belongs to another fingerprint or holds other tiles is redone, never used. The
journal is deleted once the outputs are published.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .atomic import temporary_name
from .detections import ModelOutput, RawDetections, TileDetections

MAGIC = "wsiseg-part-1"


def journal_dir(out_dir: str | os.PathLike) -> Path:
    """The hidden folder beside ``out_dir`` that holds a run's finished parts."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.parts"


def part_tiles(tiles_per_part: int, batch_size: int) -> int:
    """Tiles per part rounded up to a whole number of batches (at least one batch)."""
    if tiles_per_part < 1:
        raise ValueError(f"tiles per part must be >= 1, got {tiles_per_part}")
    return max(1, -(-tiles_per_part // batch_size)) * batch_size


def _pack(out: ModelOutput, k: int, arrays: dict) -> None:
    p = f"t{k}_"
    if isinstance(out, RawDetections):
        arrays[p + "kind"] = np.array(0, np.uint8)
        arrays[p + "boxes"], arrays[p + "scores"] = out.boxes, out.scores
        arrays[p + "labels"], arrays[p + "mask_probs"] = out.labels, out.mask_probs
    else:
        arrays[p + "kind"] = np.array(1, np.uint8)
        arrays[p + "boxes"], arrays[p + "scores"], arrays[p + "labels"] = out.boxes, out.scores, out.labels
        shapes = np.array([m.shape for m in out.masks], np.int32).reshape(-1, 2)
        arrays[p + "mask_shapes"] = shapes
        arrays[p + "masks"] = (np.concatenate([m.ravel() for m in out.masks]) if out.masks
                               else np.zeros(0, bool))
    if out.class_probs is not None:
        arrays[p + "class_probs"] = out.class_probs


def _unpack(z, k: int) -> ModelOutput:
    p = f"t{k}_"
    probs = z[p + "class_probs"] if p + "class_probs" in z.files else None
    if int(z[p + "kind"]) == 0:
        return RawDetections(z[p + "boxes"], z[p + "scores"], z[p + "labels"], z[p + "mask_probs"], probs)
    flat, masks, at = z[p + "masks"], [], 0
    for h, w in z[p + "mask_shapes"]:
        masks.append(flat[at : at + h * w].reshape(h, w))
        at += h * w
    if at != len(flat):
        raise ValueError("mask pixels do not add up")
    return TileDetections(z[p + "boxes"], z[p + "scores"], z[p + "labels"], masks, probs)


class Journal:
    """The finished parts of one run (one fingerprint) in ``path``."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.reused = 0
        self.redone = 0  # part files found unusable (damaged, foreign) and computed again
        stamp = self.path / "fingerprint"
        if self.path.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            shutil.rmtree(self.path)  # another run's parts: never reused
        self.path.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            stamp.write_text(fingerprint)

    @classmethod
    def attach(cls, path: str | os.PathLike, fingerprint: str) -> Journal:
        """The journal another process of the same run opened (nothing is checked or removed)."""
        j = cls.__new__(cls)
        j.path, j.fingerprint, j.reused, j.redone = Path(path), fingerprint, 0, 0
        return j

    def _file(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.npz"

    def has(self, index: int) -> bool:
        return self._file(index).is_file()

    def load(self, index: int, tile_indices: list[int]) -> list[ModelOutput] | None:
        """The part's outputs, tile by tile; None (and the file removed) where it is not this run's part."""
        f = self._file(index)
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("magic") != MAGIC or meta.get("fingerprint") != self.fingerprint \
                        or meta.get("tiles") != list(tile_indices):
                    raise ValueError("not a part of this run")
                outs = [_unpack(z, k) for k in range(len(tile_indices))]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            f.unlink(missing_ok=True)
            self.redone += 1
            return None
        self.reused += 1
        return outs

    def save(self, index: int, tile_indices: list[int], outs: list[ModelOutput]) -> None:
        arrays: dict[str, np.ndarray] = {}
        meta = {"magic": MAGIC, "fingerprint": self.fingerprint, "tiles": list(tile_indices)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        for k, out in enumerate(outs):
            _pack(out, k, arrays)
        f = self._file(index)
        tmp = temporary_name(f)
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, f)

    @staticmethod
    def discard_if_empty(path: str | os.PathLike) -> None:
        """Remove a journal folder that holds no finished part (a run that failed before its first one)."""
        path = Path(path)
        if path.is_dir() and not any(path.glob("part-*.npz")):
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def discard(path: str | os.PathLike) -> None:
        """Remove a journal folder (after its run was published)."""
        shutil.rmtree(path, ignore_errors=True)


def fingerprint(parts: dict) -> str:
    """sha256 of a run's identity (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
