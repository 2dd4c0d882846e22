"""What benchmark scripts share: the validation sets of a training config; writing a result as JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def write_result(path: str | os.PathLike, result: dict) -> Path:
    """Write ``result`` with the machine it ran on as JSON at ``path``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
                              indent=2))
    print(f"wrote {out}")
    return out


REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "examples" / "CMU-1-Small-Region.svs"


def segment_sample(model: str, **options):
    """``segment_slide`` of the bundled sample slide with ``model`` on the CPU (``options``: SegmentOptions
    fields beyond no progress bar and no statistics); returns its summary and its nucleus table."""
    import tempfile

    import pandas as pd

    from wsiseg.inference import load_predictor
    from wsiseg.pipeline import SegmentOptions, segment_slide

    pred = load_predictor(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        summary = segment_slide(SAMPLE_SLIDE, pred, out, SegmentOptions(progress=False, stats=False, **options))
        return summary, pd.read_parquet(out / f"{SAMPLE_SLIDE.stem}.nuclei.parquet")


def validation_sets(config: str | os.PathLike) -> list[tuple[str, Path, list[str]]]:
    """(name, folder, validation image names) for every dataset of a training config, from its split files."""
    from wsiseg.training import TrainConfig

    cfg = TrainConfig.from_yaml(REPO / config)
    sets = cfg.datasets or [{"name": Path(cfg.data).name, "path": cfg.data, "split": "configs/default-split.json"}]
    out = []
    for d in sets:
        path = Path(d["path"]) if Path(d["path"]).is_absolute() else REPO / d["path"]
        out.append((d.get("name", path.name), path, json.loads((REPO / d["split"]).read_text())["val"]))
    return out
