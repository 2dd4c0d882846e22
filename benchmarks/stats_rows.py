"""Slide statistics over a generated nucleus table: rows/s and peak memory against table size.

    python benchmarks/stats_rows.py [--rows 10000000]

Generates Parquet tables of ``rows / 10`` and ``rows`` nuclei (every feature
column, row groups of 100k), runs ``compute_stats`` on each in its own process
and prints rows/s and peak RSS; the goal is bounded memory: the peak RSS for
10x the rows stays within a few MB.
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


def make_table(path: Path, n: int, row_group: int = 100_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wsiseg.features import FEATURE_COLUMNS

    rng = np.random.default_rng(0)
    writer = None
    done = 0
    while done < n:
        k = min(row_group, n - done)
        cols = {
            "id": np.arange(done + 1, done + k + 1, dtype=np.uint32),
            "class_id": rng.integers(1, 5, k).astype(np.int16),
            "centroid_x_um": rng.uniform(0, 40_000, k), "centroid_y_um": rng.uniform(0, 30_000, k),
            "area_um2": rng.gamma(4, 8, k), "score": rng.uniform(0.5, 1, k).astype(np.float32),
        }
        for c in FEATURE_COLUMNS:
            cols[c] = rng.uniform(0, 1, k).astype(np.float32)
        t = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, t.schema, compression="zstd")
        writer.write_table(t)
        done += k
    writer.close()


def child(table: str) -> None:
    from wsiseg.stats import compute_stats

    t0 = time.perf_counter()
    st = compute_stats(table, ["other", "inflammatory", "epithelial", "spindle"], 1200.0, (40_000.0, 30_000.0))
    dt = time.perf_counter() - t0
    print(json.dumps({"rows": st.rows, "seconds": dt,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_rows.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in (args.rows // 10, args.rows):
            p = Path(d) / f"t{n}.parquet"
            make_table(p, n)
            out = subprocess.run([sys.executable, __file__, "--child", str(p)], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["table_mb"] = p.stat().st_size / 1e6
            results.append(r)
    print(f"{'rows':>12}{'table MB':>10}{'seconds':>10}{'rows/s':>12}{'peak RSS MB':>13}")
    for r in results:
        print(f"{r['rows']:>12,}{r['table_mb']:>10.0f}{r['seconds']:>10.1f}{r['rows'] / r['seconds']:>12,.0f}"
              f"{r['peak_rss_mb']:>13.0f}")
    growth = results[1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
    print(f"\npeak RSS growth for 10x the rows: {growth:+.0f} MB")
    write_result(args.out, {"benchmark": "stats_rows", "runs": results, "rss_growth_mb": growth})


if __name__ == "__main__":
    main()
