"""int8 TFLite export: every tensor int8/int32, every op an Edge TPU op, scores as the float model's;
and the shipped model's files and metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from nightsift.engine.classify.metrics import average_precision, roc_auc  # noqa: E402
from nightsift.engine.classify.export import (  # noqa: E402
    EDGETPU_OPS, edgetpu_problems, export_int8, inspect_tflite, predict_int8,
)
from nightsift.engine.classify.model import DEFAULT_MODEL, load_keras_model  # noqa: E402
from nightsift.engine.classify.train import predict_keras  # noqa: E402

from .test_classify_model import train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, _, tr, _, te = train_tiny(17, n_val=100, n_test=300, epochs=5, patience=5, seed=1)
    path = export_int8(model, tr.inputs(), tmp_path_factory.mktemp("int8") / "m_int8.tflite", n_calibration=200)
    return model, path, te


def _check_edgetpu_file(path):
    info = inspect_tflite(path)
    assert set(info["ops"]) <= EDGETPU_OPS, sorted(set(info["ops"]) - EDGETPU_OPS)
    assert {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "LOGISTIC"} <= set(info["ops"])
    assert set(info["tensor_dtypes"].values()) <= {"int8", "int32"}, info["tensor_dtypes"]
    assert info["input"]["dtype"] == "int8" and info["output"]["dtype"] == "int8"
    assert info["input"]["shape_signature"] == [1, 63, 63, 3]  # static: what edgetpu_compiler needs
    assert info["output"]["quantization"] == [pytest.approx(1 / 256), -128]  # sigmoid's int8 range
    assert edgetpu_problems(path) == []
    return info


@pytest.mark.slow
def test_int8_file_is_edgetpu_compatible(exported):
    _check_edgetpu_file(exported[1])


@pytest.mark.slow
def test_int8_scores_follow_the_float_model(exported):
    model, path, te = exported
    x = te.inputs()
    pf = predict_keras(model, x)
    pq = predict_int8(path, x, batch_size=64)
    assert np.max(np.abs(pq - pf)) < 0.05
    assert abs(average_precision(te.labels, pq) - average_precision(te.labels, pf)) <= 0.005
    assert abs(roc_auc(te.labels, pq) - roc_auc(te.labels, pf)) <= 0.005
    # batching does not change a score
    np.testing.assert_array_equal(predict_int8(path, x[:50], batch_size=7), pq[:50])


def test_export_refuses_bad_calibration_data(exported, tmp_path):
    model = exported[0]
    with pytest.raises(ValueError, match="representative"):
        export_int8(model, np.zeros((4, 32, 32, 3), np.float32), tmp_path / "x.tflite")
    with pytest.raises(ValueError, match="empty"):
        export_int8(model, np.zeros((0, 63, 63, 3), np.float32), tmp_path / "x.tflite")
    with pytest.raises(FileNotFoundError):
        inspect_tflite(tmp_path / "none.tflite")


def _shipped():
    meta_path = DEFAULT_MODEL.with_suffix(".json")
    if not meta_path.exists():
        pytest.skip(f"no shipped model at {meta_path}")
    return meta_path, json.loads(meta_path.read_text())


def test_shipped_model_files_and_metadata():
    from nightsift.engine.classify.preprocess import NORMALIZATION

    meta_path, meta = _shipped()
    keras_path = meta_path.with_name(meta["files"]["keras"])
    tfl_path = meta_path.with_name(meta["files"]["tflite_int8"])
    assert keras_path.stat().st_size < 2e6 and tfl_path.stat().st_size < 2e6
    assert meta["normalization"] == NORMALIZATION
    assert 0 < meta["threshold"] < 1 and 0 < meta["threshold_int8"] < 1
    assert meta["training"]["command"].startswith("nightsift train")
    info = _check_edgetpu_file(tfl_path)
    assert info["input"]["quantization"] == [pytest.approx(meta["int8"]["input_scale"], rel=1e-5),
                                             meta["int8"]["input_zero_point"]]
    m = meta["metrics"]
    # measured on the held-out simulated test split when the model was made
    assert abs(m["int8"]["aucpr"] - m["float"]["aucpr"]) <= 0.005
    assert m["float"]["aucpr"] >= 0.99 and m["int8"]["aucpr"] >= 0.99
    model = load_keras_model(keras_path)  # safe mode
    assert model.get_layer(meta["embedding_layer"]).output.shape[-1] == meta["embedding_dim"]


@pytest.mark.slow
def test_shipped_model_on_a_fresh_simulated_ccd():
    """A CCD the model never saw (another seed): float and int8 agree and both separate real from bogus."""
    from nightsift.engine.classify.dataset import DatasetSpec, plan_units, simulate_unit

    meta_path, meta = _shipped()
    unit = plan_units(DatasetSpec(n_units=1, profiles=("decam",), seed=90210, transients=(60, 60)))[0]
    r = simulate_unit(unit)
    assert r["status"] == "done", r["error"]
    from nightsift.engine.classify.preprocess import compress

    x = compress(r["z"])
    y = r["truth"]["label"]
    pf = predict_keras(load_keras_model(meta_path.with_name(meta["files"]["keras"])), x)
    pq = predict_int8(meta_path.with_name(meta["files"]["tflite_int8"]), x)
    assert np.max(np.abs(pq - pf)) < 0.05
    assert roc_auc(y, pf) > 0.95 and roc_auc(y, pq) > 0.95
