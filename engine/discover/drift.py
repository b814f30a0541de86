"""Drift monitoring: per CCD and per night, compare the distribution of scores and features with a
reference and flag the CCDs that moved.

What is kept, per CCD of a night (:class:`CCDSample`):

* per candidate (pooled over the night's visits): the real/bogus score ``rb`` when the packets carry
  one, and the features ``fwhm_rel``, ``elong``, ``log10 snr``, ``log10 |scorr|``, ``nbad``
  (:data:`CANDIDATE_FEATURES`). ``fwhm_rel`` is the candidate's FWHM over the image PSF's
  (``sci_psf_fwhm`` of the ledger record, else the median candidate FWHM of that CCD-visit), so the
  seeing of the night does not count as drift while sharp artifacts (ratio << 1) and extended
  residuals (>> 1) do. Sentinels (``fwhm <= 0``, ``elong < 1``) are kept as missing values, and the
  missing fraction is part of the distribution;
* per CCD-visit: the number of candidates, and from the ledger records when present the noise
  ratio ``sky_noise / sky_noise_expected`` and ``scorr_std_raw`` (:data:`VISIT_QUANTITIES`).

The reference of a CCD is either its own history (the samples of earlier nights, kept as
``drift_samples.npz`` beside each night's alerts and merged with :func:`merge_samples`), or, with
no history, the **focal plane**: the other CCDs of the same night pooled (leave one out). The
second needs nothing stored, and a single broken CCD barely moves the pool of the others.

Statistics (:func:`compare`):

* per-candidate distributions: the population stability index (:func:`psi`, on the reference's
  quantile bins plus a bin for missing values) and the two-sample Kolmogorov-Smirnov test on the
  finite values. Candidates of one CCD-visit are not independent draws: the seeing, the sky and a
  few bright stars shape each visit's bogus population, so healthy visits differ from one another
  far more than sampling noise says, and PSI and KS alone would flag healthy CCDs. The threshold
  therefore adapts to the natural variability of each reference: the same PSI is computed for
  every *group* of the reference against the rest of it (the visits of a history; in focal-plane
  mode, the other CCDs), and a feature is flagged when its PSI is at least
  ``max(drift_psi_threshold, drift_null_factor x the 90th percentile of those)`` (the largest one
  for up to ten groups) **and** the KS (or missing-fraction) p-value is below
  ``drift_ks_alpha / number of tests`` (Bonferroni). With fewer than two such groups only
  ``drift_psi_threshold`` (0.25, the conventional "major shift") and the KS test apply.
* per-visit quantities: a robust z-score of the night's median against the reference values,
  ``z = (median(night) - median(ref)) / s`` with ``s = max(1.4826 MAD(ref), drift_rel_floor |median(ref)|)``
  (and ``>= sqrt(median(ref))`` for counts, the Poisson scatter); flagged when
  ``|z| >= drift_z_threshold``.

The thresholds are the ``drift_*`` fields of the ``[discover]`` config section
(:class:`~nightsift.engine.config.DiscoverConfig`), passed to :func:`compare` as ``settings``.

A CCD is flagged when any of its statistics is. :func:`plot_drift` draws the PSI map (CCDs x
statistics) and, for each flagged CCD, its most shifted distribution against the reference.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from nightsift.kernels.background import mad_sigma

from ..config import DiscoverConfig
from ..errors import InputError
from ..io.atomic import atomic_write
from ..plotting import save_figure

__all__ = [
    "CANDIDATE_FEATURES", "VISIT_QUANTITIES", "CCDSample", "StatResult", "CCDDrift",
    "DriftReport", "psi", "robust_z", "reference_for", "ks_2samp", "candidate_values", "samples_from_alerts", "collect_night",
    "save_samples", "load_samples", "merge_samples", "compare", "plot_drift",
]

#: per-candidate quantities monitored (name -> how it is computed from the candidate record)
CANDIDATE_FEATURES = ("rb", "fwhm_rel", "elong", "log_snr", "log_scorr", "nbad")
#: per-CCD-visit quantities monitored
VISIT_QUANTITIES = ("n_candidates", "noise_ratio", "scorr_std_raw")

_FILE_RE = re.compile(r"visit(\d+)_ccd(\d+)\.avro$")


@dataclass
class CCDSample:
    """What is kept of one CCD for one night (or a merged history).

    Attributes
    ----------
    ccd : int
    features : dict of str -> ndarray (n,) float64
        One value per candidate for each of :data:`CANDIDATE_FEATURES` present (NaN = missing).
    group : ndarray (n,) int64
        The visit each candidate comes from (the groups of the empirical null).
    visits : dict of str -> ndarray (k,) float64
        One value per CCD-visit for each of :data:`VISIT_QUANTITIES` present.
    visit_ids : ndarray (k,) int64
        The visit of each entry of ``visits``.
    """

    ccd: int
    features: dict = field(default_factory=dict)
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    visits: dict = field(default_factory=dict)
    visit_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_candidates(self) -> int:
        return len(self.group)

    def add(self, features: Mapping[str, np.ndarray], group, visits: Mapping[str, float | np.ndarray], visit_ids) -> None:
        """Append candidates (``features``, each of one length, from ``group``) and per-visit values;
        columns missing on either side are filled with NaN."""
        n_old = self.n_candidates
        n_new = len(np.atleast_1d(group))
        for k in set(self.features) | set(features):
            self.features[k] = np.concatenate([self.features.get(k, np.full(n_old, np.nan)),
                                               np.asarray(features.get(k, np.full(n_new, np.nan)), np.float64)])
        self.group = np.concatenate([self.group, np.asarray(np.atleast_1d(group), np.int64)])
        k_old = len(self.visit_ids)
        vid = np.asarray(np.atleast_1d(visit_ids), np.int64)
        for k in set(self.visits) | set(visits):
            new = np.atleast_1d(np.asarray(visits.get(k, np.full(len(vid), np.nan)), np.float64))
            self.visits[k] = np.concatenate([self.visits.get(k, np.full(k_old, np.nan)), new])
        self.visit_ids = np.concatenate([self.visit_ids, vid])


# ----------------------------------------------------------------------------- statistics

def psi(reference, sample, *, bins: int = 10, eps: float = 0.5) -> float:
    """Population stability index of ``sample`` against ``reference``.

    ``PSI = sum_i (q_i - p_i) ln(q_i / p_i)`` over the bins, with ``p``/``q`` the reference/sample
    fractions. The bins are the reference's quantiles (``bins`` of them, merged where the
    reference has ties, as for integer counts) plus one bin for non-finite values, so a change of
    the missing fraction counts too. ``eps`` counts are added to every bin of both (an empty bin
    would make the index infinite).

    Parameters
    ----------
    reference, sample : array_like (n,), (m,) float
        NaN/inf are missing values.
    bins : int
    eps : float
        Pseudo-count per bin.

    Returns
    -------
    float
        >= 0; 0 for identical binned distributions. Under the null (same distribution) its
        expectation is about ``(K - 1) (1/n + 1/m)`` for K bins, which is why small samples need
        the KS test beside it.
    """
    r = np.asarray(reference, dtype=np.float64).ravel()
    s = np.asarray(sample, dtype=np.float64).ravel()
    if r.size == 0 or s.size == 0:
        raise ValueError("psi: reference and sample must not be empty")
    cr, cs = _binned_counts(r, s, bins)
    p = (cr + eps) / (cr.sum() + eps * len(cr))
    q = (cs + eps) / (cs.sum() + eps * len(cs))
    used = (p > 0) | (q > 0)  # a bin empty on both sides (possible with eps = 0) adds nothing
    p, q = p[used], q[used]
    if np.any((p == 0) | (q == 0)):
        return float("inf")
    return float(np.sum((q - p) * np.log(q / p)))


def _binned_counts(r: np.ndarray, s: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    rf = r[np.isfinite(r)]
    if rf.size:
        edges = np.unique(np.quantile(rf, np.linspace(0, 1, bins + 1)[1:-1]))
    else:
        edges = np.zeros(0)
    # right-closed inner edges: a value equal to an edge (ties, integer features) goes left
    def counts(x):
        fin = np.isfinite(x)
        c = np.bincount(np.searchsorted(edges, x[fin], side="left"), minlength=len(edges) + 1)
        return np.append(c, (~fin).sum()).astype(np.float64)

    return counts(r), counts(s)


def ks_2samp(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value on the finite values.

    Returns ``(D, p)``; ``(0, 1)`` when either side has no finite value. ``p`` is scipy's
    (exact for small samples, asymptotic otherwise).
    """
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return 0.0, 1.0
    res = stats.ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def robust_z(values, reference, *, rel_floor: float = 0.05, poisson: bool = False) -> tuple[float, float, float]:
    """Robust z-score of the median of ``values`` against ``reference``.

    Returns ``(z, median(values), median(reference))``; ``z`` is NaN when either is empty.
    The scale is ``max(1.4826 MAD(ref), rel_floor |median(ref)|, sqrt(median(ref)) if poisson)``
    (and at least 1e-12).
    """
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    v, r = v[np.isfinite(v)], r[np.isfinite(r)]
    if v.size == 0 or r.size == 0:
        return float("nan"), float("nan"), float("nan")
    mv, mr = float(np.median(v)), float(np.median(r))
    s = max(float(mad_sigma(r)), rel_floor * abs(mr), 1e-12)
    if poisson:
        s = max(s, math.sqrt(max(mr, 1.0)))
    return (mv - mr) / s, mv, mr


