"""Real/bogus training data: the chain run on simulated CCD pairs, every candidate labelled from the truth.

A *unit* is one simulated CCD-visit (:class:`UnitSpec`): an instrument profile, a CCD, a seeing, a
sky level, a filter and a number of injected transients. :func:`plan_units` draws a representative
set of units from one seed (round-robin over the instrument profiles; seeing, sky, filter and CCD
drawn across their whole range). :func:`simulate_unit` runs the chain on one unit with
:func:`nightsift.engine.pipeline.process_ccd` and keeps each candidate's triplet as the chain's
cutouts stage made it (:mod:`nightsift.engine.stages.cutouts`: science minus its sky, aligned
reference minus its sky, the ZOGY difference times the candidate's sign -- ZTF's convention, in
which a negative candidate's difference stamp is reference minus science): exactly what the
chain's scorer sees and its packets carry. Labels come from the truth:

* **real** (1): the candidate is matched (right sign, within max(2 px, 1 FWHM): an off-centre detection
  of a transient is still an alert about it) to an injected transient -- isolated,
  on a galaxy nucleus or a variable star; its ``kind`` is the transient's kind;
* **bogus** (0): everything else the chain detects; ``kind`` names the likeliest cause from the
  truth within a few pixels, in this order: ``edge`` (within 8 px of the CCD edge), ``saturated``
  (a saturated science pixel or a saturated star), ``cosmic_ray``, ``hot_pixel``, ``bad_column``,
  ``near_transient`` (beside a transient but not matched: a split or wrong-sign residual),
  ``star`` (a subtraction residual of a star: PSF mismatch or misalignment dipole), ``galaxy``
  (a galaxy residual), ``noise`` (none of these: a noise peak).

The dataset (:class:`RBData`) is one ``.npz`` file under a cache directory, named by a hash of the
:class:`DatasetSpec` and :data:`~nightsift.engine.classify.preprocess.NORMALIZATION`, deterministic
from the spec's seed whatever the number of worker processes. Triplets are stored standardised
(float16 ``z`` plus per-channel ``loc, scale``, see :mod:`.preprocess`), a JSON summary (class
balance, domain coverage) beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from .preprocess import NORMALIZATION, compress, standardize

log = logging.getLogger("nightsift.classify")

__all__ = ["DOMAIN_DTYPE", "TRUTH_DTYPE", "FEATURES", "BOGUS_CAUSES", "DatasetSpec", "UnitSpec", "RBData",
           "packet_features", "packet_rows",
           "plan_units", "simulate_unit", "build_dataset", "load_dataset", "summarize", "format_summary"]

#: per-candidate domain tags
DOMAIN_DTYPE = np.dtype([
    ("unit", "i4"),  # index of the simulated CCD-visit in the dataset
    ("instrument", "U8"),  # instrument profile: decam, ztf, lsst
    ("ccd", "i4"),  # CCD number in the focal plane
    ("filter", "U2"),
    ("seeing", "f4"),  # true science FWHM at the CCD centre, arcsec
    ("fwhm_px", "f4"),  # the same in pixels
    ("sky", "f4"),  # science sky rate, e-/s/px
    ("maglim", "f4"),  # ideal 5-sigma limit of the science epoch, mag
    ("split", "U5"),  # train | val | test (by unit: no CCD-visit is in two splits)
])

#: per-candidate truth
TRUTH_DTYPE = np.dtype([
    ("label", "u1"),  # 1 real, 0 bogus
    ("kind", "U14"),  # real: isolated | nuclear | variable; bogus: one of BOGUS_CAUSES
    ("mag", "f4"),  # true magnitude of the matched transient (NaN for bogus)
    ("snr", "f4"),  # its ideal S/N in the science image (NaN for bogus)
])

#: candidate fields kept as features (see nightsift.engine.records.CANDIDATE_DTYPE)
FEATURES = ("xpos", "ypos", "magpsf", "sigmapsf", "snr", "scorr", "fwhm", "elong", "nbad", "isdiffpos",
            "distnr", "magnr", "sky", "edge")

BOGUS_CAUSES = ("edge", "saturated", "cosmic_ray", "hot_pixel", "bad_column", "near_transient", "star", "galaxy",
                "noise")

_SPLITS = ("train", "val", "test")

#: layout of the stored triplets; part of the cache key (2: a negative candidate's difference
#: stamp is reference minus science, ZTF's convention, as the pipeline hands it to a scorer)
DATASET_VERSION = 2

#: a candidate of the right sign within max(MATCH_RADIUS, FWHM) pixels of a transient is real
MATCH_RADIUS = 2.0


@dataclass(frozen=True)
class DatasetSpec:
    """What to simulate (everything that changes the data; it names the cache file).

    Attributes
    ----------
    n_units : int
        Simulated CCD-visits (spread round-robin over ``profiles``).
    profiles : tuple of str
        Instrument profiles (see :data:`nightsift.engine.simulate.PROFILES`).
    size : int
        CCD side in pixels (reduced CCDs: many conditions for little CPU); a profile with fine
        pixels gets more, so that its CCD spans at least ``min_field_arcmin`` (enough PSF stars).
    min_field_arcmin : float
        Smallest CCD side on the sky (the size is rounded up to a multiple of 64 px).
    seed : int
        Master seed: unit parameters and every simulation derive from it.
    transients : (int, int)
        Injected transients per unit, drawn uniformly in ``[lo, hi]``.
    seeing_range : (float, float)
        Science seeing as a factor of the profile's typical seeing (log-uniform).
    sky_range : (float, float)
        Science sky as a factor of the profile's typical sky (log-uniform).
    saturated : int
        Extra saturated stars per unit drawn in ``[0, saturated]``.
    edge : int
        Transients keep this many pixels from the CCD edge (small: real transients near edges too).
    val_fraction, test_fraction : float
        Shares of units (per profile) held out for validation and test.
    star_psf_scatter, proper_motion : float
        Bogus as the sky makes it: per-star PSF width scatter (colour) and proper motion of the
        science epoch (:class:`nightsift.engine.simulate.SimulationOptions`); 0: off.
    bright_variables : float
        The real class that matches them: the share of variable stars put on bright stars
        (:attr:`nightsift.engine.simulate.SimulationOptions.bright_variables`); 0: off.
    """

    n_units: int = 300
    profiles: tuple[str, ...] = ("decam", "ztf", "lsst")
    size: int = 512
    min_field_arcmin: float = 2.4
    seed: int = 6
    transients: tuple[int, int] = (30, 70)
    seeing_range: tuple[float, float] = (0.7, 1.8)
    sky_range: tuple[float, float] = (0.7, 3.0)
    saturated: int = 3
    edge: int = 4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    star_psf_scatter: float = 0.0
    proper_motion: float = 0.0
    bright_variables: float = 0.0

    def __post_init__(self):
        from ..errors import ConfigError
        from ..simulate import PROFILES

        if self.n_units < 1:
            raise ConfigError(f"dataset: n_units must be >= 1, got {self.n_units}")
        bad = [p for p in self.profiles if p not in PROFILES]
        if not self.profiles or bad:
            raise ConfigError(f"dataset: unknown instrument profiles {bad}; known: {sorted(PROFILES)}")
        if self.size < 128:
            raise ConfigError(f"dataset: size must be >= 128 px, got {self.size}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("dataset: val_fraction and test_fraction must be in [0, 1) with a sum < 1")
        if not (1 <= self.transients[0] <= self.transients[1]):
            raise ConfigError(f"dataset: transients must be (lo, hi) with 1 <= lo <= hi, got {self.transients}")
        if not 0 <= self.bright_variables <= 1:
            raise ConfigError(f"dataset: bright_variables must be a share in [0, 1], got {self.bright_variables}")

    def key(self) -> str:
        """Hash naming the cache file (spec + normalisation version)."""
        d = dataclasses.asdict(self)
        # off: the key of the datasets built before them
        for k in ("star_psf_scatter", "proper_motion", "bright_variables"):
            if d[k] == 0:
                del d[k]
        d["normalization"] = NORMALIZATION
        d["version"] = DATASET_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class UnitSpec:
    """One simulated CCD-visit (arguments of :func:`nightsift.engine.simulate.simulate_ccd_pair`)."""

    unit: int
    instrument: str
    seed: int
    ccd: int
    visit: int
    filter: str
    seeing: float  # arcsec
    sky: float  # e-/s/px
    n_transients: int
    n_saturated: int
    size: int
    edge: int
    split: str
    star_psf_scatter: float = 0.0
    proper_motion: float = 0.0
    bright_variables: float = 0.0


def plan_units(spec: DatasetSpec) -> list[UnitSpec]:
    """Draw the units of a dataset, deterministically from ``spec.seed``.

    Units cycle through ``spec.profiles``; within a profile the CCDs are a random permutation of
    the focal plane (all CCDs are covered once there are as many units as CCDs), the seeing and sky
    are log-uniform over ``spec.seeing_range`` / ``spec.sky_range`` times the profile's typical
    values, the filter uniform over the profile's filters. Each profile's units are split into
    train/val/test in the spec's proportions (every profile is in every split).
    """
    from ..simulate import PROFILES

    rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), 60606]))
    per = {p: [] for p in spec.profiles}
    for u in range(spec.n_units):
        per[spec.profiles[u % len(spec.profiles)]].append(u)
    units: dict[int, UnitSpec] = {}
    for p, ids in per.items():
        prof = PROFILES[p]
        size = max(int(spec.size), 64 * math.ceil(spec.min_field_arcmin * 60.0 / prof.pixel_scale / 64.0))
        ccds = np.concatenate([rng.permutation(prof.n_ccds) for _ in range(len(ids) // prof.n_ccds + 1)])
        n = len(ids)
        n_test = int(round(spec.test_fraction * n))
        n_val = int(round(spec.val_fraction * n))
        if n >= 3:  # at least one unit in each held-out split when asked for
            n_test = max(n_test, 1 if spec.test_fraction > 0 else 0)
            n_val = max(n_val, 1 if spec.val_fraction > 0 else 0)
        order = rng.permutation(n)
        split = np.array(["train"] * n, dtype="U5")
        split[order[:n_test]] = "test"
        split[order[n_test:n_test + n_val]] = "val"
        for k, u in enumerate(ids):
            lo, hi = np.log(spec.seeing_range)
            seeing = prof.seeing_fwhm * float(np.exp(rng.uniform(lo, hi)))
            lo, hi = np.log(spec.sky_range)
            sky = prof.sky * float(np.exp(rng.uniform(lo, hi)))
            units[u] = UnitSpec(
                unit=u, instrument=p, seed=int(spec.seed) * 100_000 + u, ccd=int(ccds[k]), visit=u,
                filter=str(rng.choice(prof.filters)), seeing=round(seeing, 4), sky=round(sky, 3),
                n_transients=int(rng.integers(spec.transients[0], spec.transients[1] + 1)),
                n_saturated=int(rng.integers(0, spec.saturated + 1)), size=size, edge=int(spec.edge),
                split=str(split[k]), star_psf_scatter=float(spec.star_psf_scatter),
                proper_motion=float(spec.proper_motion), bright_variables=float(spec.bright_variables))
    return [units[u] for u in range(spec.n_units)]


def _near(px, py, qx, qy, r: float) -> np.ndarray:
    """For each point p, is any point q within ``r`` pixels?"""
    out = np.zeros(len(px), bool)
    if len(px) == 0 or len(qx) == 0:
        return out
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.c_[qx, qy]).query(np.c_[px, py], distance_upper_bound=r)
    return np.isfinite(d)


def bogus_causes(cands: np.ndarray, sim, *, fwhm: float) -> np.ndarray:
    """Likeliest cause of each candidate as a bogus, from the simulation's truth.

    Parameters
    ----------
    cands : CANDIDATE_DTYPE array
    sim : SimulatedCCD
    fwhm : float
        Science PSF FWHM (pixels): sets the radius for stars and galaxies (1.5 FWHM, >= 3 px).

    Returns
    -------
    ndarray (n,) of str, one of :data:`BOGUS_CAUSES` (first that applies, in that order).
    """
    x, y = cands["xpos"], cands["ypos"]
    ny, nx = sim.shape
    art = sim.artifacts
    r_src = max(1.5 * fwhm, 3.0)
    tests = {}
    tests["edge"] = (x < 8) | (y < 8) | (x > nx - 9) | (y > ny - 9)
    sy, sx = np.nonzero(art["saturated"])
    st = sim.stars
    sat_star = st["saturated_sci"] | st["saturated_ref"]
    tests["saturated"] = (_near(x, y, sx, sy, 5.0)
                          | _near(x, y, st["x"][sat_star], st["y"][sat_star], max(4 * fwhm, 8.0)))
    cr = art["cosmic_rays"]
    tests["cosmic_ray"] = _near(x, y, cr["x"], cr["y"], 3.0)
    hot = art["hot_pixels"]
    tests["hot_pixel"] = _near(x, y, hot["x"], hot["y"], 3.0)
    bc = art["bad_columns"]
    on_col = np.zeros(len(x), bool)
    for b in bc:
        on_col |= (np.abs(x - b["x"]) <= 2.5) & (y >= b["y0"] - 2) & (y < b["y1"] + 2)
    tests["bad_column"] = on_col
    tr = sim.transients
    tests["near_transient"] = _near(x, y, tr["x"], tr["y"], 6.0)
    insci = st["in_sci"]
    tests["star"] = _near(x, y, st["x"][insci], st["y"][insci], r_src)
    ga = sim.galaxies
    tests["galaxy"] = _near(x, y, ga["x"][ga["in_sci"]], ga["y"][ga["in_sci"]], r_src + 2.0)
    out = np.full(len(x), "noise", dtype="U14")
    done = np.zeros(len(x), bool)
    for name in BOGUS_CAUSES[:-1]:
        hit = tests[name] & ~done
        out[hit] = name
        done |= hit
    return out


def simulate_unit(unit: UnitSpec, config=None) -> dict:
    """Simulate one unit, run the chain, cut and label every candidate's triplet.

    Parameters
    ----------
    unit : UnitSpec
    config : Config, optional
        Chain configuration (default :class:`nightsift.engine.config.Config()`).

    Returns
    -------
    dict with ``z`` (n, 63, 63, 3) float16, ``loc``/``scale`` (n, 3) float32 (see
    :func:`.preprocess.standardize`), ``features`` (n,) structured, ``truth`` TRUTH_DTYPE,
    ``domain`` DOMAIN_DTYPE, ``status`` ("done" | "skipped" | "failed"), ``error`` str,
    ``n_truth``/``n_found`` (injected / recovered transients), ``qa`` (a few chain QA numbers, with
    ``true_F_r``, what ZOGY's ``F_r`` should be) and ``wall_s``.
    A chain failure gives an empty unit with the status and error every night engine records
    (:func:`nightsift.engine.orchestration.task.record_outcome`: SkipCCD, AlgorithmFailure, or
    any other exception -- a bug -- with where it happened): a dataset build never stops for one CCD.
    """
    from ..config import Config
    from ..orchestration.task import run_and_record
    from ..truth import match_candidates

    cfg = config if config is not None else Config()
    t0 = time.perf_counter()
    out = _empty_unit(cfg.cutout.size)
    ran, failure = run_and_record(lambda: _run_chain(unit, cfg))
    if failure is not None:
        out.update(status=failure["status"], error=failure["error"], wall_s=time.perf_counter() - t0)
        return out
    sim, res = ran
    c = res.candidates
    fwhm = float(sim.science_raw.header.get("FWHM", sim.meta["seeing_sci"] / sim.profile.pixel_scale))
    m = match_candidates(c, sim.transients, radius=max(MATCH_RADIUS, fwhm))
    out["n_truth"], out["n_found"] = len(sim.transients), int(m.found.sum())
    out["status"] = "done"
    st = sim.stars[sim.stars["in_sci"] & ~sim.stars["variable"] & (sim.stars["flux_sci"] > 0)]
    out["qa"] = {k: float(res.qa[k]) for k in _QA_KEYS if k in res.qa}
    if len(st):  # what ZOGY's F_r should be: reference/science flux of the static stars
        out["qa"]["true_F_r"] = float(np.median(st["flux_ref"] / st["flux_sci"]))
    if len(c):
        out.update(_labelled(unit, sim, res, m, fwhm=fwhm))
    out["wall_s"] = time.perf_counter() - t0
    return out


def _run_chain(unit: UnitSpec, cfg):
    """``(simulated pair, CCDResult)`` of one unit: simulated, calibrated with its own master, run
    through the chain (no alert file)."""
    from ..pipeline import process_ccd
    from ..simulate import simulate_ccd_pair
    from ..stages.calibrate import make_master

    sim = simulate_ccd_pair(unit.instrument, shape=(unit.size, unit.size), seed=unit.seed, visit=unit.visit,
                            ccd=unit.ccd, n_transients=unit.n_transients, artifacts=True, seeing=unit.seeing,
                            sky=unit.sky, filter=unit.filter, n_saturated=unit.n_saturated, edge=unit.edge,
                            star_psf_scatter=unit.star_psf_scatter, proper_motion=unit.proper_motion,
                            bright_variables=unit.bright_variables)
    master = make_master(sim.calibration, header=sim.science_raw.header, config=cfg.calibrate)
    res = process_ccd(sim.science_raw, master, sim.reference, config=cfg, visit=unit.visit, ccd=unit.ccd,
                      write=False)
    return sim, res


def _labelled(unit: UnitSpec, sim, res, m, *, fwhm: float) -> dict:
    """The candidates of one unit as dataset rows: the chain's own triplets (exactly what its scorer
    saw and its packets carry -- the cutouts stage is their one owner: no train/serve skew),
    features, truth labels (``m``: their match to the injected transients) and domain tags."""
    c = res.candidates
    z, loc, scale = standardize(res.triplets)
    real = m.truth_index >= 0
    truth = np.zeros(len(c), TRUTH_DTYPE)
    truth["label"] = real
    truth["kind"] = bogus_causes(c, sim, fwhm=fwhm)
    ti = m.truth_index[real]
    truth["kind"][real] = sim.transients["kind"][ti]
    truth["mag"] = np.nan
    truth["snr"] = np.nan
    truth["mag"][real] = sim.transients["mag"][ti]
    truth["snr"][real] = sim.transients["snr"][ti]
    dom = np.zeros(len(c), DOMAIN_DTYPE)
    dom["unit"], dom["instrument"], dom["ccd"], dom["filter"] = unit.unit, unit.instrument, unit.ccd, unit.filter
    dom["seeing"] = sim.meta["seeing_sci"]
    dom["fwhm_px"] = fwhm
    dom["sky"] = unit.sky
    dom["maglim"] = sim.meta["maglim_sci"]
    dom["split"] = unit.split
    feats = np.zeros(len(c), _features_dtype())
    for k in FEATURES:
        feats[k] = c[k]
    return dict(z=z.astype(np.float16), loc=loc, scale=scale, features=feats, truth=truth, domain=dom)


#: chain QA numbers kept per unit in the dataset's metadata (to trace odd units to the chain)
_QA_KEYS = ("F_r", "F_r_err", "n_flux_stars", "sci_psf_fwhm", "ref_psf_fwhm", "scorr_std_raw", "n_candidates")


def _features_dtype() -> np.dtype:
    from ..records import CANDIDATE_DTYPE

    return np.dtype([(k, CANDIDATE_DTYPE[k]) for k in FEATURES])


def _empty_unit(size: int) -> dict:
    return dict(z=np.zeros((0, size, size, 3), np.float16), loc=np.zeros((0, 3), np.float32),
                scale=np.ones((0, 3), np.float32), features=np.zeros(0, _features_dtype()),
                truth=np.zeros(0, TRUTH_DTYPE), domain=np.zeros(0, DOMAIN_DTYPE), status="", error="",
                n_truth=0, n_found=0, wall_s=0.0, qa={})


def _unit_task(args):
    unit, cfg_dict = args
    from ..config import from_dict

    return simulate_unit(unit, from_dict(cfg_dict) if cfg_dict is not None else None)


@dataclass(frozen=True)
class RBData:
    """A labelled triplet dataset (see the module docstring).

    Attributes
    ----------
    z : ndarray (n, 63, 63, 3) float16
        Standardised triplets (:func:`.preprocess.standardize`); ``x = loc + scale * z``.
    loc, scale : ndarray (n, 3) float32
    features : structured ndarray (n,), the candidate fields of :data:`FEATURES`
    truth : TRUTH_DTYPE (n,)
    domain : DOMAIN_DTYPE (n,)
    meta : dict
        The spec, normalisation, per-unit status and the summary (:func:`summarize`).
    """

    z: np.ndarray
    loc: np.ndarray
    scale: np.ndarray
    features: np.ndarray
    truth: np.ndarray
    domain: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.truth)

    @property
    def labels(self) -> np.ndarray:
        """(n,) float32, 1 real 0 bogus."""
        return self.truth["label"].astype(np.float32)

    def inputs(self, index=slice(None)) -> np.ndarray:
        """Network input of the selected rows: (k, 63, 63, 3) float32 (:func:`.preprocess.compress`)."""
        return compress(self.z[index])

    def select(self, mask) -> "RBData":
        """A subset (boolean mask or index array) with the same meta."""
        return RBData(self.z[mask], self.loc[mask], self.scale[mask], self.features[mask], self.truth[mask],
                      self.domain[mask], self.meta)

    def split(self, name: str) -> "RBData":
        """The ``train``, ``val`` or ``test`` rows."""
        if name not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")
        return self.select(self.domain["split"] == name)

    def append(self, other: "RBData", meta: dict | None = None) -> "RBData":
        """These rows, then ``other``'s; ``meta`` (default this one's)."""
        return RBData(*(np.concatenate([getattr(self, k), getattr(other, k)]) for k in
                        ("z", "loc", "scale", "features", "truth", "domain")), self.meta if meta is None else meta)


def packet_features(cands: list[dict]) -> np.ndarray:
    """The :data:`FEATURES` of alert packets' candidate records (ZTF's names; 1-based positions made
    0-based; ZTF's ``-999`` for a missing nearest source; NaN, or 0 for ``nbad``, where absent)."""
    f = np.zeros(len(cands), _features_dtype())
    for i, c in enumerate(cands):
        for k in FEATURES:
            v = c.get(k)
            if k in ("xpos", "ypos"):
                v = np.nan if v is None else float(v) - 1.0  # packets are 1-based (ZTF), tables 0-based
            elif k == "isdiffpos":
                v = v in ("t", "1", True, 1)
            elif k in ("distnr", "magnr"):
                v = -999.0 if v is None else v
            elif k == "edge":
                v = bool(v)
            elif v is None:
                v = 0 if k == "nbad" else np.nan
            f[k][i] = v
    return f


