"""Shared fixtures: seeded RNG, the array-module fixture, the real-data locator; and the rule that
turns a missing machine-learning package into a failure where the ``ml`` extra is installed.

The ``ml`` extra (TensorFlow/Keras, LiteRT)
-------------------------------------------
Tests of the classifier ``pytest.importorskip`` TensorFlow, Keras, LiteRT and h5py so that a
minimal install (``pip install -e '.[test]'``) still runs the rest of the suite. The README's
install (``pip install -e '.[cluster,ml,test]'``, what CI runs) always has them: there a skip for
a missing one would hide a broken install, so it is reported as a failure instead. The ``ml``
extra counts as installed when every distribution the ``ml`` extra of ``pyproject.toml`` lists
for this platform is installed (:mod:`importlib.metadata`; this is how a test session learns what
the install asked for, without an extra setting to keep in step), or when the environment sets
``NIGHTSIFT_REQUIRE_ML=1`` (a CI that wants the guarantee even if the install dropped a package).
"""
from __future__ import annotations

import importlib.metadata
import os
import tomllib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

#: ../shared beside the clone (CI places it there); tests that need it skip with this reason
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


#: import names of the ``ml`` extra: its distributions (tensorflow-cpu / tensorflow, ai-edge-litert)
#: and keras and h5py, which TensorFlow 2.16+ installs (Keras 3 and its weight files)
ML_MODULES = ("tensorflow", "keras", "ai_edge_litert", "h5py")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@lru_cache(maxsize=None)
def ml_extra_installed() -> bool:
    """True when the ``ml`` extra is installed (module docstring): a missing ML import then fails."""
    if os.environ.get("NIGHTSIFT_REQUIRE_ML", "") == "1":
        return True
    from packaging.requirements import Requirement  # a dependency of pytest

    reqs = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["ml"]]
    wanted = [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": "ml"})]
    try:
        for name in wanted:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return bool(wanted)


def _missing_ml_module(report) -> str | None:
    """The ML module whose ``pytest.importorskip`` skipped ``report``, if any."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    for mod in ML_MODULES:
        if reason.startswith((f"could not import '{mod}'", f"could not import '{mod}.")):
            return mod
    return None


def _fail_ml_skip(report) -> None:
    mod = _missing_ml_module(report)
    if mod and ml_extra_installed():
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (f"{reason}\n{mod} is missing although the 'ml' extra is installed (pip install -e "
                           f"'.[cluster,ml,test]'): a broken install, not a reason to skip (see tests/conftest.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report):
    """A module-level ``importorskip`` of an ML package fails collection where the extra is installed."""
    _fail_ml_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """An in-test or fixture ``importorskip`` of an ML package fails where the extra is installed."""
    outcome = yield
    _fail_ml_skip(outcome.get_result())


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
    ml = "installed: a missing ML package fails" if ml_extra_installed() else "not installed: ML tests skip"
    return f"nightsift real data: {SHARED_DATA} ({'present' if SHARED_DATA.exists() else 'absent'}); " \
           f"NUMBA_ENABLE_CUDASIM={os.environ.get('NUMBA_ENABLE_CUDASIM', '0')}; ml extra {ml}"
