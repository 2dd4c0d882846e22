"""CPU cost of candidate default-model architectures: one training step and one inference tile.

Each candidate is built with random weights and timed on real MoNuSeg crops
(training step: batch of 4 tiles with their nuclei, bf16 autocast, backward
and optimiser step; inference, BatchNorm folded as ``wsiseg segment`` runs it: backbone + RPN + heads on one tile). This is
the "CPU seconds" half of the default-model choice: how many training steps a
fixed budget on this machine buys, and how fast a slide is segmented.

    python benchmarks/backbones.py [--tile 256] [--repeats 3]

Writes ``benchmarks/results/backbones.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import write_result

HERE = Path(__file__).resolve().parent

CANDIDATES = {
    "resnet18 w32 fpn128": dict(backbone="resnet18", width=32, fpn_channels=128, box_head_dim=512,
                                mask_head_channels=128),
    "resnet18 w64 fpn256": dict(backbone="resnet18", width=64, fpn_channels=256, box_head_dim=1024,
                                mask_head_channels=256),
    "resnet50 w64 fpn256": dict(backbone="resnet50", width=64, fpn_channels=256, box_head_dim=1024,
                                mask_head_channels=256),
    "mobilenet_v3_large fpn128": dict(backbone="mobilenet_v3_large", fpn_channels=128, box_head_dim=512,
                                      mask_head_channels=128),
    # ImageNet-pretrainable (frozen BatchNorm); issue 32
    "efficientnet_lite0 fpn128": dict(backbone="efficientnet_lite0", fpn_channels=128, box_head_dim=512,
                                      mask_head_channels=128),
    "efficientnet_lite1 fpn128": dict(backbone="efficientnet_lite1", fpn_channels=128, box_head_dim=512,
                                      mask_head_channels=128),
    "efficientnet_lite2 fpn128": dict(backbone="efficientnet_lite2", fpn_channels=128, box_head_dim=512,
                                      mask_head_channels=128),
}


def main() -> None:
    import torch

    from wsiseg.augment import random_crop
    from wsiseg.card import ModelConfig
    from wsiseg.datasets import InstanceFolder
    from wsiseg.model import build_model, fold_batchnorm
    from wsiseg.training import _to_torch, enable_partial_labels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "monuseg-train"))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="candidates to time (default: all)")
    args = ap.parse_args()
    data = InstanceFolder(args.data)
    rng = np.random.default_rng(0)
    batch = [random_crop(data.samples[i], args.tile, 0.25, rng) for i in range(4)]
    imgs = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in batch]
    tgts = [_to_torch(t) for _, t in batch]
    rows = {}
    for name, kw in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        cfg = ModelConfig(**kw, tile_size=args.tile, detections_per_tile=400, rpn_pre_nms_top_n_train=2000,
                          rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=2000, rpn_post_nms_top_n_test=1000,
                          box_batch_size_per_image=256)
        model = enable_partial_labels(build_model(cfg))
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = sum(model(imgs, tgts).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        train_s = float(np.median(times[1:]))
        model = fold_batchnorm(model.eval()).to(memory_format=torch.channels_last)  # as inference runs it
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                features = model.backbone(model.transform(imgs[:1])[0].tensors)
                times.append(time.perf_counter() - t0)
        backbone_s = float(np.median(times[1:]))
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                model(imgs)
                times.append(time.perf_counter() - t0)
        forward_s = float(np.median(times[1:])) / len(imgs)
        rows[name] = {"params_M": params / 1e6, "fp16_MB": params * 2 / 1e6, "train_step_s": train_s,
                      "backbone_tile_s": backbone_s,
                      "forward_tile_s": forward_s}
        del features
        print(f"{name}: {rows[name]}", flush=True)
    print(f"\n| candidate | params (M) | fp16 MB | train step (4×{args.tile}², s) | backbone per tile (s) | "
          "whole forward per tile, batch of 4, untrained (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params_M']:.1f} | {r['fp16_MB']:.0f} | {r['train_step_s']:.2f} | "
              f"{r['backbone_tile_s']:.3f} | {r['forward_tile_s']:.3f} |")
    write_result(HERE / "results" / "backbones.json", {"benchmark": "backbones", "tile": args.tile, "results": rows})


if __name__ == "__main__":
    main()
