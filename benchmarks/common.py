"""What every benchmark script does with its result: add the machine, write JSON, say where."""

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