def packet_rows(triplets: np.ndarray, labels, cands: list[dict], *, kinds: tuple[str, str], instrument: str,
                meta: dict, filters=None) -> RBData:
    """Training rows of real alert packets with given labels (expert or teacher).

    Parameters
    ----------
    triplets : ndarray (n, 63, 63, 3)
        As the scorer sees them (science, reference, difference).
    labels : array_like (n,)
        1 real, 0 bogus.
    cands : list of dict (n,)
        The packets' candidate records (:func:`packet_features`; ``ccd`` or ZTF's ``rcid``).
    kinds : (str, str)
        ``truth.kind`` of the real and the bogus rows.
    instrument : str
        ``domain.instrument`` of every row.
    meta : dict
        The rows' meta; it lists the candids of the packets (the real-data rule).
    filters : sequence of str, optional
        ``domain.filter`` per row.

    Returns
    -------
    RBData: standardised as :func:`.preprocess.standardize` does, ``domain.split`` ``"train"``,
    ``unit`` -1, the simulation-only truth and domain fields NaN.
    """
    labels = np.asarray(labels, np.uint8)
    z, loc, scale = standardize(np.asarray(triplets, np.float32))
    truth = np.zeros(len(labels), TRUTH_DTYPE)
    truth["label"] = labels
    truth["kind"] = np.where(labels == 1, kinds[0], kinds[1])
    truth["mag"] = truth["snr"] = np.nan
    dom = np.zeros(len(labels), DOMAIN_DTYPE)
    dom["unit"] = -1
    dom["instrument"] = instrument
    dom["ccd"] = [int(c.get("ccd") or c.get("rcid") or 0) for c in cands]
    if filters is not None:
        dom["filter"] = filters
    dom["seeing"] = dom["fwhm_px"] = dom["sky"] = dom["maglim"] = np.nan
    dom["split"] = "train"
    return RBData(z.astype(np.float16), loc, scale, packet_features(cands), truth, dom, meta)


