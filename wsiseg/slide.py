"""One reader interface over whole-slide images.

Backends: OpenSlide (Aperio SVS, generic pyramidal TIFF, DICOM, MIRAX, ...),
TiffSlide (pure Python TIFF/SVS), and plain images (PNG/JPEG/TIFF) read whole
into memory. Coordinates follow OpenSlide: ``location`` is in level-0 pixels,
``size`` in pixels of the requested level. Every read returns RGB uint8 with
alpha composited on white.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# Resolutions outside this range are display defaults (72 dpi = 352.8 um/px),
# not the scanner's pixel size.
PLAUSIBLE_MPP = (0.02, 50.0)

TIFF_FIRST_SUFFIXES = {".svs", ".tif", ".tiff"}
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class SlideError(Exception):
    """A slide cannot be opened or read; the message names the file."""


class MppUnknownError(SlideError):
    """The slide's pixel size is unknown and none was given."""


@dataclass(frozen=True)
class SlideProperties:
    """What a slide says about itself."""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_from_file: float | None
    associated_images: tuple[str, ...]
    objective_power: float | None = None
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)


class Slide:
    """A whole-slide image opened through one backend.

    Instances are safe to share between threads: each thread gets its own
    backend handle.
    """

    backend_name = "abstract"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, force_mpp: bool = False):
        self.path = str(path)
        self._force_mpp = bool(force_mpp)
        self._mpp_override = None if mpp is None else float(mpp)
        if self._mpp_override is not None and not self._mpp_override > 0:
            raise SlideError(f"{self.path}: mpp must be positive, got {mpp}")
        self._local = threading.local()
        self.properties = self._read_properties()

    # --- backend hooks -------------------------------------------------
    def _open_handle(self) -> Any:
        raise NotImplementedError

    def _read_properties(self) -> SlideProperties:
        raise NotImplementedError

    def _read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def _associated(self, name: str) -> np.ndarray:
        raise NotImplementedError

    # --- public API ----------------------------------------------------
    @property
    def handle(self) -> Any:
        h = getattr(self._local, "handle", None)
        if h is None:
            h = self._open_handle()
            self._local.handle = h
        return h

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.properties.dimensions

    @property
    def level_count(self) -> int:
        return len(self.properties.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.properties.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.properties.level_downsamples

    @property
    def vendor(self) -> str | None:
        return self.properties.vendor

    @property
    def associated_images(self) -> tuple[str, ...]:
        return self.properties.associated_images

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel: the file's; the user's where the file records none, or where the user
        forces it (``force_mpp``); else None."""
        if self._mpp_override is not None and (self._force_mpp or self.properties.mpp_from_file is None):
            return self._mpp_override
        return self.properties.mpp_from_file

    @property
    def mpp_source(self) -> str | None:
        """Where :attr:`mpp` comes from: "file", "user" (the file records none), "forced" (the user's value
        replaces the file's), or None (unknown)."""
        if self._mpp_override is not None and self._force_mpp and self.properties.mpp_from_file is not None:
            return "forced"
        if self.properties.mpp_from_file is not None:
            return "file"
        return "user" if self._mpp_override is not None else None

    @property
    def mpp_note(self) -> str | None:
        """What the user should know about the mpp in use, when their value was not simply taken."""
        given, recorded = self._mpp_override, self.properties.mpp_from_file
        if given is None or recorded is None or abs(given - recorded) <= 0.02 * recorded:
            return None
        if self._force_mpp:
            return (f"mpp {given:g} µm/px forced by the user; the file records {recorded:g} (areas, densities and "
                    "the resolution the model sees follow the forced value)")
        return (f"the file records {recorded:g} µm/px, which is used; the given mpp {given:g} applies only to "
                "slides without one (force it with --force-mpp)")

    def require_mpp(self) -> float:
        """The level-0 mpp, or a clear error when neither file nor user gives one."""
        mpp = self.mpp
        if mpp is None:
            raise MppUnknownError(
                f"{self.path}: the file records no microns-per-pixel; "
                "give the scan resolution in microns per pixel (mpp; 0.25 for 40x, 0.5 for 20x)"
            )
        return mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` pixels at ``level``, from level-0 ``location``.

        Pixels outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        try:
            rgba = self._read_rgba((int(location[0]), int(location[1])), level, (w, h))
        except SlideError:
            raise
        except Exception as exc:  # backend errors: corrupt tiles, codec failures
            raise SlideError(
                f"{self.path}: cannot read region at {tuple(location)} level {level} size {(w, h)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return composite_on_white(rgba)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as RGB uint8."""
        if name not in self.associated_images:
            raise SlideError(f"{self.path}: no associated image {name!r} (has {list(self.associated_images)})")
        try:
            return composite_on_white(self._associated(name))
        except Exception as exc:
            raise SlideError(f"{self.path}: cannot read associated image {name!r}: {exc}") from exc

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB overview no larger than ``max_size`` on its long side, and its downsample from level 0."""
        import cv2

        w0, h0 = self.dimensions
        target = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(target, 1.0))
        lw, lh = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (lw, lh))
        scale = min(1.0, max_size / max(lw, lh))
        if scale < 1.0:
            tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        return img, w0 / img.shape[1]

    def close(self) -> None:
        h = getattr(self._local, "handle", None)
        if h is not None and hasattr(h, "close"):
            h.close()
        self._local = threading.local()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, dimensions={self.dimensions}, mpp={self.mpp})"

    def __getstate__(self) -> dict:
        return {"path": self.path, "mpp": self._mpp_override, "force_mpp": self._force_mpp}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], mpp=state["mpp"], force_mpp=state.get("force_mpp", False))


def composite_on_white(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from gray, RGB or RGBA input; transparent pixels become white."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            raise SlideError(f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    if arr.shape[2] == 4:
        if arr[:, :, 3].min() == 255:
            return np.ascontiguousarray(arr[:, :, :3])
        a = arr[:, :, 3:4].astype(np.uint16)
        rgb = arr[:, :, :3].astype(np.uint16)
        # OpenSlide returns premultiplied-free RGBA; blend over white.
        out = (rgb * a + 255 * (255 - a) + 127) // 255
        return out.astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    raise SlideError(f"unsupported channel count {arr.shape[2]}")


def _plausible_mpp(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(v) or not PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1]:
        return None
    return v


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


class OpenSlideSlide(Slide):
    """Slides read by the OpenSlide C library."""

    backend_name = "openslide"

    def _open_handle(self) -> Any:
        import openslide

        return openslide.OpenSlide(self.path)

    def _read_properties(self) -> SlideProperties:
        h = self.handle
        p = dict(h.properties)
        return SlideProperties(
            path=self.path,
            backend=self.backend_name,
            vendor=p.get("openslide.vendor"),
            dimensions=tuple(h.dimensions),
            level_dimensions=tuple(tuple(d) for d in h.level_dimensions),
            level_downsamples=tuple(float(d) for d in h.level_downsamples),
            mpp_from_file=_plausible_mpp(p.get("openslide.mpp-x")),
            associated_images=tuple(sorted(h.associated_images)),
            objective_power=_float_or_none(p.get("openslide.objective-power")),
            raw=p,
        )

    def _read_rgba(self, location, level, size) -> np.ndarray:
        return np.asarray(self.handle.read_region(location, level, size))

    def _associated(self, name: str) -> np.ndarray:
        return np.asarray(self.handle.associated_images[name])


class TiffSlideSlide(Slide):
    """TIFF-based slides (SVS, generic pyramidal TIFF) read with tiffslide's metadata.

    Regions of tiled, interleaved RGB(A) levels are assembled from the file's
    own tiles, decoded by imagecodecs in the calling thread and kept in a
    shared LRU cache of ``cache_bytes`` (64 MiB), so overlapping tiles decode each
    file tile once and reads scale across threads. Other layouts go through
    tiffslide.
    """

    backend_name = "tiffslide"
    cache_bytes = 64 * 2**20

    def _open_handle(self) -> Any:
        import tiffslide

        return tiffslide.TiffSlide(self.path)

    def _read_properties(self) -> SlideProperties:
        h = self.handle
        p = {k: str(v) for k, v in h.properties.items() if v is not None}
        self._init_direct(h)
        return SlideProperties(
            path=self.path,
            backend=self.backend_name,
            vendor=p.get("tiffslide.vendor"),
            dimensions=tuple(int(v) for v in h.dimensions),
            level_dimensions=tuple(tuple(int(v) for v in d) for d in h.level_dimensions),
            level_downsamples=tuple(float(d) for d in h.level_downsamples),
            mpp_from_file=_plausible_mpp(p.get("tiffslide.mpp-x")),
            associated_images=tuple(sorted(h.associated_images)),
            objective_power=_float_or_none(p.get("tiffslide.objective-power")),
            raw=p,
        )

    def _init_direct(self, h: Any) -> None:
        from collections import OrderedDict

        self._cache: OrderedDict = OrderedDict()
        self._cache_size = 0
        self._cache_lock = threading.Lock()
        self._fd: int | None = None
        self._pages: list[Any] = []
        try:
            series = h.ts_tifffile.series[int(h.properties["tiffslide.series-index"])]
            for lvl in series.levels:
                page = lvl[0] if len(lvl) == 1 else None
                ok = (
                    page is not None
                    and getattr(page, "is_tiled", False)
                    and page.planarconfig == 1
                    and page.samplesperpixel in (3, 4)
                    and page.bitspersample == 8
                    and len(page.shape) == 3
                )
                self._pages.append(page if ok else None)
            self._fd = os.open(self.path, os.O_RDONLY)
        except Exception:
            self._pages = []

    def _read_rgba(self, location, level, size) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(lw, x + w), min(lh, y + h)
        if x1 <= x0 or y1 <= y0:
            return out
        page = self._pages[level] if level < len(self._pages) else None
        if page is not None and self._fd is not None:
            self._assemble(page, level, x0, y0, x1, y1, out[y0 - y : y1 - y, x0 - x : x1 - x])
            return out
        # tiffslide pads out-of-slide pixels with black; read the inside and pad white.
        inside = composite_on_white(
            self.handle.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0), as_array=True)
        )
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    def _assemble(self, page: Any, level: int, x0: int, y0: int, x1: int, y1: int, dst: np.ndarray) -> None:
        tw, th = page.tilewidth, page.tilelength
        ncols = (page.shape[1] + tw - 1) // tw
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(page, level, ty * ncols + tx)
                ox, oy = tx * tw, ty * th
                sx0, sy0 = max(x0, ox), max(y0, oy)
                sx1, sy1 = min(x1, ox + tw), min(y1, oy + th)
                dst[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = composite_on_white(
                    tile[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
                )

    def _tile(self, page: Any, level: int, index: int) -> np.ndarray:
        key = (level, index)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        nbytes = page.databytecounts[index]
        if nbytes == 0:  # sparse tile
            arr = np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        else:
            data = os.pread(self._fd, nbytes, page.dataoffsets[index])
            if page.compression == 7:  # JPEG: libjpeg fills a truncated stream with grey instead of failing
                end = data.rstrip(b"\0")
                if not data.startswith(b"\xff\xd8") or not end.endswith(b"\xff\xd9"):
                    raise ValueError(f"JPEG tile {index} of level {level} is damaged (its data is cut short or "
                                     "overwritten)")
                problem = jpeg_problem(data, page.jpegtables)
                if problem:
                    raise ValueError(f"JPEG tile {index} of level {level} is damaged ({problem})")
            arr = page.decode(data, index, jpegtables=page.jpegtables)[0]
            if arr is None:
                raise ValueError(f"tile {index} of level {level} could not be decoded")
            arr = arr.reshape(arr.shape[-3:])
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = arr
                self._cache_size += arr.nbytes
                while self._cache_size > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_size -= old.nbytes
        return arr

    def _associated(self, name: str) -> np.ndarray:
        return np.asarray(self.handle.associated_images[name])

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        super().close()


class ImageSlide(Slide):
    """A plain image (PNG, JPEG, flat TIFF) as a one-level slide; the mpp must be given."""

    backend_name = "image"

    _pixels: np.ndarray | None = None
    _load_lock = threading.Lock()

    @property
    def handle(self) -> np.ndarray:
        # One decoded copy shared by all threads.
        if self._pixels is None:
            with self._load_lock:
                if self._pixels is None:
                    self._pixels = _load_plain_image(self.path)
        return self._pixels

    def _read_properties(self) -> SlideProperties:
        img = self.handle
        h, w = img.shape[:2]
        return SlideProperties(
            path=self.path,
            backend=self.backend_name,
            vendor=None,
            dimensions=(w, h),
            level_dimensions=((w, h),),
            level_downsamples=(1.0,),
            mpp_from_file=None,
            associated_images=(),
            raw={},
        )

    def _read_rgba(self, location, level, size) -> np.ndarray:
        img = self.handle
        x, y = location
        w, h = size
        out = np.full((h, w, img.shape[2]), 255, dtype=np.uint8)
        if img.shape[2] == 4:
            out[..., 3] = 0
        H, W = img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = None


class ArraySlide(ImageSlide):
    """An RGB image held in memory as a one-level slide at ``mpp`` (for evaluation: labelled images are read
    exactly as a slide of them would be)."""

    backend_name = "array"

    def __init__(self, image: np.ndarray, mpp: float, name: str = "image"):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise SlideError(f"{name}: expected an RGB uint8 image, got {image.dtype} {image.shape}")
        self._pixels = np.ascontiguousarray(image)
        super().__init__(name, mpp=mpp)

    @property
    def handle(self) -> np.ndarray:
        return self._pixels

    def close(self) -> None:
        pass


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def jpeg_problem(data: bytes, tables: bytes | None = None) -> str | None:
    """What libjpeg-turbo reports as wrong with a JPEG stream (``tables``: the TIFF's shared JPEGTables), or
    None. Decoders otherwise fill what a damaged stream lacks with flat colour and say nothing: a scan that
    stops early at a proper end-of-image marker decodes as a grey block (simplejpeg's strict mode raises)."""
    import simplejpeg

    if tables and len(tables) > 4 and data[:2] == b"\xff\xd8":
        data = tables[:-2] + data[2:]  # an abbreviated stream: the tables, then the tile without its SOI
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, fastdct=True, fastupsample=True)
    except ValueError as exc:
        return str(exc).strip() or "libjpeg error"
    return None


def _check_jpeg_segments(path: str) -> None:
    """A ``SlideError`` naming the first damaged JPEG tile or strip of a flat TIFF's first image, if any."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.compression != 7:
            return
        with open(path, "rb") as f:
            for i, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                if not n:
                    continue
                f.seek(off)
                problem = jpeg_problem(f.read(n), page.jpegtables)
                if problem:
                    raise SlideError(f"{path}: JPEG tile {i} is damaged ({problem})")


def _load_plain_image(path: str) -> np.ndarray:
    """A plain image decoded once into RGB(A) ``uint8``, with as few copies as its format allows."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if suffix in {".tif", ".tiff"}:
        import tifffile

        _check_jpeg_segments(path)
        img = tifffile.imread(path)
        if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[2] not in (3, 4):
            img = np.moveaxis(img, 0, -1)
    else:
        Image.MAX_IMAGE_PIXELS = None  # the size is checked against the memory below, not Pillow's guess
        with Image.open(path) as im:
            w, h, mode, fmt = im.width, im.height, im.mode, im.format
            need = w * h * 4
            if need > _available_memory() // 2:
                raise SlideError(f"{path}: a {w} x {h} plain image needs {need / 2**30:.1f} GiB decoded, more than half "
                                 "of the free memory; convert it to a tiled pyramidal TIFF (for example "
                                 "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)")
            if mode in ("I", "F"):
                raise SlideError(f"{path}: {mode!r} images (32-bit integer or float pixels) are not H&E images; "
                                 "convert the file to 8-bit RGB")
            img = None
            if fmt in ("PNG", "JPEG") and mode in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B"):
                import imagecodecs

                with open(path, "rb") as f:
                    data = f.read()
                if fmt == "JPEG":
                    problem = jpeg_problem(data)
                    if problem:
                        raise SlideError(f"{path}: the JPEG image is damaged ({problem})")
                img = imagecodecs.png_decode(data) if fmt == "PNG" else imagecodecs.jpeg8_decode(data)
                del data
            if img is None:
                im = im.convert("RGBA") if mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
                img = np.asarray(im)
    if img.dtype == np.uint16 and (img.ndim == 2 or img.shape[2] in (1, 3)):  # 16-bit: keep the top 8 bits' worth
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey, grey + alpha
        grey = img[..., :1]
        img = np.concatenate([grey, grey, grey] + ([img[..., 1:]] if img.shape[2] == 2 else []), axis=2)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise SlideError(f"{path}: expected an RGB image, got array of shape {img.shape}")
    if img.dtype != np.uint8:
        if img.dtype != np.uint16:
            raise SlideError(f"{path}: {img.dtype} pixels are not supported; convert the file to 8-bit RGB")
        img = composite_on_white(img)
    return np.ascontiguousarray(img)


BACKENDS: dict[str, type[Slide]] = {
    "openslide": OpenSlideSlide,
    "tiffslide": TiffSlideSlide,
    "image": ImageSlide,
}


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: str = "auto",
               force_mpp: bool = False) -> Slide:
    """Open a slide, trying OpenSlide, then TiffSlide, then a plain-image reader.

    ``mpp`` (level-0 microns per pixel) is used where the file records none; with ``force_mpp`` it replaces
    the file's (see :attr:`Slide.mpp_source`).

    The slide is checked by reading a small region of its coarsest level, so a
    file that opens but cannot be decoded fails here, not halfway through a run.
    """
    path = str(path)
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SlideError(f"{path}: is a directory, not a slide file")
    if os.path.getsize(path) == 0:
        raise SlideError(f"{path}: file is empty")
    if backend == "auto":
        # tiffslide's direct tile path is the faster reader for the TIFF family.
        tiff_family = Path(path).suffix.lower() in TIFF_FIRST_SUFFIXES
        names = ["tiffslide", "openslide"] if tiff_family else ["openslide", "tiffslide"]
        if Path(path).suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            names.append("image")
    elif backend in BACKENDS:
        names = [backend]
    else:
        raise SlideError(f"{path}: unknown backend {backend!r} (choose from auto, {', '.join(BACKENDS)})")
    failures = []
    for name in names:
        try:
            slide = BACKENDS[name](path, mpp=mpp, force_mpp=force_mpp)
            _probe(slide)
            return slide
        except MppUnknownError:
            raise
        except SlideError as exc:
            failures.append(f"{name}: {str(exc).removeprefix(path + ': ')}")
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    raise SlideError(f"{path}: cannot open as a slide ({'; '.join(failures)})")


def _probe(slide: Slide) -> None:
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    if w <= 0 or h <= 0:
        raise SlideError(f"{slide.path}: empty image ({w}x{h})")
    ds = slide.level_downsamples[level]
    cx, cy = w // 2, h // 2
    slide.read_region((int(cx * ds), int(cy * ds)), level, (min(w, 16), min(h, 16)))
