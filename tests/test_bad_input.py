"""Hostile input, names and faults against the command line, each in a sandbox folder.

Every case runs ``wsiseg`` as a user would (a subprocess) and asserts: the exit code; one error line
and no traceback; no output that looks complete where the run failed; bounded time and memory; and
that every file outside the output folder, and every user file inside it, is byte for byte untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_he

from wsiseg.atomic import MARKER

MAX_RSS = 4 << 30  # bytes of resident memory any case may reach
TIME_LIMIT = 240  # seconds of CPU time, and of wall time, for one case


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (TIME_LIMIT, TIME_LIMIT))


def _png(path: Path, size: int = 256, seed: int = 0) -> Path:
    from PIL import Image

    img, _ = synthetic_he(size, size, seed=seed, n_nuclei=size // 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")
    return path


def _checksums(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` except those inside ``skip`` (not following links)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        d = Path(dirpath)
        if skip is not None and (d == skip or skip in d.parents):
            continue
        for f in files:
            if f.startswith(".") and f.endswith(".lock"):  # wsiseg's own lock files (they hold the pid)
                continue
            p = d / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() else "link"
    return out


@dataclass
class Case:
    name: str
    args: list[str]  # {sb} is the sandbox folder
    rc: int
    setup: object = None  # callable(sandbox)
    out: str | None = "out"  # the output folder, relative to the sandbox; files elsewhere must not change
    stderr_has: list[str] = field(default_factory=list)
    check: object = None  # callable(sandbox, proc)
    user_files_in_out: bool = True  # user files placed in the output folder before the run must survive


def _user_files(sb: Path) -> None:
    """A user's slides and notes around (and in) the output folder."""
    (sb / "notes.txt").write_text("my annotations\n")
    (sb / "slides").mkdir(exist_ok=True)
    _png(sb / "slides" / "keep.png", seed=9)


def _batch_names(sb: Path) -> None:
    _user_files(sb)
    for i, n in enumerate(["..png", "...png", "x.png", "x.partial.png", "manifest.json.png", "X.png"]):
        _png(sb / "in" / n, seed=i)
    (sb / "out").mkdir()
    (sb / "out" / "earlier-results.txt").write_text("user notes in the batch folder\n")


def _check_batch_names(sb: Path, proc) -> None:
    man = json.loads((sb / "out" / "manifest.json").read_text())
    slides = man["slides"]
    assert len(slides) == 6 and all(e["status"] == "done" for e in slides.values()), slides
    outs = {Path(e["output"]).resolve() for e in slides.values()}
    assert len(outs) == 6 and all(o.parent == (sb / "out").resolve() for o in outs)
    for e in slides.values():  # each slide's own outputs, complete
        summ = json.loads((Path(e["output"]) / "summary.json").read_text())
        assert Path(summ["slide"]).name == Path(e["slide"]).name
    assert (sb / "out" / "earlier-results.txt").read_text() == "user notes in the batch folder\n"


def _foreign_slide_folder(sb: Path) -> None:
    _user_files(sb)
    _png(sb / "in" / "a.png")
    (sb / "out" / "a").mkdir(parents=True)
    (sb / "out" / "a" / "mine.txt").write_text("not wsiseg's\n")


def _check_refused_slide(sb: Path, proc) -> None:
    entry = json.loads((sb / "out" / "manifest.json").read_text())["slides"]["a"]
    assert entry["status"] == "failed" and entry["reason"] == "output_not_replaceable"
    assert "not created by wsiseg" in entry["error"] and "not created by wsiseg" in proc.stdout


def _slide_in_out(sb: Path) -> None:
    _user_files(sb)
    _png(sb / "out" / "slide.png")
    (sb / "out" / MARKER).write_text("{}")  # even a folder wsiseg made is kept when it holds the input


def _foreign_out(sb: Path) -> None:
    _user_files(sb)
    (sb / "out").mkdir()
    (sb / "out" / "thesis.docx").write_text("years of work\n")


def _foreign_partial(sb: Path) -> None:
    _user_files(sb)
    (sb / ".out.partial").mkdir()
    (sb / ".out.partial" / "draft.txt").write_text("a folder of the user's that happens to have this name\n")


