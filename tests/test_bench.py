"""bench/gpu.py, bench/chain.py and bench/gpu_check.sh run and report what they claim (tiny sizes).

The benches time the production chain (``engine.pipeline.process_visit``) itself; these tests run
them at 256^2 in subprocesses and check the JSON: every stage of ``engine.pipeline.STAGES``,
positive timings, the plain-ZOGY reference and ratio, and the transfer numbers (0 on numpy).
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nightsift.engine.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
COMPUTE = ("calibrate", "measure", "align", "psf", "subtract", "detect", "package", "write")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One simulated-pair cache for both benches (the 256^2 pairs are made once)."""
    return tmp_path_factory.mktemp("bench-cache")


def _run(args, timeout=120):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _gpu_module():
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["bench_gpu"]


def test_gpu_bench_numpy_json(tmp_path, cache):
    out = tmp_path / "gpu.json"
    r = _run(["bench/gpu.py", "--backends", "numpy", "--size", "256", "--batches", "1", "2", "--repeat", "1",
              "--cache", str(cache), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is True
    assert res["stages"] == list(STAGES)
    assert res["machine"]["cpu_count"] >= 1 and res["versions"]["numpy"] == np.__version__
    assert res["config"]["write"] is True and res["config"]["sync_stage_times"] is True
    assert res["statics"]["numpy"]["statics_s"] > 0
    assert res["check"] is None  # numpy alone: nothing to compare with
    rows = res["results"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("numpy", 1), ("numpy", 2)]
    for row in rows:
        assert "error" not in row, row
        assert set(row["stage_ms_per_visit"]) == set(STAGES)
        assert all(math.isfinite(v) and v >= 0 for v in row["stage_ms_per_visit"].values())
        assert all(row["stage_ms_per_visit"][s] > 0 for s in COMPUTE)
        assert row["wall_ms_per_visit"] > 0 and row["pairs_per_s"] > 0
        # the stages account for the wall time of process_visit (to host bookkeeping)
        assert 0.5 * row["wall_ms_per_visit"] < row["stage_sum_ms_per_visit"] <= 1.01 * row["wall_ms_per_visit"]
        assert row["candidates_per_pair"] > 0 and row["statuses"] == {"done": row["batch"]}
        assert row["fft_floor_ms_per_pair"] > 0 and row["plain_zogy_ms_per_pair"] > 0
        assert row["ratio_to_plain_zogy"] == pytest.approx(row["wall_ms_per_visit"] / row["plain_zogy_ms_per_pair"])
        x = row["xfer"]
        for k in ("h2d_bytes_per_visit", "d2h_bytes_per_visit", "h2d_copies_per_batch", "d2h_copies_per_batch",
                  "scalar_reads_per_batch", "scalar_reads_per_visit"):
            assert x[k] == 0, (k, x)  # numpy: nothing crosses, by construction
        assert "by construction" in x["note"]
        assert row["peak_host_rss_bytes"] > 0 and row["device_memory"] is None
    assert "| numpy | 2 |" in r.stdout and "plain ZOGY" in r.stdout


def test_chain_bench_json(tmp_path, cache):
    out = tmp_path / "chain.json"
    r = _run(["bench/chain.py", "--sizes", "256", "--repeat", "1", "--no-night", "--cache", str(cache),
              "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["stages"] == list(STAGES)
    (p,) = res["pairs"]
    assert set(p["stages_s"]) == set(STAGES)
    assert all(p["stages_s"][s] > 0 for s in COMPUTE)
    assert p["statics_s"] > 0 and p["per_visit_s"] > 0
    assert p["first_visit_s"] == pytest.approx(p["statics_s"] + p["first_process_visit_s"])
    assert p["plain_zogy_s"] > 0
    assert p["ratio_per_visit_to_plain_zogy"] == pytest.approx(p["per_visit_s"] / p["plain_zogy_s"])
    assert p["n_candidates"] > 0 and p["completeness_snr7"] is not None and p["peak_rss_gib"] > 0
    assert "per visit / plain ZOGY" in r.stdout


def test_gpu_check_script_syntax():
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh here")
    r = subprocess.run([sh, "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compare_backends_lists_differences():
    gpu = _gpu_module()
    rng = np.random.default_rng(3)
    s = rng.normal(size=(32, 32))
    base = {"S_corr": s, "x": np.array([3.0, 10.0, 20.0]), "y": np.array([4.0, 12.0, 25.0]),
            "sign": np.array([True, False, True]), "scorr": np.array([6.0, -7.0, 9.0])}
    same = gpu.compare_backends(dict(base, S_corr=s * (1 + 1e-7)), base)
    assert same["pass"] and same["candidates_identical"] and same["scorr_rel_l2"] < 1e-6
    moved = dict(base, x=np.array([3.0, 10.2, 20.0]), S_corr=s + 0.1)
    diff = gpu.compare_backends(moved, base)
    assert not diff["pass"] and diff["same_count"] and not diff["candidates_identical"]
    assert [d["numpy"][:2] for d in diff["differing"] if d["numpy"]] == [[10.0, 12.0]]
    assert [d["cupy_only"][:2] for d in diff["differing"] if not d["numpy"]] == [[10.2, 12.0]]
    assert diff["scorr_rel_l2"] == pytest.approx(0.1 * 32 / np.linalg.norm(s), rel=1e-6)
