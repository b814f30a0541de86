"""ZTF's braai d6_m7 in nightsift: weights, preprocessing and scores on real ZTF packets.

The expected scores in ``tests/data/braai_d6_m7_expected.json`` were computed once with this
module's loader (regenerate with ``python tests/engine/test_braai.py``, only if the model or the
preprocessing is meant to change). They are checked, all eight, against an oracle that shares no
code with nightsift: the packets read with fastavro, gzip and astropy, ZTF's documented
preprocessing for d6_m7 (``../shared/data/ztf/README.md``: NaN -> 0, each row over its L2 norm;
cutouts truncated at a CCD edge padded at the high end with 1e-9, as ZTF's ``make_triplet``), and
a numpy forward pass straight from the HDF5 weights. The same oracle reproduces ZTF's own
production score ``drb`` (d6_m7) stored in the real packets of ``alerts_drb/``, so it is an
oracle for the model and the preprocessing, not only for nightsift's rebuild of them.
"""
from __future__ import annotations

import gzip
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from nightsift.engine.classify.braai import (BRAAI_SIZE, ZTF_PAD_VALUE, braai_preprocess, braai_triplet,
                                             check_architecture, normalize_rows, read_braai_triplets, ztf_pad)
from nightsift.engine.errors import InputError

try:
    from ..conftest import shared_data
except ImportError:  # run as a script
    shared_data = None

EXPECTED = Path(__file__).resolve().parents[1] / "data" / "braai_d6_m7_expected.json"
#: packets of the shared sample: two truncated at a CCD edge (53x63, 63x44), two whose template
#: holds float32-max fill values, the lowest and highest scores, two near 0.5
PACKETS = [
    "697251920715010005.avro", "697252382115010005.avro",
    "697251921615015003.avro", "697252381615015002.avro",
    "697252385115010005.avro", "697251921615015001.avro",
    "697252385215010015.avro", "697252840215010006.avro",
]


# ----------------------------------------------------------------------------- independent oracle

def _ztf_triplet(path: Path) -> tuple[np.ndarray, dict]:
    """ZTF's d6_m7 input of the first packet in ``path``, read without nightsift: fastavro, gzip,
    astropy; NaN -> 0, each row over its L2 norm (``tf.keras.utils.normalize`` of Keras 2:
    ``x / np.linalg.norm(x, 2, -1)``, a zero norm taken as 1), then padded to 63 x 63 at the high
    end with 1e-9; channels (science, template, difference)."""
    import fastavro
    from astropy.io import fits

    with open(path, "rb") as f:
        packet = next(fastavro.reader(f))
    chans = []
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        with warnings.catch_warnings():  # ZTF's cutout headers: astropy notes a non-standard SIMPLE card
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            with fits.open(io.BytesIO(gzip.decompress(packet[key]["stampData"]))) as hdul:
                c = np.nan_to_num(np.asarray(hdul[0].data, dtype=np.float32))
        with np.errstate(over="ignore", invalid="ignore"):  # float32-max template fill overflows the norm
            l2 = np.linalg.norm(c, 2, axis=-1)
            l2[l2 == 0] = 1.0
            c = c / l2[:, None]
        chans.append(np.pad(c, [(0, 63 - c.shape[0]), (0, 63 - c.shape[1])], constant_values=1e-9))
    return np.stack(chans, axis=-1), packet["candidate"]


def _conv_relu(x, k, b):
    """Valid 3x3 cross-correlation + bias + ReLU; x (n, ny, nx, cin), k (3, 3, cin, cout)."""
    ny, nx = x.shape[1] - 2, x.shape[2] - 2
    out = sum(x[:, i:i + ny, j:j + nx, :] @ k[i, j] for i in range(3) for j in range(3))
    return np.maximum(out + b, 0.0)


def _maxpool(x, p):
    ny, nx = x.shape[1] // p, x.shape[2] // p
    return x[:, :ny * p, :nx * p].reshape(len(x), ny, p, nx, p, -1).max(axis=(2, 4))