def _out_is_file(sb: Path) -> None:
    _user_files(sb)
    (sb / "out").write_text("a file, not a folder\n")


def _out_is_link(sb: Path) -> None:
    _user_files(sb)
    (sb / "elsewhere").mkdir()
    (sb / "elsewhere" / MARKER).write_text("{}")
    (sb / "elsewhere" / "data.txt").write_text("behind the link\n")
    (sb / "out").symlink_to(sb / "elsewhere")


def _no_output(sb: Path, proc) -> None:
    assert not (sb / "out").exists()


def _damaged_checkpoint(sb: Path) -> None:
    _user_files(sb)
    (sb / "run").mkdir()
    (sb / "run" / "last.pt").write_bytes(b"")
    (sb / "cfg.yaml").write_text(f"data: {sb / 'data'}\nout: {sb / 'run'}\nsteps: 1\nval_fraction: 0.5\n"
                                 "model: {width: 8}\n")
    from PIL import Image

    (sb / "data" / "images").mkdir(parents=True)
    (sb / "data" / "labels").mkdir()
    for name in "ab":
        img, lab = synthetic_he(128, 128, seed=ord(name), n_nuclei=12)
        Image.fromarray(img).save(sb / "data" / "images" / f"{name}.png")
        Image.fromarray(lab.astype(np.uint16)).save(sb / "data" / "labels" / f"{name}.png")


def _slide_png(sb: Path) -> None:
    _user_files(sb)


def _bad_card(field_name: str, value):
    def setup(sb: Path) -> None:
        from safetensors.numpy import load_file, save_file

        from wsiseg.card import default_model_path

        _user_files(sb)
        src = default_model_path()
        from safetensors import safe_open

        with safe_open(src, framework="numpy") as f:
            card = json.loads(f.metadata()["wsiseg_card"])
        card[field_name] = value
        save_file(load_file(src), str(sb / "bad.safetensors"), metadata={"wsiseg_card": json.dumps(card)})

    return setup


def _batch_done(sb: Path) -> None:
    _user_files(sb)
    _png(sb / "in" / "a.png")
    _run(["batch", f"{sb}/in", "--out", f"{sb}/out", *BATCH], sb)


def _check_redone(sb: Path, proc) -> None:
    assert "[done] a" in proc.stdout, proc.stdout  # redone, not skipped


def _truncate_table(sb: Path) -> None:
    _batch_done(sb)
    t = sb / "out" / "a" / "a.nuclei.parquet"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])


def _bad_manifest(sb: Path) -> None:
    _user_files(sb)
    _png(sb / "in" / "a.png")
    (sb / "out").mkdir()
    (sb / "out" / "manifest.json").write_text('["not", "a", "manifest"]')


def _eval_data(sb: Path, images: bool) -> None:
    _user_files(sb)
    (sb / "data" / "images").mkdir(parents=True)
    (sb / "data" / "labels").mkdir()
    if images:
        from PIL import Image

        img, lab = synthetic_he(128, 128, seed=1, n_nuclei=10)
        Image.fromarray(img).save(sb / "data" / "images" / "a.png")
        Image.fromarray(lab.astype(np.uint16)).save(sb / "data" / "labels" / "a.png")
        (sb / "split.json").write_text('{"train": ["a"]}')


def _model_in_out(sb: Path) -> None:
    """An earlier output folder of wsiseg's that a user has since put the model file into."""
    import shutil

    from wsiseg.card import default_model_path

    _slide_png(sb)
    _run(["segment", f"{sb}/slides/keep.png", "--out", f"{sb}/out", *SLIDE], sb)
    shutil.copy(default_model_path(), sb / "out" / "model.safetensors")


def _foreign_summary(sb: Path) -> None:
    _user_files(sb)
    (sb / "out").mkdir()
    (sb / "out" / "summary.json").write_text('{"accuracy": 0.9}')
    (sb / "out" / "x.nuclei.csv").write_text("id\n1\n")