def _concat(parts: list[dict], size: int) -> dict:
    parts = [p for p in parts if len(p["truth"])] or [_empty_unit(size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("z", "loc", "scale", "features", "truth", "domain")}


def summarize(truth: np.ndarray, domain: np.ndarray) -> dict:
    """Class balance and domain coverage of a dataset (JSON-able).

    Counts of real and bogus overall, per split, per instrument, per kind/cause; and coverage:
    CCDs per instrument, filters, seeing (arcsec and pixels) and sky ranges, seeing bins.
    """
    lab = truth["label"].astype(bool)

    def bal(sel):
        return {"n": int(sel.sum()), "real": int((sel & lab).sum()), "bogus": int((sel & ~lab).sum())}

    s = {"total": bal(np.ones(len(lab), bool)),
         "per_split": {k: bal(domain["split"] == k) for k in _SPLITS},
         "per_instrument": {}, "kinds": {}, "coverage": {}}
    for k in np.unique(truth["kind"]):
        s["kinds"][str(k)] = int((truth["kind"] == k).sum())
    for inst in np.unique(domain["instrument"]):
        sel = domain["instrument"] == inst
        d = domain[sel]
        s["per_instrument"][str(inst)] = bal(sel)
        s["coverage"][str(inst)] = {
            "units": int(len(np.unique(d["unit"]))), "ccds": int(len(np.unique(d["ccd"]))),
            "filters": {str(f): int((d["filter"] == f).sum()) for f in np.unique(d["filter"])},
            "seeing_arcsec": [round(float(d["seeing"].min()), 3), round(float(d["seeing"].max()), 3)],
            "fwhm_px": [round(float(d["fwhm_px"].min()), 2), round(float(d["fwhm_px"].max()), 2)],
            "sky_e_per_s": [round(float(d["sky"].min()), 2), round(float(d["sky"].max()), 2)],
            "maglim": [round(float(d["maglim"].min()), 2), round(float(d["maglim"].max()), 2)],
        }
    edges = [0, 2, 3, 4, 6, 100]
    b = np.digitize(domain["fwhm_px"], edges) - 1
    s["coverage"]["fwhm_px_bins"] = {f"{edges[i]}-{edges[i + 1]}": bal(b == i) for i in range(len(edges) - 1)}
    return s


def build_dataset(data_dir="nightsift-data", spec: DatasetSpec | None = None, *, config=None, workers: int = 1,
                  progress: bool = True, rebuild: bool = False) -> Path:
    """Simulate, run the chain, label and store a dataset; return its ``.npz`` path (cached).

    Parameters
    ----------
    data_dir : path
        Cache directory (created). The file is ``rb-<key>.npz`` with ``rb-<key>.json`` beside it
        (the spec and :func:`summarize`), ``<key>`` = :meth:`DatasetSpec.key`.
    spec : DatasetSpec, optional
    config : Config, optional
        Chain configuration (default ``Config()``; a different chain config is *not* part of the
        cache key: pass ``rebuild=True`` after changing it).
    workers : int
        Processes simulating units in parallel (the result does not depend on it). They are spawned,
        so a script that calls this with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
    progress : bool
        Show a progress bar.
    rebuild : bool
        Rebuild even if the cached file exists.
    """
    from tqdm import tqdm

    from ..config import to_dict

    spec = spec or DatasetSpec()
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rb-{spec.key()}.npz"
    if path.exists() and not rebuild:
        log.info("dataset %s cached", path)
        return path
    units = plan_units(spec)
    cfg_dict = to_dict(config) if config is not None else None
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=len(units), unit="ccd", desc="dataset", disable=not progress)
    n = 0
    tasks = [(u, cfg_dict) for u in units]
    if workers <= 1:
        it = map(_unit_task, tasks)
        pool = None
    else:
        # spawn, not fork: a parent that has already run a parallel Numba loop (``train --teacher-packets``
        # standardises the real triplets first) holds GNU OpenMP threads, and a forked child then dies
        # with "fork() called from a process already using GNU OpenMP" (the local engine spawns too)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        it = pool.map(_unit_task, tasks)
    try:
        for r in it:
            results.append(r)
            n += len(r["truth"])
            bar.set_postfix(cands=n, failed=sum(x["status"] != "done" for x in results))
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    arrays = _concat(results, 63 if config is None else config.cutout.size)
    status = [{"unit": u.unit, "instrument": u.instrument, "status": r["status"], "error": r["error"],
               "n_candidates": len(r["truth"]), "n_truth": r["n_truth"], "n_found": r["n_found"],
               "wall_s": round(r["wall_s"], 2), "qa": r["qa"], "spec": dataclasses.asdict(u)}
              for u, r in zip(units, results)]
    for s in status:
        if s["status"] != "done":
            log.warning("dataset unit %d (%s) %s: %s", s["unit"], s["instrument"], s["status"], s["error"])
    meta = {"spec": dataclasses.asdict(spec), "key": spec.key(), "normalization": NORMALIZATION,
            "version": DATASET_VERSION,
            "build_wall_s": round(time.perf_counter() - t0, 1), "units": status,
            "summary": summarize(arrays["truth"], arrays["domain"])}
    atomic_write(path, lambda fh: np.savez(fh, **arrays, meta=np.array(json.dumps(meta))))
    path.with_suffix(".json").write_text(json.dumps({k: v for k, v in meta.items() if k != "units"}, indent=1))
    return path


