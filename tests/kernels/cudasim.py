"""Run a Numba-CUDA test file under the CUDA simulator, in a subprocess.

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when numba is first imported, and the rest of the suite
has already imported numba (the CPU resampling kernels) without it. Setting the variable inside a
test module would be too late and would leak into every test collected after it. So each
``tests/kernels/test_cuda_*.py`` holds one test that reruns *its own file* in a fresh
``python -m pytest`` with ``NUMBA_ENABLE_CUDASIM=1``: there :func:`cuda_mode` is ``"simulator"`` and
the kernel tests run on numpy arrays. On a machine with a GPU they run directly on cupy arrays in
this process and the subprocess test skips. Inputs are small: the simulator runs one Python thread
per CUDA thread.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nightsift.kernels._cuda import cuda_mode

MODE = cuda_mode()
needs_cuda = pytest.mark.skipif(MODE is None, reason="no CUDA device: run under the CUDA simulator by "
                                                     "test_under_cuda_simulator in a subprocess")


def run_file_under_simulator(path: str, *, min_passed: int = 4) -> None:
    """Skip where numba.cuda is usable in-process; else run ``path`` under the simulator and
    require that it passed with at least ``min_passed`` tests (the kernel tests really ran)."""
    if MODE is not None:
        pytest.skip(f"numba.cuda is usable here ({MODE}): this file's kernel tests ran in this process")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                       env=env, capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[2])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= min_passed, out[-3000:]


def to_device(a):
    """On a real GPU the kernels take cupy arrays; under the simulator numpy ones."""
    if MODE == "gpu" and a is not None:
        import cupy

        return cupy.asarray(a)
    return a
