"""Backend selection (one place, clear errors), device moves, pool/plan-cache setup (no-ops on numpy)
and the double-buffered upload pipeline's bookkeeping (numpy fallback; the cupy path runs where a
GPU is present)."""
import sys
import types

import numpy as np
import pytest

from nightsift.engine import backend as bk
from nightsift.engine.errors import BackendError, ConfigError


def _fake_cupy(count=None, exc=None):
    """A stand-in 'cupy' module whose CUDA runtime reports ``count`` devices or raises ``exc``."""
    def get_count():
        if exc is not None:
            raise exc
        return count

    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    return mod


class CUDARuntimeError(RuntimeError):
    pass


def test_numpy_and_unknown_names():
    assert bk.get_backend("numpy") is np
    with pytest.raises(ConfigError, match=r"run.backend: unknown array backend 'torch'.*numpy, cupy, auto"):
        bk.get_backend("torch")


def test_cupy_requested_without_cupy_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(BackendError) as ei:
        bk.get_backend("cupy")
    msg = str(ei.value)
    assert 'run.backend = "cupy" was requested but cupy cannot be imported (ModuleNotFoundError' in msg
    assert "cupy-cuda12x" in msg and 'run.backend = "numpy"' in msg
    assert bk.get_backend("auto") is np  # auto falls back quietly
    assert not bk.probe_gpu().ok


