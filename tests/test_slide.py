from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import synthetic_he, write_pyramid_tiff

from wsiseg.slide import MppUnknownError, SlideError, composite_on_white, open_slide

DAMAGED = ["broken.svs", "unreadable.svs", "unopenable.tiff", "small_dicom.dcm"]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_aperio_jpeg_svs(slides_dir, backend):
    s = open_slide(slides_dir / "CMU-1-Small-Region.svs", backend=backend)
    assert s.dimensions == (2220, 2967)
    assert s.vendor == "aperio"
    assert s.mpp == pytest.approx(0.499)
    assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
    region = s.read_region((1000, 1000), 0, (300, 200))
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    assert region.std() > 10  # tissue, not a blank fill
    label = s.associated_image("label")
    assert label.ndim == 3 and label.shape[2] == 3


def test_backends_agree_on_pixels(slides_dir):
    a = open_slide(slides_dir / "CMU-1-Small-Region.svs", backend="openslide").read_region((512, 700), 0, (256, 256))
    b = open_slide(slides_dir / "CMU-1-Small-Region.svs", backend="tiffslide").read_region((512, 700), 0, (256, 256))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_jpeg2000_svs_without_mpp(slides_dir):
    path = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    s = open_slide(path)
    assert s.level_count == 2
    assert s.level_dimensions[0] == (4443, 3567)
    assert s.mpp is None
    with pytest.raises(MppUnknownError, match="microns per pixel") as err:
        s.require_mpp()
    assert "TCGA-CR-7395" in str(err.value)
    s2 = open_slide(path, mpp=0.5)
    assert s2.require_mpp() == 0.5
    region = s2.read_region((2000, 1500), 1, (128, 128))
    assert region.shape == (128, 128, 3) and region.std() > 5


def test_generic_tiff_ignores_display_dpi(slides_dir):
    s = open_slide(slides_dir / "boxes.tiff")
    assert s.level_count == 4
    assert s.mpp is None  # 72 dpi in the header is no scan resolution
    assert open_slide(slides_dir / "boxes.tiff", mpp=0.25).mpp == 0.25


def test_dicom_series_file(slides_dir):
    s = open_slide(slides_dir / "boxes_0.dcm")
    assert s.vendor == "dicom"
    assert s.mpp == pytest.approx(0.499)
    assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_files_fail_clearly_in_a_subprocess(slides_dir, name):
    # A subprocess proves no crash (segfault) and no hang, not only no exception.
    path = slides_dir / name
    code = (
        "import sys\nfrom wsiseg import open_slide, SlideError\n"
        f"try:\n    open_slide({str(path)!r})\nexcept SlideError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert name in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty.svs: file is empty"):
        open_slide(empty)
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)


def test_truncated_generated_tiff_fails_clearly(tmp_path):
    img, _ = synthetic_he(512, 512)
    path = write_pyramid_tiff(tmp_path / "t.tif", img, 0.25, levels=2)
    data = path.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated.tif"):
        s = open_slide(bad)
        s.read_region((0, 0), 0, (512, 512))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_generated_pyramid_levels_and_mpp(tmp_path, backend):
    img, _ = synthetic_he(1024, 1536)
    path = write_pyramid_tiff(tmp_path / "p.tif", img, 0.25, levels=3, compression="zlib")
    s = open_slide(path, backend=backend)
    assert s.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
    assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert s.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(s.read_region((100, 200), 0, (64, 48)), img[200:248, 100:164])
    # reads past the edge are white
    edge = s.read_region((1500, 1000), 0, (64, 64))
    np.testing.assert_array_equal(edge[:24, :36], img[1000:1024, 1500:1536])
    assert (edge[30:, :] == 255).all()


def test_plain_image_needs_mpp(tmp_path):
    from PIL import Image

    img, _ = synthetic_he(300, 400)
    path = tmp_path / "tile.png"
    Image.fromarray(img).save(path)
    s = open_slide(path)
    assert s.backend_name == "image" and s.dimensions == (400, 300)
    with pytest.raises(MppUnknownError, match="tile.png"):
        s.require_mpp()
    s = open_slide(path, mpp=0.25)
    assert s.require_mpp() == 0.25
    np.testing.assert_array_equal(s.read_region((10, 20), 0, (50, 40)), img[20:60, 10:60])


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    out = composite_on_white(rgba)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert 120 <= out[1, 0, 0] <= 130


def test_bad_mpp_override(slides_dir):
    with pytest.raises(SlideError, match="positive"):
        open_slide(slides_dir / "CMU-1-Small-Region.svs", mpp=-1)


def test_slide_is_picklable(slides_dir):
    import pickle

    s = open_slide(slides_dir / "CMU-1-Small-Region.svs", mpp=0.5, force_mpp=True)
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.mpp == 0.5 and s2.mpp_source == "forced" and s2.dimensions == s.dimensions


def test_a_recorded_mpp_wins_unless_forced(slides_dir):
    path = slides_dir / "CMU-1-Small-Region.svs"  # records 0.499 µm/px
    s = open_slide(path, mpp=0.2527)
    assert s.mpp == pytest.approx(0.499) and s.mpp_source == "file"
    assert "records 0.499" in s.mpp_note and "--force-mpp" in s.mpp_note
    f = open_slide(path, mpp=0.2527, force_mpp=True)
    assert f.mpp == 0.2527 and f.mpp_source == "forced" and "forced" in f.mpp_note
    assert open_slide(path).mpp_note is None and open_slide(path, mpp=0.5).mpp_note is None  # within 2%


def _damage_tile(path, index):
    """Cut the JPEG data of tile ``index`` of level 0 short (zeros over its second half) in place."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(off + n // 2)
        f.write(b"\0" * (n - n // 2))


def test_damaged_jpeg_tile_is_an_error_not_grey(tmp_path):
    from conftest import synthetic_he, write_pyramid_tiff

    img, _ = synthetic_he(1024, 1024, seed=2, n_nuclei=200)
    path = write_pyramid_tiff(tmp_path / "s.tif", img, 0.25, levels=2, tile=256)
    _damage_tile(path, 5)
    for backend in ("auto", "tiffslide"):
        s = open_slide(path, backend=backend)
        s.read_region((0, 0), 0, (256, 256))  # an undamaged tile reads
        with pytest.raises(SlideError, match="s.tif"):
            s.read_region((256, 256), 0, (256, 256))


def test_16bit_grey_png_is_read_not_white(tmp_path):
    from PIL import Image

    ramp = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I;16")
    s = open_slide(tmp_path / "g.png", mpp=0.25)
    rgb = s.read_region((0, 0), 0, (256, 256))
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert rgb.min() == 0 and rgb.max() == 255


def test_large_plain_images_read_or_refused_by_memory_not_pillows_limit(tmp_path, monkeypatch):
    from PIL import Image

    import wsiseg.slide as slide_mod

    img, _ = synthetic_he(300, 400, seed=4, n_nuclei=20)
    Image.fromarray(img).save(tmp_path / "p.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would call this a decompression bomb
    np.testing.assert_array_equal(open_slide(tmp_path / "p.png", mpp=0.25).read_region((0, 0), 0, (400, 300)), img)
    monkeypatch.setattr(slide_mod, "_available_memory", lambda: 300 * 400 * 4)
    with pytest.raises(SlideError, match="p.png.*tiled pyramidal TIFF"):
        open_slide(tmp_path / "p.png", mpp=0.25, backend="image")
