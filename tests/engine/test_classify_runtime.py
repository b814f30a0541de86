"""The scorer interface: LiteRT int8 on the CPU, float Keras, Edge TPU absence, model resolution.

A tiny Keras model is built and exported to full-integer int8 TFLite here (seeded), so the tests
do not depend on the shipped model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from nightsift.engine.classify.export import export_int8
from nightsift.engine.classify import runtime
from nightsift.engine.classify.runtime import Scorer, edgetpu_available, load_scorer, pipeline_scorer, resolve_model
from nightsift.engine.config import ClassifyConfig
from nightsift.engine.errors import BackendError, ConfigError, InputError

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("ai_edge_litert")


def _triplets(rng, n):
    """Star-like triplets: a Gaussian blob of random flux in science/difference, sky noise."""
    yy, xx = np.mgrid[:63, :63] - 31.0
    blob = np.exp(-(xx ** 2 + yy ** 2) / (2 * 2.0 ** 2)).astype(np.float32)
    x = rng.normal(0, 1, size=(n, 63, 63, 3)).astype(np.float32)
    amp = rng.uniform(0, 20, size=(n, 1, 1))
    x[..., 0] += amp * blob
    x[..., 2] += amp * blob * rng.choice([0.0, 1.0], size=(n, 1, 1))
    return x


def _scale(x):
    """The tiny model's normalisation: NaN -> 0, divide by 10 (keeps int8 inputs in range)."""
    return np.nan_to_num(np.asarray(x, np.float32), nan=0.0) / 10.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, keras model, .keras path, int8 .tflite path) of a small seeded model."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((63, 63, 3)),
        keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Flatten(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    rng = np.random.default_rng(3)
    rep = _scale(_triplets(rng, 64))
    d = tmp_path_factory.mktemp("tiny_model")
    export_int8(model, rep, d / "tiny.tflite", n_calibration=64)
    model.save(d / "tiny.keras")
    (d / "tiny.json").write_text(json.dumps({"version": "tiny-1", "tflite": "tiny.tflite", "keras": "tiny.keras",
                                             "threshold": 0.37, "normalisation": "none"}))
    return d, model, d / "tiny.keras", d / "tiny.tflite"


def _cfg(**kw):
    return ClassifyConfig(**kw)


def test_tflite_int8_matches_float_and_is_batch_independent(tiny, rng):
    d, model, _, tfl = tiny
    x = _triplets(rng, 37)
    ref = model.predict(_scale(x), verbose=0)[:, 0]
    s1 = load_scorer(_cfg(backend="tflite", model=str(tfl), batch_size=16), num_threads=1, preprocess=_scale)
    s2 = load_scorer(_cfg(backend="tflite", model=str(tfl), batch_size=1), num_threads=1, preprocess=_scale)
    out = s1(x)
    assert set(out) >= {"rb", "drb"} and out["rb"].shape == (37,) and out["rb"].dtype == np.float32
    np.testing.assert_array_equal(out["rb"], out["drb"])
    # int8 output step is 1/256: the int8 model follows the float one to a few steps
    assert np.max(np.abs(out["rb"] - ref)) < 0.03
    assert np.corrcoef(out["rb"], ref)[0, 1] > 0.98
    # batching (and the zero-padded last batch) does not change any score
    np.testing.assert_array_equal(s2.score(x), out["rb"])
    assert s1.versions == {"rb": "tiny-1/int8", "drb": "tiny-1/int8"}
    assert s1.threshold == pytest.approx(0.37)


def test_tflite_quantisation_by_hand(tiny, rng):
    """Scorer's quantise -> invoke -> dequantise equals doing it by hand with the tensor params."""
    from ai_edge_litert.interpreter import Interpreter

    _, _, _, tfl = tiny
    x = _scale(_triplets(rng, 3))
    it = Interpreter(model_path=str(tfl), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    (si, zi), (so, zo) = inp["quantization"], out["quantization"]
    want = []
    for k in range(3):
        q = np.clip(np.rint(x[k:k + 1] / si + zi), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q)
        it.invoke()
        want.append((it.get_tensor(out["index"]).astype(np.float32)[0, 0] - zo) * so)
    s = load_scorer(_cfg(backend="tflite", model=str(tfl), batch_size=2), num_threads=1, preprocess=lambda a: a)
    np.testing.assert_allclose(s.score(x), want, rtol=0, atol=1e-7)


def test_metadata_json_and_normalisation(tiny, rng):
    d, model, _, _ = tiny
    spec = resolve_model(_cfg(backend="tflite", model=str(d / "tiny.json")))
    assert spec.backend == "tflite" and spec.path == d / "tiny.tflite" and spec.normalisation == "none"
    assert spec.threshold == pytest.approx(0.37) and spec.version == "tiny-1"
    # the configured threshold wins over the model's
    assert resolve_model(_cfg(backend="tflite", model=str(d / "tiny.json"), threshold=0.8)).threshold == 0.8
    # the .keras file picks up the metadata of the same stem
    k = resolve_model(_cfg(backend="keras", model=str(d / "tiny.keras")))
    assert k.backend == "keras" and k.threshold == pytest.approx(0.37)
    # "none" normalisation = NaN -> 0 only
    x = _triplets(rng, 4)
    x[0, :5] = np.nan
    s = load_scorer(_cfg(backend="tflite", model=str(d / "tiny.json")), num_threads=1)
    s_manual = load_scorer(_cfg(backend="tflite", model=str(d / "tiny.json")), num_threads=1,
                           preprocess=lambda a: np.nan_to_num(a, nan=0.0))
    np.testing.assert_array_equal(s.score(x), s_manual.score(x))


def test_keras_backend_safe_mode(tiny, rng):
    _, model, kpath, _ = tiny
    x = _triplets(rng, 5)
    s = load_scorer(_cfg(backend="keras", model=str(kpath), batch_size=2), preprocess=_scale)
    np.testing.assert_allclose(s.score(x), model.predict(_scale(x), verbose=0)[:, 0], atol=1e-6)
    assert s.versions["rb"].endswith("/float32")


def test_keras_refuses_lambda_layers(tmp_path):
    """safe_mode: a model with a Python lambda (arbitrary code) is refused."""
    m = keras.Sequential([keras.Input((63, 63, 3)), keras.layers.Lambda(lambda t: t * 2.0),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    p = tmp_path / "lam.keras"
    m.save(p)
    with pytest.raises(InputError, match="safe mode"):
        load_scorer(_cfg(backend="keras", model=str(p)), preprocess=_scale)


@pytest.mark.skipif(edgetpu_available(), reason="an Edge TPU runtime is installed here")
def test_edgetpu_absent_is_a_clear_error_and_auto_falls_back(tiny):
    _, _, _, tfl = tiny
    with pytest.raises(BackendError, match="libedgetpu"):
        load_scorer(_cfg(backend="edgetpu", model=str(tfl)))
    s = load_scorer(_cfg(backend="auto", model=str(tfl)), preprocess=_scale)
    assert s.backend == "tflite"


@pytest.mark.skipif(not edgetpu_available(), reason="no Edge TPU runtime (libedgetpu.so.1) here")
def test_edgetpu_runs_the_int8_model(tiny, rng):  # pragma: no cover - needs the hardware
    _, _, _, tfl = tiny
    x = _triplets(rng, 8)
    cpu = load_scorer(_cfg(backend="tflite", model=str(tfl)), preprocess=_scale).score(x)
    tpu = load_scorer(_cfg(backend="edgetpu", model=str(tfl)), preprocess=_scale).score(x)
    np.testing.assert_allclose(tpu, cpu, atol=2 / 256)


def test_none_missing_and_bad_inputs(tiny, tmp_path):
    _, _, _, tfl = tiny
    assert load_scorer(_cfg(backend="none")) is None
    assert pipeline_scorer(_cfg(backend="none")) is None
    with pytest.raises(InputError, match="no such model file"):
        load_scorer(_cfg(backend="tflite", model=str(tmp_path / "nope.tflite")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "m.json").write_text("{}")
    with pytest.raises(InputError, match="no int8 .tflite model"):
        resolve_model(_cfg(backend="tflite", model=str(empty / "m.json")))
    (empty / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        resolve_model(_cfg(backend="tflite", model=str(empty / "bad.json")))
    (empty / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(InputError, match="junk.tflite"):
        load_scorer(_cfg(backend="tflite", model=str(empty / "junk.tflite")))
    (empty / "n.json").write_text(json.dumps({"tflite": str(tfl), "normalisation": "zscore"}))
    with pytest.raises(ConfigError, match="zscore"):
        resolve_model(_cfg(backend="tflite", model=str(empty / "n.json")))
    s = load_scorer(_cfg(backend="tflite", model=str(tfl)), preprocess=_scale)
    with pytest.raises(InputError, match=r"\(n, 63, 63, 3\)"):
        s(np.zeros((2, 31, 31, 3), np.float32))
    assert s(np.zeros((0, 63, 63, 3), np.float32))["rb"].shape == (0,)


def test_pipeline_scorer_loads_once_and_auto_without_model(tiny, tmp_path, monkeypatch):
    _, _, _, tfl = tiny
    cfg = _cfg(backend="tflite", model=str(tfl))
    assert pipeline_scorer(cfg) is pipeline_scorer(cfg)
    assert isinstance(pipeline_scorer(cfg), Scorer)
    # "auto" with no shipped model: no scorer (the chain writes packets without rb), not an error
    monkeypatch.setattr(runtime, "MODELS_DIR", tmp_path / "no_models")
    monkeypatch.setattr(runtime, "edgetpu_available", lambda: False)
    assert pipeline_scorer(_cfg(backend="auto")) is None
    with pytest.raises(InputError):
        pipeline_scorer(_cfg(backend="tflite"))


def test_scores_fill_the_packets(tiny, rng):
    """Scorer output -> build_alerts -> the ZTF fields rb/drb and their versions."""
    from astropy.io import fits

    from nightsift.engine.records import CANDIDATE_DTYPE
    from nightsift.engine.stages.package import build_alerts
    from nightsift.kernels.stamps import extract_triplets

    _, _, _, tfl = tiny
    s = load_scorer(_cfg(backend="tflite", model=str(tfl)), preprocess=_scale)
    img = rng.normal(0, 1, (200, 200)).astype(np.float32)
    cands = np.zeros(3, CANDIDATE_DTYPE)
    cands["xpos"] = [50.0, 100.0, 198.0]
    cands["ypos"] = [60.0, 100.0, 150.0]
    cands["isdiffpos"] = True
    hdr = fits.Header({"MJD-OBS": 60000.0, "FILTER": "r"})
    trip = extract_triplets(img, img, img, cands["xpos"], cands["ypos"], size=63)
    scores = s(trip)
    res = build_alerts(cands, triplets=trip, shape=img.shape, header=hdr, visit=1, ccd=2, scores=scores,
                       score_versions=s.versions)
    got = [a["candidate"] for a in res.value]
    np.testing.assert_allclose([c["rb"] for c in got], scores["rb"], rtol=1e-7)
    np.testing.assert_allclose([c["drb"] for c in got], scores["drb"], rtol=1e-7)
    assert {c["rbversion"] for c in got} == {s.versions["rb"]}
    assert res.qa["n_scored"] == 3


def test_night_task_writes_scored_packets(tiny, tmp_path):
    """The local night runner builds the scorer from [classify] and the packets carry rb/drb."""
    from nightsift.engine.config import Config, to_dict
    from nightsift.engine.io.avro import read_alerts
    from nightsift.engine.orchestration.local import simulated_ccd_task

    d, _, _, _ = tiny
    cfg = Config().replace(simulate={"ny": 400, "nx": 400, "n_transients": 10},
                           package={"output_dir": str(tmp_path)},
                           classify={"backend": "tflite", "model": str(d / "tiny.json")})
    rec = simulated_ccd_task(to_dict(cfg), 0, 0)
    assert rec["status"] == "done", rec.get("error")
    assert rec["n_alerts"] > 0 and "t_classify" in rec["qa"] and rec["qa"]["n_scored"] == rec["n_alerts"]
    alerts = read_alerts(tmp_path / "visit00000000_ccd000.avro")
    rb = np.array([a["candidate"]["rb"] for a in alerts])
    assert np.all((rb >= 0) & (rb <= 1))
    assert {a["candidate"]["drbversion"] for a in alerts} == {"tiny-1/int8"}


def test_versioned_normalisation_name(tiny, tmp_path):
    from nightsift.engine.classify import preprocess as prep

    _, _, _, tfl = tiny
    (tmp_path / "m.json").write_text(json.dumps({"tflite": str(tfl), "normalisation": prep.NORMALIZATION}))
    spec = resolve_model(_cfg(backend="tflite", model=str(tmp_path / "m.json")))
    assert spec.normalisation == "nightsift"
    s = load_scorer(_cfg(backend="tflite", model=str(tmp_path / "m.json")))
    x = _triplets(np.random.default_rng(1), 3)
    manual = load_scorer(_cfg(backend="tflite", model=str(tfl)), preprocess=prep.preprocess)
    np.testing.assert_array_equal(s.score(x), manual.score(x))


def test_training_metadata_layout(tiny, tmp_path):
    """The training side's metadata: {"files": {"keras", "tflite_int8"}, "threshold_int8", "name"}."""
    import shutil

    d, _, _, _ = tiny
    shutil.copy(d / "tiny.tflite", tmp_path / "rb_int8.tflite")
    shutil.copy(d / "tiny.keras", tmp_path / "rb.keras")
    (tmp_path / "rb.json").write_text(json.dumps({
        "name": "rb-v1", "normalization": "none", "threshold": 0.4, "threshold_int8": 0.45,
        "files": {"keras": "rb.keras", "tflite_int8": "rb_int8.tflite"}}))
    t = resolve_model(_cfg(backend="tflite", model=str(tmp_path / "rb.json")))
    assert t.path == tmp_path / "rb_int8.tflite" and t.threshold == 0.45 and t.version == "rb-v1"
    k = resolve_model(_cfg(backend="keras", model=str(tmp_path / "rb.json")))
    assert k.path == tmp_path / "rb.keras" and k.threshold == 0.4
    # the .tflite given directly finds rb.json (its stem less _int8)
    assert resolve_model(_cfg(backend="tflite", model=str(tmp_path / "rb_int8.tflite"))).version == "rb-v1"


@pytest.mark.skipif(not list(runtime.MODELS_DIR.glob("*.json")), reason="no model shipped in engine/classify/models yet")
def test_shipped_model_loads_with_defaults(rng):
    """The default [classify] (auto) finds the shipped model, int8 and float agree on its scores."""
    s8 = load_scorer(ClassifyConfig(), num_threads=1)
    sf = load_scorer(ClassifyConfig(backend="keras"))
    assert s8.backend in ("tflite", "edgetpu") and s8.spec.normalisation == "nightsift"
    assert 0 < s8.threshold < 1 and 0 < sf.threshold < 1
    x = _triplets(rng, 16) + 100.0
    a, b = s8.score(x), sf.score(x)
    assert np.all((a >= 0) & (a <= 1)) and np.max(np.abs(a - b)) < 0.1


# ----------------------------------------------------------------------------- model integrity (issue #14)
def _shipped_copy(tmp_path):
    """The shipped model's files (metadata JSON, int8 .tflite, .keras) copied to ``tmp_path``."""
    import shutil

    for p in runtime.MODELS_DIR.iterdir():
        if p.suffix in (".json", ".tflite", ".keras"):
            shutil.copy(p, tmp_path / p.name)
    meta = next(tmp_path.glob("*.json"))
    return meta, json.loads(meta.read_text())


def _flip(path, offset=None, n=32 * 1024):
    b = bytearray(path.read_bytes())
    start = len(b) // 3 if offset is None else offset
    b[start:start + n] = bytes(x ^ 0xFF for x in b[start:start + n])
    path.write_bytes(bytes(b))


@pytest.mark.skipif(not list(runtime.MODELS_DIR.glob("*.json")), reason="no model shipped in engine/classify/models")
def test_shipped_metadata_records_the_sha256_of_each_model_file():
    from nightsift.engine.io.atomic import file_sha256

    meta_path = next(runtime.MODELS_DIR.glob("*.json"))
    meta = json.loads(meta_path.read_text())
    assert set(meta["sha256"]) == set(meta["files"].values())
    for name, digest in meta["sha256"].items():
        assert file_sha256(runtime.MODELS_DIR / name) == digest, name


@pytest.mark.skipif(not list(runtime.MODELS_DIR.glob("*.json")), reason="no model shipped in engine/classify/models")
def test_flipped_bytes_in_a_model_file_are_refused(tmp_path):
    """32 KiB of flipped bytes in the int8 model still load in LiteRT and change the scores: the
    recorded SHA-256 refuses the file, in one line naming it."""
    meta_path, meta = _shipped_copy(tmp_path)
    tfl = tmp_path / meta["files"]["tflite_int8"]
    assert load_scorer(_cfg(backend="tflite", model=str(meta_path)), num_threads=1) is not None  # intact copy
    _flip(tfl)
    for model in (meta_path, tfl):  # through the metadata, or the .tflite whose metadata has the same stem
        with pytest.raises(InputError, match="SHA-256") as err:
            load_scorer(_cfg(backend="tflite", model=str(model)), num_threads=1)
        assert str(tfl) in str(err.value) and "\n" not in str(err.value)
    keras_file = tmp_path / meta["files"]["keras"]
    _flip(keras_file, n=64)
    with pytest.raises(InputError, match="SHA-256") as err:
        load_scorer(_cfg(backend="keras", model=str(meta_path)))
    assert str(keras_file) in str(err.value)


def test_exported_metadata_hashes_are_checked(tiny, tmp_path, caplog):
    """record_model_hashes (used when a model is written) -> a mismatch is an error; a user model
    without a recorded hash loads with a WARNING naming the file."""
    import logging
    import shutil

    from nightsift.engine.classify.export import record_model_hashes

    d, _, _, _ = tiny
    shutil.copy(d / "tiny.tflite", tmp_path / "m_int8.tflite")
    meta = record_model_hashes({"name": "m", "normalisation": "none", "files": {"tflite_int8": "m_int8.tflite"}},
                               tmp_path)
    assert set(meta["sha256"]) == {"m_int8.tflite"}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert load_scorer(_cfg(backend="tflite", model=str(tmp_path / "m.json")), num_threads=1) is not None
    shutil.copy(d / "tiny.tflite", tmp_path / "bare.tflite")
    with caplog.at_level(logging.WARNING, logger="nightsift.classify"):
        load_scorer(_cfg(backend="tflite", model=str(tmp_path / "bare.tflite")), num_threads=1)
    assert any("bare.tflite" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    _flip(tmp_path / "m_int8.tflite", n=16)
    with pytest.raises(InputError, match="SHA-256"):
        load_scorer(_cfg(backend="tflite", model=str(tmp_path / "m.json")), num_threads=1)


@pytest.mark.parametrize("damage", ["crc", "truncated", "empty"])
def test_damaged_keras_file_is_one_line(tiny, tmp_path, damage):
    """A .keras with a bad CRC escaped as a 77-line zipfile traceback; a truncated one was reported
    as 'File not found'."""
    _, _, kpath, _ = tiny
    p = tmp_path / "damaged.keras"
    b = kpath.read_bytes()
    if damage == "crc":
        # flip bytes inside the largest member's data (the central directory stays intact)
        import zipfile

        with zipfile.ZipFile(kpath) as z:
            info = max(z.infolist(), key=lambda i: i.compress_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 8
        b = b[:start] + bytes(x ^ 0xFF for x in b[start:start + 16]) + b[start + 16:]
    elif damage == "truncated":
        b = b[: len(b) // 2]
    else:
        b = b""
    p.write_bytes(b)
    with pytest.raises(InputError) as err:
        load_scorer(_cfg(backend="keras", model=str(p)), preprocess=_scale)
    msg = str(err.value)
    assert str(p) in msg and "\n" not in msg and "not found" not in msg.lower()
    assert ("CRC" in msg) if damage == "crc" else ("truncated or corrupt" in msg)


def test_auto_with_a_configured_model_that_cannot_load_is_an_error(tiny, tmp_path, monkeypatch):
    """classify.backend = auto drops to "no scorer" only when no model is configured or shipped;
    a configured model that is missing or whose metadata is unreadable is an error naming it."""
    monkeypatch.setattr(runtime, "edgetpu_available", lambda: False)
    with pytest.raises(InputError, match="nope.tflite"):
        pipeline_scorer(_cfg(backend="auto", model=str(tmp_path / "nope.tflite")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        pipeline_scorer(_cfg(backend="auto", model=str(tmp_path / "bad.json")))
    # the shipped model counts as configured: unreadable shipped metadata is an error too
    shipped = tmp_path / "models"
    shipped.mkdir()
    (shipped / "nightsift_rb.json").write_text('{"files": {"tflite_int8": "nightsift_rb_int8.tflite"')
    monkeypatch.setattr(runtime, "MODELS_DIR", shipped)
    runtime._cached.cache_clear()  # the process-wide scorer cache may hold the real shipped model
    with pytest.raises(InputError, match="nightsift_rb.json"):
        pipeline_scorer(_cfg(backend="auto"))
    (shipped / "nightsift_rb.json").write_text(json.dumps({"files": {"tflite_int8": "gone_int8.tflite"}}))
    with pytest.raises(InputError, match="gone_int8.tflite"):
        pipeline_scorer(_cfg(backend="auto"))


def test_auto_with_an_empty_models_folder_runs_without_a_scorer(tmp_path, monkeypatch):
    """Nothing configured, nothing shipped (the folder exists but is empty): no scorer, no error."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "README").write_text("no model")
    monkeypatch.setattr(runtime, "MODELS_DIR", tmp_path / "models")
    assert pipeline_scorer(_cfg(backend="auto")) is None


def test_check_model_before_a_night(tiny, tmp_path, monkeypatch):
    """check_model: None when no scorer will run, the verified spec otherwise, the error at once."""
    from nightsift.engine.classify.runtime import check_model

    d, _, _, tfl = tiny
    assert check_model(_cfg(backend="none")) is None
    assert check_model(_cfg(backend="tflite", model=str(d / "tiny.json"))).path == d / "tiny.tflite"
    with pytest.raises(InputError, match="nope.tflite"):
        check_model(_cfg(backend="auto", model=str(tmp_path / "nope.tflite")))
    monkeypatch.setattr(runtime, "MODELS_DIR", tmp_path / "no_models")
    assert check_model(_cfg(backend="auto")) is None


@pytest.mark.skipif(not list(runtime.MODELS_DIR.glob("*.json")), reason="no model shipped in engine/classify/models")
def test_auto_without_the_litert_runtime_runs_without_a_scorer(monkeypatch, caplog):
    """The shipped model and no LiteRT installed (a base install): auto warns once and scores nothing."""
    import importlib.util
    import logging

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ai_edge_litert" else real(name, *a))
    monkeypatch.setattr(runtime, "edgetpu_available", lambda: False)
    runtime._warn_no_model.cache_clear()
    with caplog.at_level(logging.WARNING, logger="nightsift.classify"):
        assert pipeline_scorer(_cfg(backend="auto")) is None
    assert any("LiteRT" in r.getMessage() for r in caplog.records)


def test_model_variants_for_evaluation_come_from_the_one_reader(tiny, tmp_path):
    """``nightsift evaluate``'s float and int8 variants, each with the threshold its metadata
    stores, are resolved by the runtime (one read of the metadata), every file checked against its
    SHA-256."""
    import shutil

    from nightsift.engine.classify.export import record_model_hashes
    from nightsift.engine.classify.runtime import model_variants

    d, _, _, _ = tiny
    shutil.copy(d / "tiny.tflite", tmp_path / "rb_int8.tflite")
    shutil.copy(d / "tiny.keras", tmp_path / "rb.keras")
    meta = record_model_hashes({"name": "rb-v1", "normalization": "none", "threshold": 0.4, "threshold_int8": 0.45,
                                "files": {"keras": "rb.keras", "tflite_int8": "rb_int8.tflite"}}, tmp_path)
    (tmp_path / "rb.json").write_text(json.dumps(meta))
    v = model_variants(tmp_path / "rb.json")
    assert {k: (s.backend, s.path, s.stored_threshold) for k, s in v.items()} == {
        "float": ("keras", tmp_path / "rb.keras", 0.4), "int8": ("tflite", tmp_path / "rb_int8.tflite", 0.45)}
    assert {k: s.backend for k, s in model_variants(tmp_path / "rb.keras").items()} == {"float": "keras"}
    assert model_variants(tmp_path / "rb_int8.tflite")["int8"].stored_threshold == 0.45  # rb.json, by its stem
    shutil.copy(d / "tiny.keras", tmp_path / "bare.keras")
    assert model_variants(tmp_path / "bare.keras")["float"].stored_threshold is None  # no metadata: none stored
    (tmp_path / "empty.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="names no"):
        model_variants(tmp_path / "empty.json")
    with pytest.raises(InputError, match="expected a .keras"):
        model_variants(tmp_path / "rb.h5")
    _flip(tmp_path / "rb_int8.tflite", n=16)
    with pytest.raises(InputError, match="SHA-256"):
        model_variants(tmp_path / "rb.json")


@pytest.mark.skipif(not list(runtime.MODELS_DIR.glob("*.json")), reason="no model shipped in engine/classify/models")
def test_model_variants_of_the_shipped_model():
    from nightsift.engine.classify.runtime import model_variants

    meta_path = next(runtime.MODELS_DIR.glob("*.json"))
    meta = json.loads(meta_path.read_text())
    v = model_variants()
    assert v["float"].path == runtime.MODELS_DIR / meta["files"]["keras"]
    assert v["int8"].path == runtime.MODELS_DIR / meta["files"]["tflite_int8"]
    assert (v["float"].stored_threshold, v["int8"].stored_threshold) == (meta["threshold"], meta["threshold_int8"])