def load_dataset(path) -> RBData:
    """Read a dataset written by :func:`build_dataset`.

    Raises
    ------
    FileNotFoundError, ValueError
        If the file is missing, lacks an array, or was made with another normalisation.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: dataset not found (build it with `nightsift train` or build_dataset)")
    with np.load(p, allow_pickle=False) as f:
        missing = [k for k in ("z", "loc", "scale", "features", "truth", "domain", "meta") if k not in f]
        if missing:
            raise ValueError(f"{p}: not a nightsift real/bogus dataset (missing {missing})")
        meta = json.loads(str(f["meta"]))
        if meta.get("normalization") != NORMALIZATION:
            raise ValueError(f"{p}: made with normalisation {meta.get('normalization')!r}, this nightsift uses "
                             f"{NORMALIZATION!r}; rebuild it (nightsift train --rebuild)")
        return RBData(f["z"], f["loc"], f["scale"], f["features"], f["truth"], f["domain"], meta)


def format_summary(s: dict) -> str:
    """Human-readable summary lines."""
    t = s["total"]
    lines = [f"{t['n']} candidates: {t['real']} real, {t['bogus']} bogus ({t['real'] / max(t['n'], 1):.1%} real)"]
    for k, v in s["per_split"].items():
        lines.append(f"  {k:5s}: {v['n']:6d} ({v['real']} real)")
    for k, v in s["per_instrument"].items():
        c = s["coverage"][k]
        lines.append(f"  {k:5s}: {v['n']:6d} ({v['real']} real) from {c['units']} CCD-visits, {c['ccds']} CCDs, "
                     f"filters {sorted(c['filters'])}, seeing {c['seeing_arcsec'][0]}-{c['seeing_arcsec'][1]}\" "
                     f"({c['fwhm_px'][0]}-{c['fwhm_px'][1]} px), sky {c['sky_e_per_s'][0]}-{c['sky_e_per_s'][1]} e-/s/px")
    lines.append("  kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)
