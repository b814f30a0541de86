"""Real/bogus inference throughput: triplets per second per backend and batch size.

    python bench/classify.py                      # the shipped nightsift model (or braai, see below)
    python bench/classify.py --threads 2 --n 4096 --batches 1,32,256 --out bench/classify.json

Backends: ``keras`` (float, TensorFlow on ``--threads`` threads), ``tflite`` (the full-integer int8
model through LiteRT on the CPU, ``num_threads=--threads``), ``edgetpu`` (when libedgetpu is
installed). Two numbers per row:

* ``model``: the network alone on already-normalised inputs (what the backend costs);
* ``scorer``: :class:`nightsift.engine.classify.runtime.Scorer` end to end (normalisation +
  quantisation + network), what the chain pays per CCD.

Model: ``--model`` (a metadata JSON or .tflite/.keras), else the one shipped in
``engine/classify/models/``; when there is none yet, nightsift's CNN architecture untrained (seeded;
speed does not depend on the weights) exported to int8 with nightsift's exporter, calibrated on
the input triplets.
Inputs: the 499 real ZTF triplets (repeated to ``--n``) when ``shared/data/ztf`` is present, else
seeded noise with a blob.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _inputs(n: int, rng) -> tuple[np.ndarray, np.ndarray, str]:
    """(raw triplets for nightsift's scorer, braai-preprocessed triplets, description)."""
    from nightsift.engine.classify.braai import braai_preprocess, default_braai_dir

    alerts = default_braai_dir().parent / "alerts"
    if alerts.is_dir():
        from nightsift.engine.io.avro import iter_ztf_packets

        raw = np.stack([t for _, t, _ in iter_ztf_packets(alerts)])
        src = f"{len(raw)} real ZTF triplets, repeated"
    else:
        yy, xx = np.mgrid[:63, :63] - 31.0
        blob = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
        raw = rng.normal(100, 5, (512, 63, 63, 3)) + rng.uniform(0, 500, (512, 1, 1, 1)) * blob[..., None]
        src = "512 seeded synthetic triplets, repeated"
    idx = np.resize(np.arange(len(raw)), n)
    raw = raw[idx].astype(np.float32)
    return raw, braai_preprocess(raw), src


def _model_files(args, raw: np.ndarray, tmp: Path) -> dict:
    """{"keras": path, "tflite": path, "normalisation": str, "name": str}."""
    from nightsift.engine.classify.runtime import resolve_model
    from nightsift.engine.config import ClassifyConfig

    try:
        t = resolve_model(ClassifyConfig(backend="tflite", model=args.model or ""))
        k = resolve_model(ClassifyConfig(backend="keras", model=args.model or ""))
        return {"keras": k.path, "tflite": t.path, "normalisation": t.normalisation, "name": t.version}
    except Exception as e:  # no nightsift model yet: its architecture, untrained, exported here
        if args.model:
            raise
        print(f"no nightsift model ({e}); benchmarking nightsift's CNN architecture untrained "
              "(seeded), exported to int8 here", file=sys.stderr)
    from nightsift.engine.classify.export import export_int8
    from nightsift.engine.classify.model import build_model
    from nightsift.engine.classify.preprocess import preprocess

    model = build_model(seed=0)
    kp = tmp / "nightsift_untrained.keras"
    model.save(kp)
    tp = export_int8(model, preprocess(raw[:300]), tmp / "nightsift_untrained_int8.tflite", n_calibration=300)
    return {"keras": kp, "tflite": tp, "normalisation": "nightsift",
            "name": "nightsift CNN architecture, untrained (exported here)"}


def _rate(fn, x: np.ndarray, repeat: int) -> float:
    fn(x[: min(len(x), 256)])  # warm-up (allocation, tracing)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="metadata JSON or model file (default: the shipped model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4096, help="triplets per timing")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeat", type=int, default=3, help="timings per row (the best is kept)")
    p.add_argument("--backends", default="keras,tflite,edgetpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("classify.json")))
    args = p.parse_args(argv)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from nightsift.engine.classify.runtime import (Scorer, _KerasPredict, _LiteRT, _edgetpu_delegate, _load_keras,
                                                    _normaliser, edgetpu_available, ModelSpec)

    rng = np.random.default_rng(0)
    raw, braai_x, src = _inputs(args.n, rng)
    batches = [int(b) for b in args.batches.split(",")]
    backends = [b for b in args.backends.split(",") if b != "edgetpu" or edgetpu_available()]
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        files = _model_files(args, raw, Path(tmpd))
        norm = _normaliser(files["normalisation"])
        x = norm(raw) if files["normalisation"] != "braai" else braai_x
        t0 = time.perf_counter()
        norm(raw[:1024])
        norm_rate = 1024 / (time.perf_counter() - t0)
        for backend in backends:
            for b in batches:
                if backend == "keras":
                    model = _load_keras(files["keras"])
                    pred = _KerasPredict(model)
                else:
                    dele = [_edgetpu_delegate()] if backend == "edgetpu" else []
                    pred = _LiteRT(files["tflite"], batch_size=b, num_threads=args.threads, delegates=dele)
                spec = ModelSpec(backend, Path(files[backend if backend == "keras" else "tflite"]),
                                 files["normalisation"], files["name"], 0.5)
                bare = Scorer(spec, pred, preprocess=lambda a: a, batch_size=b)
                full = Scorer(spec, pred, preprocess=norm, batch_size=b)
                n_keras = min(len(x), 1024) if backend == "keras" and b < 16 else len(x)
                r_model = _rate(bare.score, x[:n_keras], args.repeat)
                r_full = _rate(full.score, raw[:n_keras], max(1, args.repeat - 1))
                rows.append({"backend": backend, "precision": "float32" if backend == "keras" else "int8",
                             "batch": b, "model_triplets_per_s": round(r_model, 1),
                             "scorer_triplets_per_s": round(r_full, 1), "n": n_keras})
                print(f"{backend:8s} batch {b:4d}: model {r_model:9.1f} /s   scorer {r_full:9.1f} /s", flush=True)

    print()
    print(f"model: {files['name']}  normalisation: {files['normalisation']} ({norm_rate:.0f} triplets/s alone)")
    print(f"inputs: {src}; threads: {args.threads}; machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} (other work on the machine slows every row)")
    print(f"{'backend':8s} {'prec':7s} {'batch':>5s} {'model /s':>10s} {'scorer /s':>10s}")
    for r in rows:
        print(f"{r['backend']:8s} {r['precision']:7s} {r['batch']:5d} {r['model_triplets_per_s']:10.1f} "
              f"{r['scorer_triplets_per_s']:10.1f}")
    out = {
        "benchmark": "classify", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/classify.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "model": files["name"], "normalisation": files["normalisation"],
        "normalisation_triplets_per_s": round(norm_rate, 1), "inputs": src, "threads": args.threads,
        "edgetpu": edgetpu_available(), "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()], "rows": rows,
        "versions": {"tensorflow": tf.__version__, "numpy": np.__version__},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