# ----------------------------------------------------------------------------- collecting samples

def _num(c: Mapping, key: str) -> float:
    v = c.get(key)
    return float("nan") if v is None else float(v)


def candidate_values(candidates: Iterable[Mapping], *, psf_fwhm: float | None = None) -> dict[str, np.ndarray]:
    """The monitored per-candidate values of the alert ``candidate`` records of one CCD-visit.

    Parameters
    ----------
    candidates : iterable of dict
        ``alert["candidate"]`` records (nightsift packets: ``rb``, ``fwhm``, ``elong``, ``snr``,
        ``scorr``, ``nbad``; missing or null fields are NaN).
    psf_fwhm : float, optional, keyword-only
        FWHM of the image PSF (pixels) that ``fwhm_rel`` divides by; default the median FWHM of
        the candidates.

    Returns
    -------
    dict of str -> ndarray (n,) float64
        :data:`CANDIDATE_FEATURES`; ``rb`` only when at least one candidate has a score.
    """
    cands = list(candidates)
    out = {}
    rb = np.array([_num(c, "rb") for c in cands])
    if np.isfinite(rb).any():
        out["rb"] = rb
    fwhm = np.array([_num(c, "fwhm") for c in cands])
    fwhm = np.where(fwhm > 0, fwhm, np.nan)
    if psf_fwhm is None or not np.isfinite(psf_fwhm) or psf_fwhm <= 0:
        psf_fwhm = float(np.nanmedian(fwhm)) if np.isfinite(fwhm).any() else 1.0
    out["fwhm_rel"] = fwhm / psf_fwhm
    elong = np.array([_num(c, "elong") for c in cands])
    out["elong"] = np.where(elong >= 1, elong, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["log_snr"] = np.log10(np.array([_num(c, "snr") for c in cands]))
        out["log_scorr"] = np.log10(np.abs(np.array([_num(c, "scorr") for c in cands])))
    out["nbad"] = np.array([_num(c, "nbad") for c in cands])
    for k, v in out.items():
        v[~np.isfinite(v)] = np.nan
    return out


def samples_from_alerts(per_visit: Mapping[tuple[int, int], list], qa: Mapping[tuple[int, int], Mapping] | None = None
                        ) -> dict[int, CCDSample]:
    """Pool per-CCD-visit alerts (and QA) into one :class:`CCDSample` per CCD.

    Parameters
    ----------
    per_visit : mapping (visit, ccd) -> list of alert dicts (or of ``candidate`` dicts)
        Every CCD-visit that was processed, an empty list when it had no candidate.
    qa : mapping (visit, ccd) -> dict, optional
        Ledger QA numbers (``sky_noise``, ``sky_noise_expected``, ``scorr_std_raw``,
        ``sci_psf_fwhm``).
    """
    qa = qa or {}
    out: dict[int, CCDSample] = {}
    for (visit, ccd), alerts in sorted(per_visit.items()):
        cands = [a["candidate"] if "candidate" in a else a for a in alerts]
        q = qa.get((visit, ccd), {}) or {}
        vals = candidate_values(cands, psf_fwhm=q.get("sci_psf_fwhm"))
        visit_vals = {"n_candidates": float(len(cands))}
        if q.get("sky_noise") and q.get("sky_noise_expected"):
            visit_vals["noise_ratio"] = float(q["sky_noise"]) / float(q["sky_noise_expected"])
        if q.get("scorr_std_raw") is not None:
            visit_vals["scorr_std_raw"] = float(q["scorr_std_raw"])
        out.setdefault(int(ccd), CCDSample(int(ccd))).add(vals, np.full(len(cands), visit), visit_vals, [visit])
    return out


def collect_night(alert_dir) -> dict[int, CCDSample]:
    """Read a night's alert files (``visit*_ccd*.avro``) and ledger records into per-CCD samples.

    Parameters
    ----------
    alert_dir : path
        The output folder of a night (``package.output_dir``): alert files and, when present,
        ``records/`` (:mod:`nightsift.engine.orchestration.ledger`). CCD-visits whose record is
        not ``done`` are left out.

    Raises
    ------
    InputError
        The folder does not exist or holds no alert file.
    """
    from ..io.avro import read_alerts
    from ..orchestration.ledger import read_ledger

    d = Path(alert_dir)
    if not d.is_dir():
        raise InputError("not a folder of nightsift alert files", path=str(d))
    files = sorted(p for p in d.glob("visit*_ccd*.avro") if _FILE_RE.search(p.name))
    records = {(r["visit"], r["ccd"]): r for r in read_ledger(d)} if (d / "records").is_dir() else {}
    if not files:
        raise InputError("no alert files (visit*_ccd*.avro) here; run a night first (nightsift run --out DIR)",
                         path=str(d))
    per_visit, qa = {}, {}
    for p in files:
        m = _FILE_RE.search(p.name)
        key = (int(m.group(1)), int(m.group(2)))
        rec = records.get(key)
        if rec is not None and rec.get("status") != "done":
            continue
        per_visit[key] = read_alerts(p)
        if rec is not None:
            qa[key] = rec.get("qa") or {}
    return samples_from_alerts(per_visit, qa)


def save_samples(path, samples: Mapping[int, CCDSample], *, meta: Mapping | None = None) -> Path:
    """Keep a night's per-CCD distributions as one ``.npz`` (no pickle): arrays named
    ``ccd{ccd:03d}/f/{feature}``, ``ccd{ccd:03d}/v/{quantity}``, ``ccd{ccd:03d}/g/group`` and
    ``ccd{ccd:03d}/g/visit_ids``, plus ``meta`` (JSON)."""
    arrays = {}
    for ccd, s in samples.items():
        for k, v in s.features.items():
            arrays[f"ccd{int(ccd):03d}/f/{k}"] = np.asarray(v, np.float64)
        for k, v in s.visits.items():
            arrays[f"ccd{int(ccd):03d}/v/{k}"] = np.asarray(v, np.float64)
        arrays[f"ccd{int(ccd):03d}/g/group"] = np.asarray(s.group, np.int64)
        arrays[f"ccd{int(ccd):03d}/g/visit_ids"] = np.asarray(s.visit_ids, np.int64)
    arrays["meta"] = np.array(json.dumps(dict(meta or {})))
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def load_samples(path) -> dict[int, CCDSample]:
    """Read :func:`save_samples` output. Raises InputError naming the file if it is not one."""
    path = Path(path)
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError("drift samples file not found", path=str(path)) from None
    except (OSError, ValueError) as e:
        raise InputError(f"not a drift samples .npz ({e})", path=str(path)) from None
    out: dict[int, CCDSample] = {}
    with f:
        for name in f.files:
            m = re.fullmatch(r"ccd(\d+)/([fvg])/(\w+)", name)
            if m is None:
                continue
            s = out.setdefault(int(m.group(1)), CCDSample(int(m.group(1))))
            if m.group(2) == "g":
                setattr(s, m.group(3), f[name].astype(np.int64))
            else:
                (s.features if m.group(2) == "f" else s.visits)[m.group(3)] = f[name]
    if not out:
        raise InputError("no per-CCD samples in this file (written by nightsift drift?)", path=str(path))
    return out


def merge_samples(nights: Iterable[Mapping[int, CCDSample]]) -> dict[int, CCDSample]:
    """Pool several nights' samples per CCD (a history reference)."""
    out: dict[int, CCDSample] = {}
    for night in nights:
        for ccd, s in night.items():
            out.setdefault(int(ccd), CCDSample(int(ccd))).add(s.features, s.group, s.visits, s.visit_ids)
    return out


# ----------------------------------------------------------------------------- comparison

@dataclass(frozen=True)
class StatResult:
    """One monitored quantity of one CCD against its reference.

    ``kind`` is ``"distribution"`` (psi, psi_null = the 90th percentile of the PSIs of the reference's own
    groups, psi_crit = the threshold applied, ks, ks_p set) or ``"visit"`` (z, value, ref_value
    set). ``n``/``n_ref``: sample sizes. ``tested``: False when a sample was too small.
    """

    name: str
    kind: str
    n: int
    n_ref: int
    tested: bool
    flagged: bool
    psi: float = float("nan")
    psi_null: float = float("nan")
    psi_crit: float = float("nan")
    ks: float = float("nan")
    ks_p: float = float("nan")
    z: float = float("nan")
    value: float = float("nan")
    ref_value: float = float("nan")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "kind", "n", "n_ref", "tested", "flagged")}
        for k in ("psi", "psi_null", "psi_crit", "ks", "ks_p", "z", "value", "ref_value"):
            v = getattr(self, k)
            if np.isfinite(v):
                d[k] = round(float(v), 6)
        return d


