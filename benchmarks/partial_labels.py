"""The partial-label experiment on CoNSeP: four ways to train with hidden labels, one validation split.

On the CoNSeP training tiles (split into train/validation by whole source
image), hide the class of 20% of nuclei and the mask of another 20% in the
training part, then train the same model with:

  (a) the partial-label loss (``partial_mode: partial``),
  (b) hidden nuclei treated as background (``partial_mode: background``),
  (c) images with any hidden label dropped (``partial_mode: drop``),
  (d) full labels (nothing hidden),

and report PQ and classification accuracy of each on the validation images.
A variant that leaves no training image (dropping every image with a hidden
label, when labels are hidden per nucleus) is reported as not trained. Finished
variants are not retrained: a rerun reads their checkpoints.
Writes ``benchmarks/results/partial_labels.json`` and prints a Markdown table.

    python benchmarks/partial_labels.py [--steps 1500] [--data ../shared/data/consep-train]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_result

HERE = Path(__file__).resolve().parent

VARIANTS = {
    "a_partial_loss": dict(partial_mode="partial", hide_class_fraction=0.2, hide_mask_fraction=0.2),
    "b_as_background": dict(partial_mode="background", hide_class_fraction=0.2, hide_mask_fraction=0.2),
    "c_drop_images": dict(partial_mode="drop", hide_class_fraction=0.2, hide_mask_fraction=0.2),
    "d_full_labels": dict(partial_mode="partial", hide_class_fraction=0.0, hide_mask_fraction=0.0),
}


def _evaluate(run: Path, data: str) -> dict:
    from wsiseg.datasets import InstanceFolder
    from wsiseg.evaluation import evaluate_predictor
    from wsiseg.inference import load_predictor

    pred = load_predictor(str(run / "best.safetensors"), device="cpu")
    val = json.loads((run / "split.json").read_text())["val"]
    folder = InstanceFolder(data, names=val, class_names=pred.card.class_names)
    metrics = evaluate_predictor(pred, folder.samples, folder.class_names)
    metrics["step"] = pred.card.metrics.get("validation", {}).get("step")
    return metrics


def main() -> None:
    from wsiseg.training import TrainConfig, train, training_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "consep-train"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=str(HERE / "results" / "partial_labels"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    results = {}
    for name in args.variants.split(","):
        cfg = TrainConfig(
            name=f"consep-{name}", data=args.data, val_fraction=0.2, seed=0, mpp=0.25, tile_size=256, overlap=64,
            model=dict(backbone="resnet18", width=32, fpn_channels=128, box_head_dim=512, mask_head_channels=128,
                       detections_per_tile=400),
            steps=args.steps, batch_size=4, val_every=max(1, -(-args.steps // 3)), warmup_steps=min(200, args.steps // 5),
            out=str(Path(args.out) / name), **VARIANTS[name])
        try:
            train(cfg, log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        except ValueError as e:  # (c) with labels hidden per nucleus: every image has a hidden label
            print(f"[{name}] not trained: {e}", flush=True)
            results[name] = {"trained": False, "reason": str(e), "train_images": 0}
            continue
        run = Path(cfg.out)
        card = _evaluate(run, args.data)  # the exported best checkpoint, measured as `wsiseg evaluate` measures
        log_rows = (run / "loss.csv").read_text().splitlines()
        results[name] = {"trained": True, "pq": card.get("pq"),
                         "classification_accuracy": card.get("classification_accuracy"),
                         "f1": card.get("f1"), "aji": card.get("aji"), "step": card.get("step"),
                         "train_images": len(training_data(cfg)[0]),
                         "minutes": float(log_rows[-1].split(",")[-1]) / 60 if len(log_rows) > 1 else None,
                         "pq_per_class": card.get("pq_per_class")}
    print("\n| variant | training tiles | PQ | classification accuracy | F1@0.5 | AJI |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if not r["trained"]:
            print(f"| {name} | 0 | not trained: {r['reason']} | | | |")
            continue
        acc = r["classification_accuracy"]
        print(f"| {name} | {r['train_images']} | {r['pq']:.3f} | {acc if acc is None else f'{acc:.3f}'} | "
              f"{r['f1']:.3f} | {r['aji']:.3f} |")
    write_result(HERE / "results" / "partial_labels.json",
                 {"benchmark": "partial_labels", "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
