"""Shared fixtures: seeded RNG, the array-module fixture, and the real-data locator."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

#: ../shared beside the clone (CI places it there); tests that need it skip with this reason
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(sub: str) -> Path:
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real data {p} not present (it lives in ../shared/data beside the clone)")
    return p


def _backends():
    out = [pytest.param(np, id="numpy")]
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        out.append(pytest.param(cupy, id="cupy", marks=pytest.mark.gpu))
    except Exception:
        out.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="no CUDA GPU with cupy here")))
    return out


@pytest.fixture(params=_backends())
def xp(request):
    """The array module under test: numpy always, cupy where a GPU is present."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


def pytest_report_header(config):
    return f"nightsift real data: {SHARED_DATA} ({'present' if SHARED_DATA.exists() else 'absent'}); " \
           f"NUMBA_ENABLE_CUDASIM={os.environ.get('NUMBA_ENABLE_CUDASIM', '0')}"