@dataclass(frozen=True)
class CCDDrift:
    ccd: int
    flagged: bool
    stats: tuple

    @property
    def reasons(self) -> list[str]:
        return [s.name for s in self.stats if s.flagged]

    def stat(self, name: str) -> StatResult | None:
        return next((s for s in self.stats if s.name == name), None)


@dataclass(frozen=True)
class DriftReport:
    """Outcome of :func:`compare`: one :class:`CCDDrift` per CCD, the reference mode and the
    settings (the ``[discover]`` section whose ``drift_*`` thresholds were applied)."""

    ccds: tuple
    mode: str
    settings: DiscoverConfig
    #: CCDs taken out of the focal-plane pool (see :func:`compare`)
    excluded: tuple = ()

    @property
    def flagged(self) -> list[int]:
        return [c.ccd for c in self.ccds if c.flagged]

    def to_dict(self) -> dict:
        from dataclasses import fields

        settings = {f.name.removeprefix("drift_"): getattr(self.settings, f.name) for f in fields(self.settings)
                    if f.name.startswith("drift_")}
        return {"mode": self.mode, "settings": settings, "flagged": self.flagged,
                "excluded_from_pool": list(self.excluded),
                "ccds": [{"ccd": c.ccd, "flagged": c.flagged, "reasons": c.reasons,
                          "stats": [s.to_dict() for s in c.stats]} for c in self.ccds]}

    def summary(self) -> str:
        lines = [f"drift ({self.mode} reference): {len(self.flagged)} of {len(self.ccds)} CCDs flagged"]
        for c in self.ccds:
            parts = []
            for s in c.stats:
                if not s.tested:
                    continue
                if s.kind == "distribution":
                    parts.append(f"{s.name} PSI={s.psi:.2f}/{s.psi_crit:.2f} p={s.ks_p:.1e}{'*' if s.flagged else ''}")
                else:
                    parts.append(f"{s.name} {s.value:.3g}/{s.ref_value:.3g} z={s.z:+.1f}{'*' if s.flagged else ''}")
            lines.append(f"  ccd {c.ccd:3d} {'FLAGGED' if c.flagged else 'ok     '} " + "; ".join(parts))
        return "\n".join(lines)