def test_cupy_requested_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=0))
    with pytest.raises(BackendError, match="CUDA reports 0 devices"):
        bk.get_backend("cupy")
    assert bk.get_backend("auto") is np
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(exc=CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device")))
    with pytest.raises(BackendError, match=r"no usable device \(CUDARuntimeError: cudaErrorNoDevice"):
        bk.get_backend("cupy")
    assert isinstance(BackendError("x"), RuntimeError)


def test_auto_picks_cupy_when_a_device_exists(monkeypatch):
    fake = _fake_cupy(count=2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert bk.probe_gpu() == bk.GpuProbe(True, 2, "")
    assert bk.get_backend("auto") is fake and bk.get_backend("cupy") is fake
    assert bk.backend_name(fake) == "cupy" and bk.backend_name(np) == "numpy"


def test_config_default_is_accepted():
    from nightsift.engine.config import Config

    assert bk.get_backend(Config().run.backend) is np or bk.probe_gpu().ok


def test_to_device_and_host_walk_containers():
    a = np.arange(6.0).reshape(2, 3)
    out = bk.to_device({"a": a, "b": [a, None], "c": 3.0}, np)
    assert out["a"] is a and out["b"][1] is None and out["c"] == 3.0
    back = bk.to_host((out["a"], out["b"]))
    assert isinstance(back, tuple) and np.array_equal(back[0], a)


def test_pool_and_plan_cache_are_noops_on_numpy_but_validate():
    assert bk.configure_memory_pool(np, limit_bytes=1 << 30) is None
    assert bk.configure_memory_pool(np, fraction=0.8) is None
    with pytest.raises(ConfigError, match="exactly one"):
        bk.configure_memory_pool(np)
    with pytest.raises(ConfigError, match="exactly one"):
        bk.configure_memory_pool(np, limit_bytes=10, fraction=0.5)
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
        bk.configure_memory_pool(np, fraction=1.5)
    with pytest.raises(ConfigError, match="limit_bytes must be > 0"):
        bk.configure_memory_pool(np, limit_bytes=0)
    assert bk.configure_fft_plan_cache(np, n_plans=4) is None
    with pytest.raises(ConfigError, match="n_plans"):
        bk.configure_fft_plan_cache(np, n_plans=0)
    assert bk.memory_stats(np) == {"used_bytes": 0, "pool_bytes": 0, "limit_bytes": 0}


def test_fft_plans_needed():
    assert bk.fft_plans_needed([(16, 1056, 1056), (16, 1056, 1056), (8, 1056, 1056)]) == 4
    assert bk.fft_plans_needed([]) == 1


def _batches(n, shape, log):
    for k in range(n):
        log.append(("pull", k))
        yield np.full(shape, k, np.float32)


@pytest.mark.parametrize("n_buffers", [2, 3])
def test_upload_pipeline_prefetches_and_reuses_slots_safely(n_buffers):
    shape = (2, 4, 5)
    pipe = bk.UploadPipeline(np, shape, np.float32, n_buffers=n_buffers)
    log, seen, ids = [], [], []
    for k, dev in enumerate(pipe.run(_batches(7, shape, log))):
        with pipe.compute:
            seen.append(float(dev.mean()))
        ids.append(id(dev))
        # the next n_buffers - 1 batches were pulled (uploaded) before this one was handed out
        assert ("pull", min(k + n_buffers - 1, 6)) in log
    pipe.synchronize()
    assert seen == [float(k) for k in range(7)]
    assert len(set(ids)) == n_buffers  # round-robin over the slots
    tr = list(pipe.trace)
    # batch k+1 is uploaded before batch k is yielded (the overlap)
    for k in range(6):
        assert tr.index(("upload", k + 1, (k + 1) % n_buffers)) < tr.index(("yield", k, k % n_buffers))
    # a slot is refilled only after the batch that used it was released
    for k in range(7 - n_buffers):
        j = k + n_buffers
        assert tr.index(("release", k, k % n_buffers)) < tr.index(("upload", j, j % n_buffers))


def test_upload_pipeline_copies_and_checks_shape():
    pipe = bk.UploadPipeline(np, (3,), np.float64)
    src = [np.array([1.0, 2.0, 3.0])]
    for dev in pipe.run(src):
        dev[:] = 0  # the pipeline's buffer, not the caller's array
    assert src[0].tolist() == [1.0, 2.0, 3.0]
    assert list(pipe.run([])) == []
    with pytest.raises(ValueError, match=r"batch 1 has shape \(4,\), the pipeline was built for \(3,\)"):
        list(pipe.run([np.zeros(3), np.zeros(4)]))
    with pytest.raises(ConfigError, match="n_buffers"):
        bk.UploadPipeline(np, (3,), np.float64, n_buffers=1)


@pytest.mark.gpu
def test_upload_pipeline_on_gpu():
    if not bk.probe_gpu().ok:
        pytest.skip("no CUDA GPU with cupy here")
    import cupy

    xp = bk.get_backend("cupy")
    assert xp is cupy
    limit = bk.configure_memory_pool(xp, limit_bytes=1 << 30)
    assert limit == 1 << 30
    cache = bk.configure_fft_plan_cache(xp, n_plans=4, max_bytes=1 << 28)
    assert cache.get_size() == 4
    pipe = bk.UploadPipeline(xp, (2, 64, 64), np.float32)
    sums = []
    for dev in pipe.run(np.full((2, 64, 64), k, np.float32) for k in range(5)):
        with pipe.compute:
            sums.append(dev.sum())
    pipe.synchronize()
    assert [float(s) for s in sums] == [k * 2 * 64 * 64 for k in range(5)]
    assert bk.memory_stats(xp)["limit_bytes"] == 1 << 30


def test_pipeline_honours_the_backend_setting(monkeypatch):
    """process_pair takes its array module from config.run.backend (one place): asking for cupy
    where there is none stops with the BackendError before any stage runs."""
    from nightsift.engine import backend as be
    from nightsift.engine.config import Config
    from nightsift.engine.pipeline import process_pair
    from nightsift.engine.simulate import simulate_ccd_pair

    if be.probe_gpu().ok:
        pytest.skip("a GPU is present: the cupy path runs for real in the GPU tests")
    sim = simulate_ccd_pair("decam", shape=(512, 512), seed=3, n_transients=5)
    sci = sim.science_exposure()
    with pytest.raises(BackendError, match="cupy"):
        process_pair(sci, sim.reference, config=Config().replace(run={"backend": "cupy"}), write=False)
    res = process_pair(sci, sim.reference, config=Config().replace(run={"backend": "auto"}), write=False)
    assert res.qa["n_tiles"] >= 1