def _bad_config(key: str, value):
    """The bundled model with one field of its card's network config changed."""
    def setup(sb: Path) -> None:
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        from wsiseg.card import default_model_path

        _user_files(sb)
        src = default_model_path()
        with safe_open(src, framework="numpy") as f:
            card = json.loads(f.metadata()["wsiseg_card"])
        card["config"][key] = value
        save_file(load_file(src), str(sb / "bad.safetensors"), metadata={"wsiseg_card": json.dumps(card)})

    return setup


def _bad_tensor(kind: str):
    """The bundled model with one tensor damaged: stored as int8, holding NaN, or of the wrong shape."""
    def setup(sb: Path) -> None:
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        from wsiseg.card import default_model_path

        _user_files(sb)
        src = default_model_path()
        with safe_open(src, framework="numpy") as f:
            meta = f.metadata()
        state = load_file(src)
        k = "roi_heads.box_predictor.cls_score.weight"
        if kind == "int8":
            state[k] = state[k].astype(np.int8)
        elif kind == "nan":
            state[k] = state[k].copy()
            state[k][0, 0] = np.nan
        else:
            state[k] = state[k][:, :-1].copy()
        save_file(state, str(sb / "bad.safetensors"), metadata=meta)

    return setup


def _cmu1_in(sb: Path) -> None:
    _user_files(sb)
    (sb / "in").mkdir()
    (sb / "in" / "cmu1.svs").symlink_to(Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs")


def _check_recorded_mpp_won(sb: Path, proc) -> None:
    summ = json.loads((sb / "out" / "cmu1" / "summary.json").read_text())
    assert abs(summ["slide_mpp"] - 0.499) < 1e-3 and summ["slide_mpp_source"] == "file"
    assert any("records 0.499" in w and "--force-mpp" in w for w in summ["warnings"])


def _check_forced_mpp(sb: Path, proc) -> None:
    summ = json.loads((sb / "out" / "cmu1" / "summary.json").read_text())
    assert summ["slide_mpp"] == 0.2527 and summ["slide_mpp_source"] == "forced"
    assert any("forced" in w for w in summ["warnings"])


def _tree_with_output(sb: Path) -> None:
    """Slides in a tree, a batch output inside it from an earlier run, and a link back up the tree."""
    _user_files(sb)
    _png(sb / "tree" / "a.png", seed=1)
    _png(sb / "tree" / "deep" / "b.png", seed=2)
    (sb / "tree" / "deep" / "up").symlink_to(sb / "tree")  # a loop
    _run(["batch", f"{sb}/tree/**/*.png", "--out", f"{sb}/tree/out", *BATCH], sb)


def _check_two_slides(sb: Path, proc) -> None:
    slides = json.loads((sb / "tree" / "out" / "manifest.json").read_text())["slides"]
    assert sorted(Path(e["slide"]).name for e in slides.values()) == ["a.png", "b.png"], slides


def _hashed_name_twin(sb: Path) -> None:
    import hashlib

    _user_files(sb)
    _png(sb / "x" / "a.png", seed=1)
    _png(sb / "y" / "a.png", seed=2)
    h = hashlib.sha1(os.path.abspath(sb / "x" / "a.png").encode()).hexdigest()[:8]
    _png(sb / "z" / f"a-{h}.png", seed=3)


def _check_three_done(sb: Path, proc) -> None:
    slides = json.loads((sb / "out" / "manifest.json").read_text())["slides"]
    assert len(slides) == 3 and all(e["status"] == "done" for e in slides.values()), slides
    assert len({e["output"] for e in slides.values()}) == 3


def _train_cfg(extra: str, val: str = "val_names: [a]"):
    def setup(sb: Path) -> None:
        _damaged_checkpoint(sb)
        (sb / "run" / "last.pt").unlink()
        (sb / "cfg.yaml").write_text(f"data: {sb / 'data'}\nout: {sb / 'run'}\nsteps: 1\n{val}\n"
                                     f"model: {{width: 8}}\n{extra}\n")

    return setup


def _split_with_numbers(sb: Path) -> None:
    _train_cfg("")(sb)
    (sb / "split.json").write_text('{"train": ["a"], "val": [1, 2]}')
    (sb / "cfg.yaml").write_text(f"out: {sb / 'run'}\nsteps: 1\nmodel: {{width: 8}}\n"
                                 f"datasets:\n  - {{path: {sb / 'data'}, split: {sb / 'split.json'}}}\n")


def _early_eoi_tile(sb: Path) -> None:
    """A pyramidal JPEG TIFF one of whose tiles has its scan cut short before a proper end-of-image marker."""
    import tifffile

    from conftest import write_pyramid_tiff

    _user_files(sb)
    img, _ = synthetic_he(512, 512, seed=4, n_nuclei=80)
    path = write_pyramid_tiff(sb / "slides" / "eoi.tif", img, 0.25, levels=2, tile=256)
    with tifffile.TiffFile(path) as tif:  # the last tile of every level
        tiles = [(lv.pages[0].dataoffsets[-1], lv.pages[0].databytecounts[-1]) for lv in tif.series[0].levels]
    data = bytearray(path.read_bytes())
    for off, n in tiles:
        tile = bytes(data[off : off + n])
        sos = tile.find(b"\xff\xda")
        scan = sos + 2 + int.from_bytes(tile[sos + 2 : sos + 4], "big")
        cut = tile[: scan + (n - scan) // 3] + b"\xff\xd9"
        data[off : off + n] = cut + b"\0" * (n - len(cut))
    path.write_bytes(bytes(data))


def _bad_summary_fields(sb: Path) -> None:
    _user_files(sb)
    (sb / "out").mkdir()
    (sb / "out" / "summary.json").write_text(json.dumps(
        {"wsiseg_version": "0", "slide": "x.svs", "slide_dimensions": ["wide", "tall"], "slide_mpp": "fine",
         "model": "m", "nuclei_per_class": {"a": 1}}))
    (sb / "out" / "x.nuclei.csv").write_text("id,class_id,centroid_x_um,centroid_y_um\n1,1,1.0,1.0\n")


SLIDE = ["--mpp", "0.25", "--whole-slide", "--model", "threshold", "--quiet", "--no-stats", "--no-zarr"]
BATCH = ["--mpp", "0.25", "--whole-slide", "--model", "threshold", "--no-stats", "--no-zarr"]

CASES = [
    Case("batch-dot-names", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH], 0, _batch_names,
         check=_check_batch_names),
    Case("batch-rerun-dot-names", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH], 0,
         lambda sb: (_batch_names(sb), _run(["batch", f"{sb}/in", "--out", f"{sb}/out", *BATCH], sb)),
         check=_check_batch_names),
    Case("batch-foreign-slide-folder", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH], 1, _foreign_slide_folder,
         check=_check_refused_slide),
    Case("segment-overwrite-slide-inside-out", ["segment", "{sb}/out/slide.png", "--out", "{sb}/out", "--overwrite",
                                                *SLIDE], 2, _slide_in_out, stderr_has=["holds an input"]),
    Case("segment-overwrite-model-inside-out", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--overwrite",
                                                "--model", "{sb}/out/model.safetensors", "--mpp", "0.25",
                                                "--whole-slide", "--quiet", "--no-stats", "--no-zarr"], 2,
         _model_in_out, stderr_has=["holds an input", "model.safetensors"]),
    Case("segment-overwrite-foreign-folder", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--overwrite",
                                              *SLIDE], 2, _foreign_out, stderr_has=["not created by wsiseg"]),
    Case("segment-foreign-partial", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", *SLIDE], 2,
         _foreign_partial, stderr_has=[".out.partial", "not created by wsiseg"], check=_no_output),
    Case("segment-out-is-file", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--overwrite", *SLIDE], 2,
         _out_is_file, stderr_has=["not a folder"]),
    Case("segment-out-is-symlink", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--overwrite", *SLIDE], 2,
         _out_is_link, stderr_has=["symbolic link"]),
    *[Case(f"option {' '.join(a)}", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", *a,
                                       *[x for x in SLIDE if x not in a[:1]]], 2, _slide_png, stderr_has=[a[0]],
           check=_no_output)
      for a in (["--mpp", "inf"], ["--mpp", "0"], ["--mpp", "1e6"], ["--score-threshold", "2"],
                ["--score-threshold", "nan"], ["--tile-size", "0"], ["--batch-size", "0"], ["--batch-size", "-3"],
                ["--density-cell-um", "0"], ["--workers", "0"])],
    Case("no-mpp-names-the-option", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--whole-slide",
                                     "--model", "threshold", "--quiet"], 2, _slide_png,
         stderr_has=["keep.png", "microns per pixel", "--mpp"], check=_no_output),
    Case("existing-output-names-the-option", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", *SLIDE], 2,
         lambda sb: (_slide_png(sb), _run(["segment", f"{sb}/slides/keep.png", "--out", f"{sb}/out", *SLIDE], sb)),
         stderr_has=["output folder exists", "--overwrite"], user_files_in_out=False),
    Case("mpp-too-coarse", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--mpp", "8", "--whole-slide",
                            "--model", "threshold", "--quiet"], 2, _slide_png, stderr_has=["coarser"],
         check=_no_output),
    Case("device-nonsense", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--device", "nonsense",
                             "--mpp", "0.25"], 2, _slide_png, stderr_has=["unknown device"], check=_no_output),
    *[Case(f"card {k}={v!r}", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--model", "{sb}/bad.safetensors",
                               "--mpp", "0.25", "--quiet"], 2, _bad_card(k, v), stderr_has=["bad.safetensors", k],
           check=_no_output)
      for k, v in (("mpp", "abc"), ("classes", []), ("std", [0, 0, 0]), ("tile_size", 0))],
    Case("batch-rerun-other-options", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH, "--tile-size", "192"], 0,
         _batch_done, check=_check_redone, user_files_in_out=False),
    Case("batch-rerun-truncated-table", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH], 0, _truncate_table,
         check=_check_redone, user_files_in_out=False),
    Case("batch-malformed-manifest", ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH], 2, _bad_manifest,
         stderr_has=["manifest.json"]),
    Case("segment-unreachable-scheduler", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", *SLIDE,
                                           "--scheduler", "tcp://127.0.0.1:9"], 5, _slide_png,
         stderr_has=["scheduler"]),
    Case("batch-unreachable-scheduler", ["batch", "{sb}/slides", "--out", "{sb}/out", *BATCH, "--scheduler",
                                         "tcp://127.0.0.1:9"], 5, _slide_png, stderr_has=["scheduler"]),
    Case("evaluate-no-images", ["evaluate", "--model", "threshold", "--data", "{sb}/data", "--out", "{sb}/m.json"], 2,
         lambda sb: _eval_data(sb, False), out="m.json", stderr_has=["no images"]),
    Case("evaluate-unknown-name", ["evaluate", "--model", "threshold", "--data", "{sb}/data", "--names", "zz"], 2,
         lambda sb: _eval_data(sb, True), out=None, stderr_has=["zz"]),
    Case("evaluate-split-without-val", ["evaluate", "--model", "threshold", "--data", "{sb}/data", "--split",
                                        "{sb}/split.json"], 2, lambda sb: _eval_data(sb, True), out=None,
         stderr_has=["'val'"]),
    Case("stats-foreign-summary", ["stats", "{sb}/out"], 2, _foreign_summary, stderr_has=["not the summary"]),
    # issue 29, second round
    *[Case(f"card config.{k}={v!r}", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--model",
                                      "{sb}/bad.safetensors", "--mpp", "0.25", "--quiet"], 2, _bad_config(k, v),
           stderr_has=["bad.safetensors", f"config.{k}"], check=_no_output)
      for k, v in (("score_thresh", 1.5), ("detections_per_tile", 0), ("nms_thresh", -1),
                   ("rpn_post_nms_top_n_test", 0), ("backbone", "vgg"), ("anchor_sizes", []))],
    *[Case(f"model tensor {kind}", ["segment", "{sb}/slides/keep.png", "--out", "{sb}/out", "--model",
                                    "{sb}/bad.safetensors", "--mpp", "0.25", "--quiet"], 2, _bad_tensor(kind),
           stderr_has=["bad.safetensors", "roi_heads.box_predictor.cls_score.weight", what], check=_no_output)
      for kind, what in (("int8", "int8"), ("nan", "NaN"), ("shape", "needs"))],
    Case("batch-mpp-does-not-override-a-recorded-one", ["batch", "{sb}/in", "--out", "{sb}/out", "--mpp", "0.2527",
                                                        "--model", "threshold", "--no-stats", "--no-zarr",
                                                        "--on-oversize", "drop"], 0,
         _cmu1_in, check=_check_recorded_mpp_won),
    Case("batch-force-mpp", ["batch", "{sb}/in", "--out", "{sb}/out", "--mpp", "0.2527", "--force-mpp",
                             "--model", "threshold", "--no-stats", "--no-zarr", "--on-oversize", "drop"], 0, _cmu1_in, check=_check_forced_mpp),
    Case("batch-recursive-glob-skips-its-output-and-link-loops", ["batch", "{sb}/tree/**/*.png", "--out",
                                                                  "{sb}/tree/out", *BATCH], 0, _tree_with_output,
         out="tree/out", check=_check_two_slides, user_files_in_out=False),
    Case("batch-name-like-a-hashed-name", ["batch", "{sb}/x/a.png", "{sb}/y/a.png", "{sb}/z", "--out", "{sb}/out",
                                           *BATCH], 0, _hashed_name_twin, check=_check_three_done),
    Case("segment-early-eoi-jpeg-tile", ["segment", "{sb}/slides/eoi.tif", "--out", "{sb}/out", "--whole-slide",
                                         "--model", "threshold", "--mpp", "0.25", "--quiet"], 2, _early_eoi_tile,
         stderr_has=["eoi.tif", "damaged", "premature end"], check=_no_output),
    Case("stats-non-numeric-summary", ["stats", "{sb}/out"], 2, _bad_summary_fields,
         stderr_has=["summary.json", "slide_dimensions"]),
    Case("train-misspelt-val-name", ["train", "{sb}/cfg.yaml"], 2, _train_cfg("", "val_names: [zz]"), out="run",
         stderr_has=["val_names", "zz"]),
    *[Case(f"train {setting}", ["train", "{sb}/cfg.yaml"], 2, _train_cfg(setting), out="run",
           stderr_has=["cfg.yaml", name])
      for setting, name in (("batch_size: 0", "batch_size"), ("steps: many", "steps"), ("lr: -1", "lr"))],
    Case("train width -8", ["train", "{sb}/cfg.yaml"], 2,
         lambda sb: (_train_cfg("")(sb), (sb / "cfg.yaml").write_text((sb / "cfg.yaml").read_text().replace(
             "width: 8", "width: -8"))), out="run", stderr_has=["cfg.yaml", "config.width"]),
    Case("train-split-with-numbers", ["train", "{sb}/cfg.yaml"], 2, _split_with_numbers, out="run",
         stderr_has=["split.json", "strings"]),
    Case("train-damaged-checkpoint", ["train", "{sb}/cfg.yaml"], 2, _damaged_checkpoint, out="run",
         stderr_has=["last.pt", "damaged"]),
]