def _pool(samples: list) -> CCDSample | None:
    return merge_samples([{0: s} for s in samples]).get(0) if samples else None


def compare(night: Mapping[int, CCDSample], reference: Mapping[int, CCDSample] | None = None, *,
            settings: DiscoverConfig | None = None) -> DriftReport:
    """Flag the CCDs of ``night`` whose distributions shifted against their reference.

    Parameters
    ----------
    night : mapping ccd -> CCDSample
        This night's samples (:func:`collect_night`).
    reference : mapping ccd -> CCDSample, optional
        History of each CCD (:func:`merge_samples` of earlier nights); its visits are the groups
        of the empirical null. ``None``: each CCD is compared with the other CCDs of the same
        night pooled (the focal plane), whose CCDs are the groups; a CCD missing from a history
        is compared with the focal plane too.
    settings : DiscoverConfig, optional
        The ``[discover]`` config section: its ``drift_*`` thresholds (default ``DiscoverConfig()``).

    Returns
    -------
    DriftReport

    Notes
    -----
    The focal-plane pool is cleaned iteratively: a badly degraded CCD in the pool would shift
    every other CCD's reference (and widen the null), so the most deviant flagged CCD is taken out
    of the pool and the comparison is redone, until no CCD still in the pool is flagged (or two
    CCDs are left). Every CCD, taken out or not, is finally compared with the cleaned pool.
    """
    st = settings or DiscoverConfig()
    if not night:
        raise InputError("drift: the night holds no CCD to compare")
    history = reference or {}
    excluded: set[int] = set()
    while True:
        results = [_compare_ccd(ccd, night, history, excluded, st, _n_tests(night, history, excluded, st))
                   for ccd in sorted(night)]
        in_pool = [r for r in results if r.flagged and r.ccd not in excluded and r.ccd not in history]
        if not in_pool or len(night) - len(excluded) <= 2:
            break
        excluded.add(max(in_pool, key=lambda c: _deviation(c, st.drift_z_threshold)).ccd)
    mode = "focal_plane" if reference is None else "history"
    return DriftReport(tuple(results), mode, st, tuple(sorted(excluded)))