def _numpy_braai(weights_h5: Path, triplets: np.ndarray) -> np.ndarray:
    """d6_m7's forward pass in float64 from the published architecture (README) and the HDF5
    weights: conv1, conv2 (16, 3x3 valid, ReLU), maxpool 2, conv3, conv4 (32), maxpool 4, flatten
    channels-last, fc_1 (256, ReLU), fc_out (sigmoid); dropout is off at inference."""
    h5py = pytest.importorskip("h5py")

    with h5py.File(weights_h5, "r") as f:
        w = {n: (np.asarray(f[n][n]["kernel:0"], np.float64), np.asarray(f[n][n]["bias:0"], np.float64))
             for n in ("conv1", "conv2", "conv3", "conv4", "fc_1", "fc_out")}
    x = np.asarray(triplets, np.float64)
    x = _maxpool(_conv_relu(_conv_relu(x, *w["conv1"]), *w["conv2"]), 2)
    x = _maxpool(_conv_relu(_conv_relu(x, *w["conv3"]), *w["conv4"]), 4)
    x = np.maximum(x.reshape(len(x), -1) @ w["fc_1"][0] + w["fc_1"][1], 0.0)
    z = (x @ w["fc_out"][0] + w["fc_out"][1])[:, 0]
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.data
def test_oracle_reproduces_ztf_production_drb():
    """The oracle against ZTF: every packet of alerts_drb/ carries the drb ZTF's pipeline gave it
    with d6_m7 (float32 TensorFlow); the oracle agrees to ~5e-7 (float32 rounding)."""
    d = shared_data("ztf")
    trips, drb, shapes = [], [], set()
    for path in sorted((d / "alerts_drb").glob("*.avro")):
        t, cand = _ztf_triplet(path)
        assert cand["drbversion"] == "d6_m7", path.name
        trips.append(t)
        drb.append(cand["drb"])
        shapes.add(t.shape)
    assert len(trips) == 139 and shapes == {(63, 63, 3)}
    np.testing.assert_allclose(_numpy_braai(d / "braai" / "d6_m7.weights.h5", np.stack(trips)), drb,
                               rtol=0, atol=5e-6)


