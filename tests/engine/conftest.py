"""Helpers shared by the night-engine tests (test_ray_engine.py, test_fault_night.py).

Faulty sources and writers live here so that both engines run the same faults: the local engine's
spawned worker processes import this module by name (``tests.engine.conftest``, on the path they
inherit), and Ray's workers receive it by value (cloudpickle, registered below). Nothing here
imports Ray at import time: every test under tests/engine loads this file.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from nightsift.engine.io.avro import read_alerts
from nightsift.engine.orchestration.ledger import read_ledger
from nightsift.engine.orchestration.sources import CCDFrame, SimulatedNight
from nightsift.engine.records import RawFrame

# Ray workers do not import the tests: ship these helpers by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCORE_FIELDS = ("rb", "drb")


# -- scorers -----------------------------------------------------------------------------------
def centre_score(triplets):
    """Deterministic stand-in for the real/bogus model: a logistic of the centre difference pixel."""
    t = np.asarray(triplets, dtype=np.float64)
    c = t.shape[1] // 2
    s = (0.5 + 0.5 * np.tanh(t[:, c, c, 2] / 200.0)).astype(np.float32)
    return {"rb": s, "drb": s.copy()}


def fake_scorer_factory(classify):
    return centre_score


class HoldingScorer:
    """:func:`centre_score`, except that the first call of the night (across every inference
    actor: ``held`` is created exclusively) writes its pid to ``marker_dir/held`` and sleeps
    ``hold_s`` before scoring, so that a test can kill the actor while it is scoring. A call that
    returns from its hold writes ``marker_dir/released``."""

    def __init__(self, marker_dir, hold_s: float = 60.0):
        self.marker_dir, self.hold_s = str(marker_dir), float(hold_s)

    def __call__(self, triplets):
        try:
            fd = os.open(os.path.join(self.marker_dir, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return centre_score(triplets)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(self.hold_s)
        Path(self.marker_dir, "released").touch()
        return centre_score(triplets)


def holding_scorer_factory(marker_dir, hold_s: float = 60.0):
    return lambda classify: HoldingScorer(marker_dir, hold_s)


# -- sources -----------------------------------------------------------------------------------
class FaultySource(SimulatedNight):
    """A simulated night with faults at chosen (visit, ccd):

    ``nan``
        the raw frame is all NaN (a broken readout): a bad CCD-visit, failed for its own reason;
    ``kill_once``
        ``load_frame`` SIGKILLs its own process (an OOM kill, a segfault) the first time only
        (a marker file in ``marker_dir``), so a retry succeeds;
    ``kill_always``
        ``load_frame`` SIGKILLs its process every time (a CCD-visit that kills any worker);
    ``hold``
        the first ``load_frame`` writes its pid to ``marker_dir/held`` and sleeps ``hold_s``
        (then writes ``released``), so that a test can kill the worker while it is running.

    Every kill leaves a ``kill_v{visit}_c{ccd}_{n}`` marker in ``marker_dir`` (``n`` counts them).
    """

    def __init__(self, simulate, calibrate, *, marker_dir=None, nan=(), kill_once=(), kill_always=(), hold=(),
                 hold_s: float = 60.0):
        super().__init__(simulate, calibrate)
        self.marker_dir = None if marker_dir is None else str(marker_dir)
        self.nan = {tuple(k) for k in nan}
        self.kill_once = {tuple(k) for k in kill_once}
        self.kill_always = {tuple(k) for k in kill_always}
        self.hold, self.hold_s = {tuple(k) for k in hold}, float(hold_s)

    def _kill(self, visit, ccd):
        n = len(list(Path(self.marker_dir).glob(f"kill_v{visit}_c{ccd}_*")))
        Path(self.marker_dir, f"kill_v{visit}_c{ccd}_{n}").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    def kills(self, visit, ccd) -> int:
        """How many times ``(visit, ccd)`` killed its process."""
        return len(list(Path(self.marker_dir).glob(f"kill_v{visit}_c{ccd}_*")))

    def load_frame(self, visit, ccd, static):
        key = (visit, ccd)
        if key in self.kill_always or (key in self.kill_once and not self.kills(visit, ccd)):
            self._kill(visit, ccd)
        held = None if self.marker_dir is None else Path(self.marker_dir, "held")
        if key in self.hold and not held.exists():
            held.write_text(f"{os.getpid()} visit{visit}_ccd{ccd}")
            time.sleep(self.hold_s)
            Path(self.marker_dir, "released").touch()
        f = super().load_frame(visit, ccd, static)
        if key not in self.nan:
            return f
        raw = RawFrame(np.full_like(f.raw.data, np.nan), f.raw.header, path=f"sim/visit{visit}_ccd{ccd}.fits")
        return CCDFrame(visit=visit, ccd=ccd, raw=raw, truth=f.truth)


def nan_frame_source(simulate, calibrate, bad):
    """A simulated night whose frame of the one (visit, ccd) ``bad`` is all NaN."""
    return FaultySource(simulate, calibrate, nan=[bad])


# -- alert writers (Ray) -----------------------------------------------------------------------
def _alert_writer():
    from nightsift.engine.orchestration.ray_engine import AlertWriter

    return AlertWriter


def disk_full_writer(bad):
    """An :class:`AlertWriter` whose alert file of ``bad = (visit, ccd)`` hits a full disk
    (``OSError(ENOSPC)`` after part of the bytes went to the temporary file)."""
    base = _alert_writer()

    class DiskFullWriter(base):
        def _write_file(self, path, payload):
            if Path(path).name != f"visit{bad[0]:08d}_ccd{bad[1]:03d}.avro":
                return super()._write_file(path, payload)

            def write(fh):
                fh.write(payload[: len(payload) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            from nightsift.engine.io.atomic import atomic_write

            atomic_write(path, write)

    return DiskFullWriter


def holding_writer(marker_dir, hold_s: float = 60.0):
    """An :class:`AlertWriter` whose first alert file of the night stops half-written (half the
    bytes in the temporary file, not yet renamed, the ledger record not written), writes its pid to
    ``marker_dir/held`` and sleeps ``hold_s``, so that a test can kill the writer mid-write."""
    base = _alert_writer()

    class HoldingWriter(base):
        def _write_file(self, path, payload):
            held = Path(marker_dir, "held")
            if held.exists():
                return super()._write_file(path, payload)

            def write(fh):
                fh.write(payload[: len(payload) // 2])
                fh.flush()
                held.write_text(f"{os.getpid()} {Path(path).name}")
                time.sleep(hold_s)
                Path(marker_dir, "released").touch()
                fh.write(payload[len(payload) // 2:])

            from nightsift.engine.io.atomic import atomic_write

            atomic_write(path, write)

    return HoldingWriter


# -- reading a night's output ------------------------------------------------------------------
def alert_set(out) -> dict:
    """``{candid: alert record}`` of every packet file under ``out``; fails on a duplicated candid."""
    alerts = {}
    for p in sorted(Path(out).glob("visit*_ccd*.avro")):
        for a in read_alerts(p):
            assert a["candid"] not in alerts, f"candid {a['candid']} written twice"
            alerts[a["candid"]] = a
    return alerts


def alerts_by_ccd_visit(out) -> dict:
    """``{(visit, ccd): {candid: alert}}`` of the packet files under ``out`` (one file per CCD-visit)."""
    out_ = {}
    for a in alert_set(out).values():
        out_.setdefault((a["candidate"]["visit"], a["candidate"]["ccd"]), {})[a["candid"]] = a
    return out_


def statuses(out) -> dict:
    return {(r["visit"], r["ccd"]): r["status"] for r in read_ledger(out)}


def strip_scores(a: dict) -> dict:
    a = dict(a, candidate=dict(a["candidate"]))
    for k in SCORE_FIELDS + ("rbversion", "drbversion"):
        a["candidate"].pop(k, None)
    return a


def no_temporaries(out) -> bool:
    """No ``.*.tmp`` left by an interrupted atomic write under ``out``."""
    return not list(Path(out).rglob(".*.tmp"))


class Killer(threading.Thread):
    """Calls ``kill(text of marker)`` from a thread as soon as ``marker`` exists (a worker holding
    inside the work to interrupt wrote it); :meth:`check` joins and re-raises its error."""

    def __init__(self, marker, kill, timeout_s: float = 120.0):
        super().__init__(daemon=True)
        self.marker, self.kill, self.timeout_s = Path(marker), kill, timeout_s
        self.error, self.fired = None, False

    def run(self):
        try:
            if wait_for(self.marker, self.timeout_s):
                self.kill(self.marker.read_text())
                self.fired = True
        except BaseException as e:  # noqa: BLE001 -- re-raised by check()
            self.error = e

    def check(self):
        self.join(timeout=10)
        if self.error is not None:
            raise self.error
        assert self.fired, f"{self.marker} never appeared: nothing was killed"


def wait_for(path, timeout_s: float = 120.0) -> bool:
    """Poll until ``path`` exists (True) or ``timeout_s`` passed (False)."""
    t0 = time.monotonic()
    while not Path(path).exists():
        if time.monotonic() - t0 > timeout_s:
            return False
        time.sleep(0.02)
    return True


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray (2 CPUs, no dashboard, 200 MB object store) for a test module."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