def _run(args: list[str], sb: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "wsiseg.cli", *[a.format(sb=sb) for a in args]], cwd=sb,
                          capture_output=True, text=True, timeout=TIME_LIMIT, env=env, preexec_fn=_limits)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    sb = tmp_path / "sandbox"
    sb.mkdir()
    if case.setup is not None:
        case.setup(sb)
    out = sb / case.out if case.out else None
    before = _checksums(sb, skip=out if out is not None and not out.is_symlink() else None)
    inside = {} if out is None or out.is_symlink() or not out.is_dir() else _checksums(out)
    proc = _run(case.args, sb)
    assert proc.returncode == case.rc, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if case.rc != 0:
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("wsiseg: error")]
        assert len(err) <= 1
    for s in case.stderr_has:
        assert s in proc.stderr, proc.stderr
    after = _checksums(sb, skip=out if out is not None and not out.is_symlink() else None)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing outside the output changed
    if case.user_files_in_out and inside:
        now = _checksums(out) if out.is_dir() else {}
        for k, v in inside.items():  # the user's own files in the output folder survive
            if not k.startswith(".") and MARKER not in k:
                assert now.get(k) == v, k
    if case.check is not None:
        case.check(sb, proc)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert usage.ru_maxrss * 1024 < MAX_RSS


