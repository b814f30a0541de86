"""Compare candidates with a simulation's truth: matching, completeness, purity, curves.

Used by ``nightsift run`` (its summary), the injection-recovery tests and ``bench/``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .plotting import save_figure


@dataclass(frozen=True)
class Match:
    """Candidates matched to true transients.

    Attributes
    ----------
    truth_index : ndarray (n_cand,) int
        Index of the matched transient for each candidate, -1 if none.
    found : ndarray (n_truth,) bool
        True for transients recovered by a candidate of the right sign.
    """

    truth_index: np.ndarray
    found: np.ndarray

    @property
    def purity(self) -> float:
        n = len(self.truth_index)
        return float((self.truth_index >= 0).mean()) if n else float("nan")

    @property
    def completeness(self) -> float:
        return float(self.found.mean()) if len(self.found) else float("nan")


def match_candidates(cands: np.ndarray, truth: np.ndarray, *, radius: float = 2.0) -> Match:
    """Match candidates (``xpos, ypos, isdiffpos``) to transients (``x, y, flux``) within
    ``radius`` pixels; a fading transient (negative truth flux) needs a negative candidate."""
    n_t = len(truth)
    idx = np.full(len(cands), -1, int)
    found = np.zeros(n_t, bool)
    if len(cands) == 0 or n_t == 0:
        return Match(idx, found)
    d, j = cKDTree(np.c_[truth["x"], truth["y"]]).query(np.c_[cands["xpos"], cands["ypos"]],
                                                         distance_upper_bound=radius)
    ok = np.isfinite(d)
    jj = np.where(ok, j, 0)
    sign_ok = (truth["flux"][jj] > 0) == cands["isdiffpos"]
    hit = ok & sign_ok
    idx[hit] = j[hit]
    found[j[hit]] = True
    return Match(idx, found)


def expected_snr(truth: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
    """Expected S/N of each transient: |true flux| / the PSF-flux error map at its position."""
    ny, nx = flux_err.shape
    xi = np.clip(np.rint(truth["x"]).astype(int), 0, nx - 1)
    yi = np.clip(np.rint(truth["y"]).astype(int), 0, ny - 1)
    err = flux_err[yi, xi]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(err > 0, np.abs(truth["flux"]) / err, 0.0)


def completeness_curve(values: np.ndarray, found: np.ndarray, bins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction found per bin of ``values`` (magnitude or S/N): ``(centres, fraction, counts)``."""
    bins = np.asarray(bins, float)
    k = np.digitize(values, bins) - 1
    frac = np.full(len(bins) - 1, np.nan)
    cnt = np.zeros(len(bins) - 1, int)
    for i in range(len(bins) - 1):
        sel = k == i
        cnt[i] = sel.sum()
        if cnt[i]:
            frac[i] = found[sel].mean()
    return 0.5 * (bins[1:] + bins[:-1]), frac, cnt


def plot_completeness(mag, found, snr=None, *, path, title="Injection recovery", mag_label="magnitude of the transient"):
    """Write a PNG of completeness versus magnitude (and versus expected S/N when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 2 if snr is not None else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5 * ncol, 3.8), squeeze=False)
    lo, hi = np.floor(np.min(mag) * 2) / 2, np.ceil(np.max(mag) * 2) / 2
    c, f, n = completeness_curve(mag, found, np.arange(lo, hi + 0.25, 0.25))
    ax = axes[0, 0]
    ax.step(c, f, where="mid")
    ax.set_xlabel(mag_label)
    ax.set_ylabel("fraction detected (5 sigma)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    if snr is not None:
        c, f, n = completeness_curve(snr, found, np.array([0, 2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 50, 1e9]))
        ax = axes[0, 1]
        ax.plot(np.r_[c[:-1], 70], f, "o-")
        ax.set_xscale("log")
        ax.axvline(7, ls=":", c="k")
        ax.set_xlabel("expected S/N")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def gaussian_false_positives(P_D: np.ndarray, excluded: np.ndarray, *, threshold: float, min_area: int = 1,
                             dedup_radius: float = 3.0, n_realisations: int = 4, seed: int = 0) -> float:
    """Expected number of noise candidates (both signs) that the detection stage finds on a CCD
    whose S_corr is pure Gaussian noise with the correlation of the ZOGY score.

    On blank sky ``S = D (x) P_D`` (cross-correlation) with ``D`` white, so its power spectrum
    is ``|P_D^|^2``. This draws ``n_realisations`` such unit-variance fields on the CCD's shape,
    runs the same peak definition and deduplication as :func:`~nightsift.engine.stages.detect.detect`
    (:func:`nightsift.kernels.peaks.find_peaks`, ``detect.min_area``, greedy suppression) with the
    same excluded pixels, and returns the mean count. Unlike the continuous-field
    Euler-characteristic formula it includes the pixel-lattice sampling, which matters for an
    undersampled PSF (FWHM ~2 px): there the continuous formula over-predicts by ~1.5x.

    Parameters
    ----------
    P_D : ndarray (s, s) or (T, s, s)
        PSF of the difference image (centred stamp, any normalisation); tiles are averaged.
    excluded : ndarray (ny, nx) bool
        Pixels where the detection stage finds nothing (masked, uncovered).
    threshold : float
        Detection threshold in sigma.
    """
    from nightsift.kernels.neighbours import suppress
    from nightsift.kernels.peaks import find_peaks, refine_peaks
    from nightsift.kernels.psf import embed_psf

    P = np.asarray(P_D, float)
    if P.ndim == 3:
        P = P.mean(axis=0)
    P = P / np.sqrt(np.sum(P**2))
    ny, nx = excluded.shape
    K = np.conj(np.fft.rfft2(embed_psf(P, (ny, nx))[0]))  # cross-correlation with P_D
    rng = np.random.default_rng(seed)
    counts = []
    for _ in range(n_realisations):
        field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((ny, nx))) * K, s=(ny, nx)).astype(np.float32)
        pk = find_peaks(field, threshold=threshold, excluded=excluded)
        if min_area > 1 and len(pk):
            yy = np.clip(pk.y[:, None] + np.repeat(np.arange(-1, 2), 3), 0, ny - 1)
            xx = np.clip(pk.x[:, None] + np.tile(np.arange(-1, 2), 3), 0, nx - 1)
            ok = ((pk.sign[:, None] * field[yy, xx]) > threshold).sum(axis=1) >= min_area
            pk = type(pk)(image=pk.image[ok], y=pk.y[ok], x=pk.x[ok], value=pk.value[ok], sign=pk.sign[ok])
        x, y = refine_peaks(field, pk)
        keep = suppress(x, y, np.abs(pk.value.astype(np.float64)), radius=dedup_radius,
                        group=pk.sign.astype(np.int64))
        counts.append(int(keep.sum()))
    return float(np.mean(counts))
