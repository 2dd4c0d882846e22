from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pandas as pd
import pytest
from conftest import synthetic_he, write_pyramid_tiff

from wsiseg.atomic import MARKER
from wsiseg.batch import collect_slides, load_manifest, run_batch
from wsiseg.pipeline import SegmentOptions

OPTS = SegmentOptions(tissue="whole", on_oversize="drop", zarr=False, stats=False, tile_size=256, overlap=64)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, slides_dir):
    d = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        img, _ = synthetic_he(500, 600, seed=10 + i, n_nuclei=120)
        write_pyramid_tiff(d / f"slide{i}.tif", img, 0.5, levels=1, compression="zlib")
    shutil.copy(slides_dir / "broken.svs", d / "broken.svs")
    shutil.copy(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", d / "nompp.svs")
    return d


def tables(out):
    return {p.parent.name: pd.read_parquet(p).drop(columns=[]) for p in sorted(out.glob("*/*.nuclei.parquet"))}


def test_collect_slides(cohort, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# cohort\n{cohort / 'slide0.tif'}\n{cohort / 'slide1.tif'}\n")
    assert [p.name for p in collect_slides([str(lst)])] == ["slide0.tif", "slide1.tif"]
    assert len(collect_slides([str(cohort)])) == 5
    assert len(collect_slides([str(cohort / "slide*.tif"), str(cohort / "slide0.tif")])) == 3
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        collect_slides([str(tmp_path / "nothing-here*.svs")])


def test_serial_batch_reports_bad_slides_and_resumes(cohort, tmp_path):
    out = tmp_path / "serial"
    m = run_batch(collect_slides([str(cohort)]), out, "threshold", OPTS)
    s = m["slides"]
    assert {k: v["status"] for k, v in s.items()} == {
        "slide0": "done", "slide1": "done", "slide2": "done", "broken": "failed", "nompp": "failed"}
    assert s["broken"]["reason"] == "unreadable" and "broken.svs" in s["broken"]["error"]
    assert s["nompp"]["reason"] == "no_mpp"
    assert all(s[f"slide{i}"]["nuclei"] > 100 and s[f"slide{i}"]["checksums"] for i in range(3))
    cohort_csv = pd.read_csv(out / "cohort.csv")
    row = cohort_csv[(cohort_csv.slide == "slide0") & (cohort_csv["class"] == "all")].iloc[0]
    assert row.nuclei == s["slide0"]["nuclei"]
    assert row.density_per_mm2 == pytest.approx(row.nuclei / row.tissue_area_mm2, rel=1e-3)

    # simulate a crash: slide1 was half written, its manifest entry never finished
    mtime0 = (out / "slide0" / "summary.json").stat().st_mtime_ns
    shutil.rmtree(out / "slide1")
    (out / ".slide1.partial").mkdir()
    (out / ".slide1.partial" / MARKER).write_text("{}")  # a staging folder of ours, left by the crash
    (out / ".slide1.partial" / "slide1.nuclei.parquet.partial").write_bytes(b"half")
    man = json.loads((out / "manifest.json").read_text())
    man["slides"]["slide1"]["status"] = "pending"
    (out / "manifest.json").write_text(json.dumps(man))
    seen = []
    run_batch(collect_slides([str(cohort)]), out, "threshold", OPTS, on_result=lambda n, e: seen.append(n))
    assert "slide0" not in seen and "slide1" in seen  # complete slides are skipped, the incomplete one redone
    assert (out / "slide0" / "summary.json").stat().st_mtime_ns == mtime0
    assert not (out / ".slide1.partial").exists()
    assert load_manifest(out)["slides"]["slide1"]["status"] == "done"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_cluster_results_identical_to_serial(cohort, tmp_path, client):
    slides = [cohort / f"slide{i}.tif" for i in range(3)] + [cohort / "broken.svs"]
    serial = tmp_path / "serial"
    run_batch(slides, serial, "threshold", OPTS)
    par = tmp_path / "par"
    m = run_batch(slides, par, "threshold", OPTS, client=client)
    assert m["slides"]["broken"]["status"] == "failed"
    hosts = {(e.get("pid")) for e in m["slides"].values() if e["status"] == "done"}
    assert len(hosts) >= 1
    a, b = tables(serial), tables(par)
    assert a.keys() == b.keys() and len(a) == 3
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k])
        assert m["slides"][k]["checksums"] == load_manifest(serial)["slides"][k]["checksums"]


def test_killed_worker_slide_is_retried(tmp_path, client):
    # one slide large enough that the worker can be killed while it is being segmented
    img, _ = synthetic_he(3000, 3000, seed=5, n_nuclei=3000)
    big = write_pyramid_tiff(tmp_path / "big.tif", img, 0.5, levels=1, compression="zlib")
    out = tmp_path / "out"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (out / ".big.partial").exists():
                processing = client.processing()
                busy = [w for w, tasks in processing.items() if tasks]
                if busy:
                    pids = client.run(os.getpid, workers=busy)
                    for pid in pids.values():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    m = run_batch([big], out, "threshold", OPTS, client=client)
    t.join()
    assert killed, "the worker was never caught mid-slide"
    e = m["slides"]["big"]
    assert e["status"] == "done" and e["pid"] not in killed  # retried on a live worker
    assert (out / "big" / "summary.json").exists() and not (out / ".big.partial").exists()
    assert json.loads((out / "manifest.json").read_text())["slides"]["big"]["status"] == "done"