def _groups(ccd: int, night, history, excluded) -> tuple[CCDSample | None, list]:
    """The reference of ``ccd`` and its groups (a list of CCDSample-like feature dicts)."""
    if ccd in history:
        r = history[ccd]
        groups = [{k: v[r.group == g] for k, v in r.features.items()} for g in np.unique(r.group)]
        return r, groups
    others = [s for c, s in night.items() if c != ccd and c not in excluded]
    return _pool(others), [s.features for s in others]


def _n_tests(night, history, excluded, st: DiscoverConfig) -> int:
    n = 0
    for ccd, s in night.items():
        r, groups = _groups(ccd, night, history, excluded)
        for k in CANDIDATE_FEATURES:
            if r is not None and k in s.features and k in r.features and len(groups) >= st.drift_min_groups:
                n += bool(np.isfinite(s.features[k]).sum() >= st.drift_min_candidates
                          and np.isfinite(r.features[k]).sum() >= st.drift_min_candidates)
    return max(1, n)


def _null_psi(groups: list, k: str, st: DiscoverConfig) -> float:
    """90th percentile (the largest, for up to 10 groups) of the PSIs of each reference group
    against the rest of the reference (NaN: fewer than 2 groups)."""
    vals = [g[k] for g in groups if k in g and np.isfinite(g[k]).sum() >= max(2, st.drift_min_candidates // 2)]
    if len(vals) < 2:
        return float("nan")
    out = []
    for j, v in enumerate(vals):
        rest = np.concatenate([w for i, w in enumerate(vals) if i != j])
        out.append(psi(rest, v, bins=st.drift_bins))
    return float(np.quantile(out, 0.9, method="higher"))


def _compare_ccd(ccd: int, night, history, excluded, st: DiscoverConfig, n_tests: int) -> "CCDDrift":
    s = night[ccd]
    r, groups = _groups(ccd, night, history, excluded)
    # two tests per feature (distribution and missing fraction): Bonferroni counts both
    alpha = st.drift_ks_alpha / (2 * n_tests)
    stats = []
    for k in CANDIDATE_FEATURES:
        if r is None or k not in s.features or k not in r.features:
            continue
        a, b = s.features[k], r.features[k]
        if (np.isfinite(a).sum() < st.drift_min_candidates or np.isfinite(b).sum() < st.drift_min_candidates
                or len(groups) < st.drift_min_groups):
            stats.append(StatResult(k, "distribution", len(a), len(b), False, False))
            continue
        p_ = psi(b, a, bins=st.drift_bins)
        null = _null_psi(groups, k, st)
        crit = st.drift_psi_threshold if not np.isfinite(null) else max(st.drift_psi_threshold,
                                                                        st.drift_null_factor * null)
        d, pv = ks_2samp(a, b)
        pv_missing = _two_proportion_p(int(np.isfinite(a).sum()), len(a), int(np.isfinite(b).sum()), len(b))
        p_min = min(pv, pv_missing)
        stats.append(StatResult(k, "distribution", len(a), len(b), True, bool(p_ >= crit and p_min < alpha),
                                psi=p_, psi_null=null, psi_crit=crit, ks=d, ks_p=p_min))
    for k in VISIT_QUANTITIES:
        v = s.visits.get(k)
        rv = None if r is None else r.visits.get(k)
        if v is None or rv is None or not np.isfinite(v).any() or not np.isfinite(rv).any():
            continue
        n_v, n_r = int(np.isfinite(v).sum()), int(np.isfinite(rv).sum())
        if n_r < st.drift_min_groups:
            stats.append(StatResult(k, "visit", n_v, n_r, False, False))
            continue
        z, mv, mr = robust_z(v, rv, rel_floor=st.drift_rel_floor, poisson=(k == "n_candidates"))
        stats.append(StatResult(k, "visit", n_v, n_r, True, bool(abs(z) >= st.drift_z_threshold), z=z, value=mv,
                                ref_value=mr))
    return CCDDrift(ccd, any(x.flagged for x in stats), tuple(stats))


def _stat_deviation(s: StatResult, z_threshold: float) -> float:
    """How far one statistic is from its reference, in units of its threshold (``psi_crit`` of a
    distribution, ``z_threshold`` of a per-visit quantity)."""
    return s.psi / s.psi_crit if s.kind == "distribution" else abs(s.z) / z_threshold


def _deviation(c: "CCDDrift", z_threshold: float) -> float:
    """How far a flagged CCD is from its reference: its most deviant flagged statistic."""
    return max((_stat_deviation(s, z_threshold) for s in c.stats if s.flagged), default=0.0)


def reference_for(ccd: int, report: "DriftReport", night: Mapping[int, CCDSample],
                  reference: Mapping[int, CCDSample] | None) -> CCDSample | None:
    """The reference sample ``ccd`` was compared with in ``report``."""
    return _groups(ccd, night, reference or {}, set(report.excluded))[0]


def _two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value that two binomial proportions are equal (pooled z test)."""
    from scipy import stats

    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p) * (1 / n1 + 1 / n2), 1e-300))
    if p in (0.0, 1.0):
        return 1.0
    return float(2 * stats.norm.sf(abs(k1 / n1 - k2 / n2) / se))


# ----------------------------------------------------------------------------- plot

def plot_drift(report: DriftReport, night: Mapping[int, CCDSample], reference: Mapping[int, CCDSample] | None,
               path) -> Path:
    """PNG: the PSI map (CCDs x monitored distributions, flagged cells outlined) and the |z| of
    the per-visit quantities, then for each flagged CCD (at most 6) its most shifted
    distribution (empirical CDFs, night against reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ccds = [c.ccd for c in report.ccds]
    feats = [k for k in CANDIDATE_FEATURES if any(c.stat(k) is not None for c in report.ccds)]
    visits = [k for k in VISIT_QUANTITIES if any(c.stat(k) is not None for c in report.ccds)]
    flagged = [c for c in report.ccds if c.flagged][:6]
    ncol = max(2, len(flagged))
    fig = plt.figure(figsize=(4.0 * ncol, 7.5 if flagged else 4.0))
    gs = fig.add_gridspec(2 if flagged else 1, ncol)
    ax = fig.add_subplot(gs[0, : ncol // 2 + (ncol % 2)])
    m = np.full((len(ccds), max(1, len(feats))), np.nan)
    for i, c in enumerate(report.ccds):
        for j, k in enumerate(feats):
            s = c.stat(k)
            if s is not None and s.tested:
                m[i, j] = s.psi
    im = ax.imshow(m, aspect="auto", cmap="magma_r", vmin=0, vmax=max(1.0, np.nanmax(m) if np.isfinite(m).any() else 1))
    for i, c in enumerate(report.ccds):
        for j, k in enumerate(feats):
            s = c.stat(k)
            if s is not None and s.flagged:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="tab:red", lw=2))
    ax.set_xticks(range(len(feats)), feats, rotation=30)
    ax.set_yticks(range(len(ccds)), [f"ccd {c}" for c in ccds])
    ax.set_title(f"PSI vs {report.mode.replace('_', ' ')} reference (red: flagged)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax = fig.add_subplot(gs[0, ncol // 2 + (ncol % 2):])
    for j, k in enumerate(visits):
        z = [abs(c.stat(k).z) if c.stat(k) is not None else np.nan for c in report.ccds]
        ax.plot(z, range(len(ccds)), "o", label=k)
    ax.axvline(report.settings.drift_z_threshold, color="tab:red", ls=":")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yticks(range(len(ccds)), [f"ccd {c}" for c in ccds])
    ax.invert_yaxis()
    ax.set_xlabel("|robust z| of per-visit quantities")
    if visits:
        ax.legend(fontsize=7)
    for i, c in enumerate(flagged):
        ax = fig.add_subplot(gs[1, i])
        s = max((x for x in c.stats if x.flagged), key=lambda x: _stat_deviation(x, report.settings.drift_z_threshold))
        ref = reference_for(c.ccd, report, night, reference)
        if s.kind == "distribution":
            for arr, lab in ((ref.features[s.name], "reference"), (night[c.ccd].features[s.name], "this night")):
                a = np.sort(arr[np.isfinite(arr)])
                ax.step(a, np.arange(1, a.size + 1) / max(a.size, 1), where="post", label=f"{lab} (n={a.size})")
            ax.set_xlabel(s.name)
            ax.set_ylabel("cumulative fraction")
            ax.set_title(f"ccd {c.ccd}: {s.name} PSI={s.psi:.2f} (threshold {s.psi_crit:.2f})", fontsize=9)
        else:
            rv, nv = ref.visits[s.name], night[c.ccd].visits[s.name]
            ax.plot(np.zeros(len(rv)), rv, "o", label="reference visits")
            ax.plot(np.ones(len(nv)), nv, "o", color="tab:red", label="this night")
            ax.set_xticks([0, 1], ["reference", "this night"])
            ax.set_xlim(-0.7, 1.7)
            ax.set_ylabel(s.name)
            ax.set_title(f"ccd {c.ccd}: {s.name} z={s.z:+.1f}", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