@pytest.mark.data
def test_committed_scores_match_the_oracle():
    """All eight committed scores, and nightsift's reading and preprocessing of the packets."""
    d = shared_data("ztf")
    expected = json.loads(EXPECTED.read_text())["scores"]
    assert sorted(expected) == sorted(PACKETS)
    trips = np.stack([_ztf_triplet(d / "alerts" / n)[0] for n in PACKETS])
    ours = np.stack([next(read_braai_triplets(d / "alerts" / n))[0] for n in PACKETS])
    np.testing.assert_allclose(ours, trips, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([expected[n] for n in PACKETS],
                               _numpy_braai(d / "braai" / "d6_m7.weights.h5", trips), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- preprocessing (no data)

def test_normalize_rows_is_keras_normalize(rng):
    keras = pytest.importorskip("keras")
    x = rng.normal(size=(63, 63)).astype(np.float32) * 100
    x[5] = 0.0
    np.testing.assert_allclose(normalize_rows(x), np.asarray(keras.utils.normalize(x, axis=-1, order=2)),
                               rtol=1e-6, atol=1e-7)
    assert np.all(normalize_rows(x)[5] == 0)


def test_braai_triplet_and_ztf_padding(rng):
    sci = rng.normal(size=(63, 44)).astype(np.float32)
    sci[3, 7] = np.nan
    ref = rng.normal(size=(63, 44)).astype(np.float32)
    diff = rng.normal(size=(63, 44)).astype(np.float32)
    t = braai_triplet(sci, ref, diff)
    assert t.shape == (BRAAI_SIZE, BRAAI_SIZE, 3) and t.dtype == np.float32
    # normalised before padding, NaN -> 0, padding at the high end with 1e-9 (ZTF's make_triplet)
    np.testing.assert_allclose(np.linalg.norm(t[:, :44, 1], axis=1), 1.0, rtol=1e-6)
    assert t[3, 7, 0] == 0.0
    assert np.all(t[:, 44:, :] == np.float32(ZTF_PAD_VALUE))
    assert ztf_pad(np.ones((50, 63))).shape == (63, 63) and np.all(ztf_pad(np.ones((50, 63)))[50:] == ZTF_PAD_VALUE)
    with pytest.raises(InputError):
        ztf_pad(np.ones((64, 63)))


def test_braai_preprocess_rows_and_nan(rng):
    x = rng.normal(size=(2, 63, 63, 3)).astype(np.float32)
    x[0, 10, :, 2] = np.nan  # a row with no data
    x[1, :, :30, 0] = np.nan  # off the CCD on the left
    before = x.copy()
    y = braai_preprocess(x)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert np.all(y[0, 10, :, 2] == 0) and np.all(y[1, :, :30, 0] == 0)
    norms = np.linalg.norm(y, axis=2)
    norms[0, 10, 2] = 1.0
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    # same as the per-cutout ZTF path on an uncut triplet
    np.testing.assert_allclose(y[1], braai_triplet(x[1, ..., 0], x[1, ..., 1], x[1, ..., 2]), rtol=1e-6)


@pytest.mark.data
def test_architecture_check_rejects_other_models(tmp_path):
    d = shared_data("ztf/braai")
    cfg = json.loads((d / "d6_m7.architecture.json").read_text())
    check_architecture(d / "d6_m7.architecture.json")
    cfg["config"]["layers"][4]["config"]["filters"] = 64
    bad = tmp_path / "d6_m7.architecture.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="layer 4"):
        check_architecture(bad)


# ----------------------------------------------------------------------------- real packets

@pytest.fixture(scope="module")
def braai_model():
    pytest.importorskip("keras")
    from nightsift.engine.classify.braai import load_braai

    return load_braai(shared_data("ztf/braai"))


@pytest.mark.data
def test_keras3_rebuild_matches_numpy_oracle(braai_model):
    d = shared_data("ztf")
    trips = np.stack([_ztf_triplet(d / "alerts" / name)[0] for name in PACKETS])
    keras_scores = braai_model.predict(trips, verbose=0)[:, 0]
    np.testing.assert_allclose(keras_scores, _numpy_braai(d / "braai" / "d6_m7.weights.h5", trips), rtol=0, atol=1e-5)


@pytest.mark.data
def test_braai_reproduces_committed_scores(braai_model):
    d = shared_data("ztf/alerts")
    expected = json.loads(EXPECTED.read_text())["scores"]
    assert sorted(expected) == sorted(PACKETS)
    trips, shapes = [], []
    for name in PACKETS:
        t, cand = next(read_braai_triplets(d / name))
        trips.append(t)
        shapes.append(cand["edge_shapes"][0])
    assert (53, 63) in shapes and (63, 44) in shapes  # the truncated-cutout path is exercised
    got = braai_model.predict(np.stack(trips), verbose=0)[:, 0]
    np.testing.assert_allclose(got, [expected[n] for n in PACKETS], rtol=0, atol=1e-5)


@pytest.mark.data
def test_nightsift_reads_and_scores_ztf_packets():
    """nightsift's ZTF reader -> the scorer (backend braai) -> ZTF's scores."""
    from nightsift.engine.classify.runtime import load_scorer
    from nightsift.engine.config import ClassifyConfig
    from nightsift.engine.io.avro import iter_ztf_packets, read_ztf_packet

    d = shared_data("ztf")
    pytest.importorskip("keras")
    scorer = load_scorer(ClassifyConfig(backend="braai", model=str(d / "braai"), batch_size=3))
    assert scorer.versions["drb"].startswith("d6_m7") and scorer.threshold == 0.5
    trips, cands = zip(*(read_ztf_packet(d / "alerts" / n) for n in PACKETS))
    out = scorer(np.stack(trips))
    expected = json.loads(EXPECTED.read_text())["scores"]
    # the truncated packets here lost pixels at the high side, where ZTF pads too: same scores
    np.testing.assert_allclose(out["drb"], [expected[n] for n in PACKETS], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["rb"], out["drb"])
    assert all(c["objectId"].startswith("ZTF") for c in cands)
    # the whole folder reads (499 packets) and scores in one call
    all_trips = np.stack([t for _, t, _ in iter_ztf_packets(d / "alerts")])
    s = scorer.score(all_trips)
    assert s.shape == (499,) and np.all((s >= 0) & (s <= 1))
    assert 0.3 < np.mean(s >= 0.5) < 0.95  # an unfiltered stream: plenty of both classes


def _regenerate():  # pragma: no cover - run by hand
    from datetime import date

    import keras

    from nightsift.engine.classify.braai import default_braai_dir, load_braai

    d = default_braai_dir()
    model = load_braai(d)
    alerts = d.parent / "alerts"
    trips = [next(read_braai_triplets(alerts / n))[0] for n in PACKETS]
    s = model.predict(np.stack(trips), verbose=0)[:, 0]
    EXPECTED.parent.mkdir(parents=True, exist_ok=True)
    EXPECTED.write_text(json.dumps({
        "model": "braai d6_m7 (ZTF, github dmitryduev/braai, MIT licence)",
        "preprocessing": "ZTF make_triplet for d6_m7: NaN->0, row L2 norm, pad high end with 1e-9",
        "computed": f"{date.today()} with nightsift.engine.classify.braai.load_braai, keras {keras.__version__}, "
                    "CPU; `python tests/engine/test_braai.py`",
        "scores": {n: float(v) for n, v in zip(PACKETS, s)},
    }, indent=1) + "\n")
    print(f"wrote {EXPECTED}")


if __name__ == "__main__":  # pragma: no cover
    _regenerate()


@pytest.mark.data
def test_ztf_edgetpu_build_needs_the_edge_tpu():
    """ZTF's Edge TPU braai: braai normalisation inferred from its name; on the CPU a clear error."""
    pytest.importorskip("ai_edge_litert")
    from nightsift.engine.classify.runtime import edgetpu_available, load_scorer, resolve_model
    from nightsift.engine.config import ClassifyConfig

    path = shared_data("ztf/braai") / "d6_m7_edgetpu.tflite"
    assert resolve_model(ClassifyConfig(backend="tflite", model=str(path))).normalisation == "braai"
    if not edgetpu_available():
        with pytest.raises(InputError, match="compiled for the Edge TPU"):
            load_scorer(ClassifyConfig(backend="tflite", model=str(path)), num_threads=1)