# ------------------------------------------------------------------ one run per output (issue 29)


def _hold_lock(path: Path, lock_file: Path | None = None) -> subprocess.Popen:
    """A process that holds wsiseg's lock of ``path`` until it is killed; returns once the lock is held."""
    code = ("import sys, time; from wsiseg.atomic import output_lock\n"
            f"with output_lock({str(path)!r}, {str(lock_file) if lock_file else None!r}):\n"
            "    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["segment", "batch"])
def test_a_second_run_on_the_same_output_stops_and_names_the_first(command: str, tmp_path: Path) -> None:
    from wsiseg.batch import BATCH_LOCK

    sb = tmp_path
    _png(sb / "in" / "a.png")
    if command == "segment":
        args = ["segment", "{sb}/in/a.png", "--out", "{sb}/out", *SLIDE]
        lock = None
    else:
        args = ["batch", "{sb}/in", "--out", "{sb}/out", *BATCH]
        (sb / "out").mkdir()
        lock = sb / "out" / BATCH_LOCK
    holder = _hold_lock(sb / "out", lock)
    try:
        before = _checksums(sb)
        proc = _run(args, sb)
        assert proc.returncode == 2, proc.stderr
        assert f"another wsiseg run (pid {holder.pid})" in proc.stderr and "Traceback" not in proc.stderr
        assert _checksums(sb) == before  # nothing written, nothing taken
    finally:
        holder.kill()  # as kill -9: the kernel releases the lock
        holder.wait()
    proc = _run(args, sb)
    assert proc.returncode == 0, proc.stderr
    assert (sb / "out" / ("summary.json" if command == "segment" else "manifest.json")).is_file()


def test_a_scheduler_that_never_answers_is_reported_in_bounded_time(tmp_path: Path) -> None:
    """Something on 127.0.0.1 accepts the connection and then says nothing: a clear error, exit 5, no hang."""
    import socket
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []

    def accept_and_hold() -> None:
        try:
            for _ in range(4):
                held.append(srv.accept())
        except OSError:  # the socket was closed at the end of the test
            pass

    threading.Thread(target=accept_and_hold, daemon=True).start()
    _png(tmp_path / "in" / "a.png")
    t0 = time.monotonic()
    proc = _run(["batch", "{sb}/in", "--out", "{sb}/out", *BATCH, "--scheduler",
                 f"tcp://127.0.0.1:{srv.getsockname()[1]}"], tmp_path)
    assert proc.returncode == 5 and "no answer within" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
    srv.close()


def test_stdout_closed_early_is_no_error(tmp_path: Path) -> None:
    """``wsiseg segment ... | head -1``: the reader goes away; the run still finishes its outputs, quietly."""
    _png(tmp_path / "a.png")
    args = [sys.executable, "-m", "wsiseg.cli", "segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
            *SLIDE]
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write to stdout fails with EPIPE
    proc = subprocess.run(args, stdout=w, stderr=subprocess.PIPE, text=True, timeout=TIME_LIMIT)
    os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert (tmp_path / "out" / "summary.json").is_file()


def test_batch_on_a_full_disk_stops_with_the_disk_full_code(tmp_path: Path) -> None:
    """A disk that fills up fails every slide after it too: the batch stops with exit 3, no traceback noise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        (mnt / "fill").write_bytes(b"\0" * (1024 * 1024 - 96 * 1024))
        for i in range(3):
            _png(tmp_path / "in" / f"s{i}.png", size=512, seed=i)
        proc = _run(["batch", "{sb}/in", "--out", str(mnt / "out"), *BATCH[:-2]], tmp_path)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "no space left" in proc.stderr
        for noise in ("Traceback", "Exception ignored", "leaked"):
            assert noise not in proc.stderr, proc.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
