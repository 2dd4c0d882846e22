"""Two models side by side on the bundled sample slide: end-to-end speed, nuclei and classes.

    python benchmarks/models.py OLD.safetensors NEW.safetensors [--repeats 3] [--out benchmarks/results/models.json]

Runs ``segment_slide`` on ``examples/CMU-1-Small-Region.svs`` with each model in turn (``--repeats`` rounds,
the median reported), with the run's defaults (cells included), and prints wall time, mm² of tissue per minute
(as ``benchmarks/cpu_speed.py --end-to-end`` measures it), nuclei, the share of each class and of uncertain
classes, and the validation scores recorded in each model's card (``validation``), with new/old ratios
measured in the same run. The first model is the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SAMPLE_SLIDE as SLIDE  # noqa: E402
from common import segment_sample, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_once(model: str) -> dict:
    s, t = segment_sample(model)
    share = (t.class_name.value_counts() / len(t)).round(3).to_dict()
    uncertain = float(t.class_uncertain.mean()) if "class_uncertain" in t else 0.0
    return {"wall_s": s["wall_s"], "tissue_mm2": s["tissue_area_mm2"], "nuclei": s["nuclei"],
            "mm2_per_min": round(s["tissue_area_mm2"] / s["wall_s"] * 60, 3), "class_share": share,
            "uncertain_share": round(uncertain, 3)}


def validation(model: str) -> dict:
    """The validation scores the model's card records: PQ per dataset, CoNSeP F1 and class accuracy."""
    from wsiseg.card import load_card

    card = load_card(model)
    ds = card.metrics.get("validation", {}).get("datasets", {})
    out = {f"{k}_pq": round(v["pq"], 3) for k, v in ds.items()}
    if "consep" in ds:
        out["consep_f1"] = round(ds["consep"]["f1"], 3)
        out["consep_class_accuracy"] = round(ds["consep"]["classification_accuracy"], 3)
    out["cpu_hours"] = card.training.get("cpu_hours")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs=2, help="baseline model, then the candidate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for _ in range(args.repeats):  # the models in turn, so that drift of the machine hits both
        for m in args.models:
            runs[m].append(run_once(m))
    rows = {}
    for m, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rows[m] = {**rs[0], "wall_s": round(wall, 2), "mm2_per_min": round(rs[0]["tissue_mm2"] / wall * 60, 3),
                   "walls": [r["wall_s"] for r in rs], "validation": validation(m)}
    old, new = (rows[m] for m in args.models)
    ratio = {"speed_new_over_old": round(new["mm2_per_min"] / old["mm2_per_min"], 3)}
    print(f"{'model':60s} {'wall s':>7s} {'mm²/min':>8s} {'nuclei':>7s}  classes")
    for m, r in rows.items():
        print(f"{m:60s} {r['wall_s']:7.2f} {r['mm2_per_min']:8.3f} {r['nuclei']:7d}  {r['class_share']} "
              f"uncertain {r['uncertain_share']}")
    print(f"new / old speed: {ratio['speed_new_over_old']}")
    write_result(args.out, {"benchmark": "models", "slide": SLIDE.name, "repeats": args.repeats,
                            "results": rows, "ratios": ratio})


if __name__ == "__main__":
    main()
