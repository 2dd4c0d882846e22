"""End-to-end slide time against the model's forward time alone, and peak memory against slide size.

For a generated pyramidal JPEG TIFF at 0.5 µm/px, in one run:

* ``forward only``: the slide's tiles are read into memory first, then only the
  model's forward pass is timed over them, in the same batches;
* ``end to end``: ``segment_slide`` on the same slide (reading, forward,
  post-processing, stitching, writing every output);
* ``ratio = forward only / end to end`` on both slides (goal >= 0.9: the model never waits);
* peak RSS of the end-to-end run on the slide and on one 4x larger (2x each
  side), each in its own process (goal: within +10%); with the writer in a
  process of its own, its peak is added to the main process's.

    python benchmarks/pipeline.py [--model PATH|tiny|r18] [--size 1536] [--content sample|synthetic]

The slide's pixels are real tissue by default: the bundled CC0 sample slide
(``examples/CMU-1-Small-Region.svs``) mirrored out to the requested size, so
the model finds as many nuclei per tile as on a real slide.
``--content synthetic`` paints pink tissue dotted with purple ellipses instead.
Without ``--model`` the bundled default model is used when there is one;
``r18``/``tiny`` are randomly initialised ResNet-18 FPN models (their forward
cost is real, their detections are not: a random model floods every tile
with hundreds of nuclei, a stress test of the writers).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_model(kind: str, tmp: Path) -> str:
    if kind not in ("tiny", "r18"):
        return kind
    import torch

    from wsiseg.card import ModelCard, ModelConfig, default_classes
    from wsiseg.model import build_model, save_model

    torch.manual_seed(0)
    if kind == "tiny":
        cfg = ModelConfig(backbone="resnet18", width=16, fpn_channels=64, box_head_dim=256, mask_head_channels=64,
                          tile_size=256)
    else:
        cfg = ModelConfig(backbone="resnet18", tile_size=256)
    card = ModelCard(name=f"random-{kind}", classes=default_classes(["nucleus"]), mpp=0.5, tile_size=256,
                     overlap=64, config=cfg, score_threshold=0.5)
    return str(save_model(build_model(cfg), card, tmp / f"{kind}.safetensors"))


def forward_only(slide_path: str, model: str, batch_size: int) -> dict:
    from wsiseg.inference import MaskRCNNPredictor, load_predictor
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_slide, read_tile
    from wsiseg.tissue import detect_tissue

    pred = load_predictor(model)
    slide = open_slide(slide_path)
    sp = plan_slide(slide, pred.card.mpp, pred.card.tile_size, pred.card.overlap, tissue=detect_tissue(slide))
    tiles = [read_tile(slide, sp.plan, t, (sp.grid.width, sp.grid.height)) for t in sp.grid]
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch_size):
        batch = np.stack(tiles[i : i + batch_size])
        if isinstance(pred, MaskRCNNPredictor):
            pred.forward(batch)
        else:
            pred.predict(batch)
    return {"tiles": len(tiles), "forward_s": time.perf_counter() - t0}


def end_to_end(slide_path: str, model: str, batch_size: int, out: str) -> dict:
    from wsiseg.inference import load_predictor
    from wsiseg.pipeline import SegmentOptions, segment_slide

    pred = load_predictor(model)
    t0 = time.perf_counter()
    s = segment_slide(slide_path, pred, out, SegmentOptions(batch_size=batch_size, progress=False,
                                                            on_oversize="drop", overwrite=True))
    return {"tiles": s["tiles"], "nuclei": s["nuclei"], "e2e_s": time.perf_counter() - t0,
            "timings_s": s["timings_s"], "writer": s["writer"], "writer_peak_rss_mb": s["writer_peak_rss_mb"]}


def child(args: argparse.Namespace) -> None:
    if args.child == "forward":
        r = forward_only(args.slide, args.model, args.batch_size)
    else:
        r = end_to_end(args.slide, args.model, args.batch_size, args.out)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if r.get("writer_peak_rss_mb"):  # the writer process's own peak, added: an upper bound on the total
        r["main_peak_rss_mb"] = r["peak_rss_mb"]
        r["peak_rss_mb"] += r["writer_peak_rss_mb"]
    print("RESULT " + json.dumps(r))


def run_child(kind: str, slide: Path, model: str, batch: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--slide", str(slide), "--model", model,
           "--batch-size", str(batch), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


SAMPLE = HERE.parent / "examples" / "CMU-1-Small-Region.svs"


def sample_pixels(size: int) -> np.ndarray:
    """The CC0 sample slide's level 0 (0.5 µm/px), mirrored or cropped to size x size."""
    from wsiseg.slide import open_slide

    s = open_slide(SAMPLE)
    w, h = s.dimensions
    img = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., :3]
    reps = (-(-size // h), -(-size // w))
    rows = [np.concatenate([img if c % 2 == 0 else img[:, ::-1] for c in range(reps[1])], axis=1)
            for _ in range(reps[0])]
    big = np.concatenate([r if i % 2 == 0 else r[::-1] for i, r in enumerate(rows)], axis=0)
    return np.ascontiguousarray(big[:size, :size])


def synthetic_pixels(size: int) -> np.ndarray:
    """Pink tissue dotted with purple ellipses, most of the slide."""
    import cv2

    rng = np.random.default_rng(0)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (240, 240, 242)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (int(size * 0.45), int(size * 0.4)), 15, 0, 360, 1, -1)
    img[mask > 0] = (230, 165, 200)
    n = int(mask.sum() / 400)
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    for x, y in zip(xs, ys):
        if mask[y, x]:
            cv2.ellipse(img, (int(x), int(y)), (int(rng.integers(4, 8)), int(rng.integers(3, 7))),
                        float(rng.uniform(0, 180)), 0, 360, (40, 18, 90), -1)
    return img


def make_slide(path: Path, size: int, content: str = "sample") -> None:
    import cv2
    import tifffile

    img = sample_pixels(size) if content == "sample" else synthetic_pixels(size)
    opts = dict(tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90})
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        cur, m = img, 0.5
        for level in range(4):
            tif.write(cur, subfiletype=1 if level else 0, resolution=(1e4 / m, 1e4 / m),
                      resolutionunit="CENTIMETER", **opts)
            cur = cv2.resize(cur, (cur.shape[1] // 2, cur.shape[0] // 2), interpolation=cv2.INTER_AREA)
            m *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=1536, help="side of the smaller slide in pixels (0.5 mpp)")
    ap.add_argument("--content", choices=["sample", "synthetic"], default="sample",
                    help="slide pixels: the CC0 sample slide mirrored, or painted ellipses")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "pipeline.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.model is None:
            from wsiseg.card import default_model_path

            args.model = default_model_path() or "r18"
        model = make_model(args.model, tmp)
        small, large = tmp / "small.tif", tmp / "large.tif"
        make_slide(small, args.size, args.content)
        make_slide(large, args.size * 2, args.content)
        fwd = run_child("forward", small, model, args.batch_size, tmp / "o")
        e2e = run_child("e2e", small, model, args.batch_size, tmp / "o1")
        fwd_large = run_child("forward", large, model, args.batch_size, tmp / "o")
        e2e_large = run_child("e2e", large, model, args.batch_size, tmp / "o2")

    ratio = fwd["forward_s"] / e2e["e2e_s"]
    ratio_large = fwd_large["forward_s"] / e2e_large["e2e_s"]
    rss_growth = e2e_large["peak_rss_mb"] / e2e["peak_rss_mb"]
    print(f"model {args.model}, {args.content} slide {args.size}² px at 0.5 mpp ({fwd['tiles']} tiles), "
          f"batch {args.batch_size}")
    print(f"{'run':<34}{'tiles':>7}{'seconds':>10}{'tiles/s':>9}{'peak RSS MB':>13}")
    print(f"{'forward only (tiles preloaded)':<34}{fwd['tiles']:>7}{fwd['forward_s']:>10.1f}"
          f"{fwd['tiles'] / fwd['forward_s']:>9.2f}{fwd['peak_rss_mb']:>13.0f}")
    print(f"{'end to end':<34}{e2e['tiles']:>7}{e2e['e2e_s']:>10.1f}{e2e['tiles'] / e2e['e2e_s']:>9.2f}"
          f"{e2e['peak_rss_mb']:>13.0f}")
    print(f"{'forward only, 4x larger slide':<34}{fwd_large['tiles']:>7}{fwd_large['forward_s']:>10.1f}"
          f"{fwd_large['tiles'] / fwd_large['forward_s']:>9.2f}{fwd_large['peak_rss_mb']:>13.0f}")
    print(f"{'end to end, 4x larger slide':<34}{e2e_large['tiles']:>7}{e2e_large['e2e_s']:>10.1f}"
          f"{e2e_large['tiles'] / e2e_large['e2e_s']:>9.2f}{e2e_large['peak_rss_mb']:>13.0f}")
    print(f"\nforward / end-to-end time: {ratio:.2f} on the slide, {ratio_large:.2f} on the 4x larger one "
          f"(goal >= 0.9)")
    print(f"peak RSS, 4x larger / base: {rss_growth:.3f} (goal <= 1.10)")
    print(f"end-to-end stage times (s): {e2e['timings_s']}")
    print(f"writer: {e2e['writer']} (peak RSS {e2e.get('writer_peak_rss_mb')} MB of the end-to-end figure)")
    result = {"benchmark": "pipeline", "model": args.model, "content": args.content, "size": args.size,
              "batch_size": args.batch_size,
              "forward_only": fwd, "end_to_end": e2e, "forward_only_4x": fwd_large, "end_to_end_4x": e2e_large,
              "forward_over_e2e": ratio, "forward_over_e2e_4x": ratio_large, "rss_4x_over_1x": rss_growth}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
