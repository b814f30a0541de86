"""Calibration: raw ADU frame -> electrons, with a per-pixel variance and mask.

Two steps:

1. :func:`make_master` combines the raw calibration stacks of one CCD into a
   :class:`MasterCalibration` (bias, dark rate, normalised flat, bad-pixel mask, read noise).
2. :func:`calibrate` applies it to one raw science frame::

       image_e = (raw - bias - dark_rate * EXPTIME) / flat * GAIN          [e-]

   and builds the variance of that image in e-^2. The photo-electrons actually collected by a
   pixel are ``N = (raw - bias - dark) * GAIN = image_e * flat``; with ``D`` the dark electrons
   and ``R`` the read noise (e-), ``var(raw * GAIN) = N + D + R**2``, and dividing by the flat
   divides the variance by ``flat**2``::

       variance = (max(image_e * flat, 0) + D + R**2 + GAIN**2 var_master) / flat**2
                  + image_e**2 var_flat                                    [e-^2]

   The last two terms are the noise of the master frames (a fixed pattern, but to a single
   subtraction it is noise like any other): ``var_master`` (ADU^2) from the master bias and
   dark as they enter ``bias + dark_rate * EXPTIME``, ``var_flat`` the relative variance of the
   master flat; both are typical (scalar) values measured from the scatter between the frames
   of each stack (see :class:`MasterCalibration`). With 5 frames per stack they add ~5% to the
   sky variance; without them the variance map is low by that much.

Masks: ``BAD`` from the master, ``SAT`` where ``raw >= saturation_fraction * SATURATE`` (grown by
``saturation_grow`` px; bleed trails are themselves saturated so they are covered), ``NO_DATA``
where the raw frame is NaN/inf (those pixels are filled with the median sky, variance with the
median variance, so later FFTs see no NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from astropy.io import fits

from ..config import CalibrateConfig
from ..errors import InputError
from ..io.fits import celestial_wcs, check_same_shape
from ..records import CalibrationFrames, Exposure, MaskBits, RawFrame, StageResult

__all__ = ["MasterCalibration", "make_master", "calibrate"]


@dataclass(frozen=True)
class MasterCalibration:
    """Master calibration of one CCD.

    Attributes
    ----------
    bias : ndarray (ny, nx) float32, ADU
        Median of the bias frames.
    dark_rate : ndarray (ny, nx) float32, ADU/s
        ``(median(dark) - bias) / dark_exptime``.
    flat : ndarray (ny, nx) float32, dimensionless
        Median of the bias- and dark-subtracted flats, each scaled to median 1 first, normalised
        to median 1. Set to 1 on ``BAD`` pixels (so a dead pixel never divides by ~0).
    bad_pixel_mask : ndarray (ny, nx) uint16
        ``MaskBits.BAD`` on hot pixels/columns (dark) and low/high-response pixels/columns (flat).
    read_noise : float, e-
        From the scatter between bias frames (NaN with fewer than two bias frames).
    gain : float, e-/ADU
        The gain used for the thresholds in electrons.
    bias_var : float, ADU^2
        Typical variance of a master-bias pixel: ``c sigma_frame**2 / n`` with ``sigma_frame``
        the clipped scatter between two frames / sqrt(2) and ``c = pi/2`` for a median of
        ``n >= 3`` frames (1 otherwise). 0 when it cannot be measured (one frame).
    dark_var : float, ADU^2
        The same for the median dark frame (before the bias is subtracted).
    dark_exptime : float, s
        Exposure time of the darks (the master-dark noise scales with ``EXPTIME / dark_exptime``).
    flat_var : float
        Typical relative variance of a master-flat pixel (same recipe on the normalised flats).
    """

    bias: np.ndarray
    dark_rate: np.ndarray
    flat: np.ndarray
    bad_pixel_mask: np.ndarray
    read_noise: float = float("nan")
    gain: float = 1.0
    bias_var: float = 0.0
    dark_var: float = 0.0
    dark_exptime: float = 1.0
    flat_var: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bias.shape)  # type: ignore[return-value]


def _stack(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] < 1:
        raise InputError(f"calibration {name} frames must be a stack (n, ny, nx), got shape {arr.shape}")
    if not np.isfinite(arr).any():
        raise InputError(f"calibration {name} frames contain no finite pixel; re-take or re-read them")
    return arr


def _robust_std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _clipped_std(x: np.ndarray, *, nsigma: float = 5.0, iterations: int = 3) -> float:
    """Standard deviation after iterative clipping at ``nsigma`` around the median (unlike the
    MAD it is unbiased for integer-valued data such as differences of raw frames)."""
    x = x[np.isfinite(x)].astype(np.float64)
    if x.size < 2:
        return float("nan")
    keep = x
    for _ in range(iterations):
        med, sd = np.median(keep), keep.std()
        keep = x[np.abs(x - med) < nsigma * sd]
    return float(keep.std())


def _median_stack_var(stack: np.ndarray) -> float:
    """Typical variance of one pixel of the median of ``stack`` (n, ny, nx), from the scatter
    between its first two frames; 0 with a single frame (nothing to measure it from)."""
    n = stack.shape[0]
    if n < 2:
        return 0.0
    sigma2 = (_clipped_std(stack[1] - stack[0]) / np.sqrt(2.0)) ** 2
    return float((np.pi / 2 if n >= 3 else 1.0) * sigma2 / n)


def _bad_columns(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Columns whose median is outside ``(low, high)``: (nx,) bool."""
    col = np.nanmedian(values, axis=0)
    return ~((col > low) & (col < high))


def _bad_column_segments(flat: np.ndarray, lo: float, hi: float, *, half: int = 4) -> np.ndarray:
    """Pixels of (partial) columns whose response relative to the neighbouring columns is
    outside ``(lo, hi)``: the flat divided by its running median along the row (removes
    vignetting), then a running median along the column (averages pixel noise over a segment,
    so a column at 0.45 is not missed because a few of its pixels scatter above 0.5)."""
    f = np.where(np.isfinite(flat), flat, 1.0)
    local = ndi.median_filter(f, size=(1, 2 * half + 1), mode="nearest")
    rel = f / np.where(local > 0, local, 1.0)
    rel_col = ndi.median_filter(rel, size=(2 * half + 1, 1), mode="nearest")
    return ~((rel_col > lo) & (rel_col < hi))


def make_master(calib: CalibrationFrames, *, header: fits.Header, config: CalibrateConfig) -> MasterCalibration:
    """Combine raw calibration stacks into master frames and a bad-pixel mask.

    Parameters
    ----------
    calib : CalibrationFrames
        ``bias``, ``dark``, ``flat`` stacks ``(n, ny, nx)`` in ADU and ``dark_exptime`` (s).
    header : astropy.io.fits.Header, keyword-only
        Header of the CCD (``GAIN`` in e-/ADU converts the hot-pixel threshold to ADU).
    config : CalibrateConfig, keyword-only
        ``hot_pixel_threshold`` (e-/s above the median dark rate) and ``flat_bad_threshold``.

    Returns
    -------
    MasterCalibration

    Notes
    -----
    Stacks are median-combined (robust to cosmic rays in darks and flats). Flats are assumed
    short enough that their dark current is negligible; each flat is scaled to median 1 before
    combining so flats of different levels (twilight) combine correctly. A pixel is ``BAD`` if
    its dark rate exceeds the median by ``hot_pixel_threshold`` e-/s, or its flat response is
    below ``flat_bad_threshold`` or above ``1 / flat_bad_threshold``; a whole column is ``BAD``
    if its median dark rate fails the hot test (hot columns), and a column segment is ``BAD``
    where its flat response relative to the neighbouring columns, median-smoothed over 9 rows,
    fails the flat test (dead and partial low-response columns, pixel noise averaged out).
    """
    gain = float(header.get("GAIN", 1.0) or 1.0)
    bias_s = _stack(calib.bias, "bias")
    dark_s = _stack(calib.dark, "dark")
    flat_s = _stack(calib.flat, "flat")
    shape = bias_s.shape[1:]
    check_same_shape(bias_s.shape[1:], dark_s.shape[1:], ("master bias", "master dark"))
    check_same_shape(bias_s.shape[1:], flat_s.shape[1:], ("master bias", "master flat"))
    if not calib.dark_exptime > 0:
        raise InputError(f"calibration dark_exptime must be > 0 s, got {calib.dark_exptime}")

    bias = np.nanmedian(bias_s, axis=0) if bias_s.shape[0] > 1 else bias_s[0].copy()
    read_noise = float("nan")
    if bias_s.shape[0] >= 2:
        # difference of two frames removes the fixed pattern; its scatter is sqrt(2) x read noise
        read_noise = _clipped_std(bias_s[1] - bias_s[0]) / np.sqrt(2.0) * gain
    dark = np.nanmedian(dark_s, axis=0) if dark_s.shape[0] > 1 else dark_s[0]
    dark_rate = (dark - bias) / float(calib.dark_exptime)

    flats = flat_s - bias[None]
    levels = np.nanmedian(flats.reshape(flats.shape[0], -1), axis=1)
    if np.any(~np.isfinite(levels) | (levels <= 0)):
        raise InputError(
            f"flat frames have non-positive median level(s) after bias subtraction ({levels}); "
            "check that they are exposed flats, not biases"
        )
    flats = flats / levels[:, None, None]
    flat = np.nanmedian(flats, axis=0)
    flat_median = np.nanmedian(flat)
    flat = flat / flat_median
    flat_var = _median_stack_var(flats) / flat_median**2

    bad = np.zeros(shape, dtype=bool)
    rate_e = dark_rate * gain
    med_rate = np.nanmedian(rate_e)
    hot = config.hot_pixel_threshold
    bad |= ~(rate_e - med_rate < hot)  # NaN is bad too
    bad[:, _bad_columns(rate_e - med_rate, -np.inf, hot)] = True
    lo, hi = config.flat_bad_threshold, 1.0 / config.flat_bad_threshold
    bad |= ~((flat > lo) & (flat < hi))
    bad |= _bad_column_segments(flat, lo, hi)

    flat = np.where(bad | ~np.isfinite(flat), 1.0, flat)
    bpm = np.where(bad, np.uint16(MaskBits.BAD), np.uint16(0)).astype(np.uint16)
    return MasterCalibration(
        bias=bias.astype(np.float32),
        dark_rate=np.where(np.isfinite(dark_rate), dark_rate, 0.0).astype(np.float32),
        flat=flat.astype(np.float32),
        bad_pixel_mask=bpm,
        read_noise=read_noise,
        gain=gain,
        bias_var=_median_stack_var(bias_s),
        dark_var=_median_stack_var(dark_s),
        dark_exptime=float(calib.dark_exptime),
        flat_var=flat_var,
    )


def _header_float(header: fits.Header, key: str, path: str | None, *, default=None) -> float:
    if key not in header:
        if default is not None:
            return default
        raise InputError(f"header has no {key}; add it (see nightsift.engine.io.fits.read_raw)", path=path)
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise InputError(f"header {key} = {header[key]!r} is not a number", path=path) from None
    if not np.isfinite(value):
        raise InputError(f"header {key} is not finite", path=path)
    return value


def calibrate(raw: RawFrame, master: MasterCalibration, *, config: CalibrateConfig) -> StageResult:
    """Calibrate one raw frame to electrons with its variance and mask.

    Parameters
    ----------
    raw : RawFrame
        ``data`` (ny, nx) ADU; header with ``GAIN`` (e-/ADU), ``SATURATE`` (ADU), ``EXPTIME`` (s),
        optionally ``RDNOISE`` (e-; else ``master.read_noise``, else 0), and a celestial WCS.
    master : MasterCalibration
        From :func:`make_master`; same shape as ``raw.data``.
    config : CalibrateConfig, keyword-only

    Returns
    -------
    StageResult
        ``value``: :class:`Exposure` (image float32 e-, variance float32 e-^2, mask uint16, WCS,
        header with ``BUNIT = 'electron'``). ``qa``: ``sky_median`` (e-), ``sky_noise`` (e-,
        robust std of unmasked pixels, sources included so a crowded field reads high),
        ``sky_noise_expected`` (e-, median sqrt(variance)), ``saturated_fraction``,
        ``bad_fraction``, ``nodata_fraction``, ``read_noise`` (e-).

    Raises
    ------
    InputError
        Shape mismatch between the raw frame and the masters, missing/invalid header keys or WCS.
    """
    path = raw.path
    data = np.asarray(raw.data, dtype=np.float64)
    check_same_shape(data, master.bias, (path, "the master calibration"))
    header = raw.header
    gain = _header_float(header, "GAIN", path)
    if gain <= 0:
        raise InputError(f"header GAIN = {gain} must be > 0 (e-/ADU)", path=path)
    saturate = _header_float(header, "SATURATE", path)
    exptime = _header_float(header, "EXPTIME", path)
    rn_default = master.read_noise if np.isfinite(master.read_noise) else 0.0
    read_noise = _header_float(header, "RDNOISE", path, default=rn_default)
    wcs = celestial_wcs(header, data.shape, path=path)

    finite = np.isfinite(data)
    if not finite.any():
        raise InputError("raw frame has no finite pixel; drop it", path=path)
    flat = master.flat.astype(np.float64)
    dark_adu = master.dark_rate.astype(np.float64) * exptime
    signal_e = (np.where(finite, data, 0.0) - master.bias - dark_adu) * gain  # collected e-
    image = signal_e / flat
    dark_e = np.clip(dark_adu * gain, 0.0, None)
    # master noise in ADU: raw - bias - (dark_median - bias) * t/td = raw - (1 - t/td) bias - (t/td) dark_median
    ratio = exptime / master.dark_exptime if master.dark_exptime > 0 else 0.0
    var_master = (1.0 - ratio) ** 2 * master.bias_var + ratio**2 * master.dark_var
    variance = (np.clip(signal_e, 0.0, None) + dark_e + read_noise**2 + gain**2 * var_master) / flat**2
    variance += image**2 * master.flat_var

    mask = master.bad_pixel_mask.astype(np.uint16).copy()
    sat = finite & (data >= config.saturation_fraction * saturate)
    if config.saturation_grow > 0 and sat.any():
        sat = ndi.binary_dilation(sat, structure=np.ones((3, 3), bool), iterations=config.saturation_grow)
    mask[sat] |= np.uint16(MaskBits.SAT)
    if not finite.all():
        mask[~finite] |= np.uint16(MaskBits.NO_DATA)

    good = mask == 0
    if good.sum() < 16:
        raise InputError("fewer than 16 usable pixels after masking; the frame or the masters are broken", path=path)
    sky = float(np.median(image[good]))
    if not finite.all():
        image[~finite] = sky
        variance[~finite] = float(np.median(variance[good]))

    out_header = header.copy()
    out_header["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
    out_header["RDNOISE"] = (read_noise, "read noise (e-) used for the variance")
    exposure = Exposure(
        image=image.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=mask,
        wcs=wcs,
        header=out_header,
        path=path,
    )
    npix = float(mask.size)
    qa = {
        "sky_median": sky,
        "sky_noise": _robust_std(image[good]),
        "sky_noise_expected": float(np.median(np.sqrt(variance[good]))),
        "saturated_fraction": float(np.count_nonzero(mask & MaskBits.SAT)) / npix,
        "bad_fraction": float(np.count_nonzero(mask & MaskBits.BAD)) / npix,
        "nodata_fraction": float(np.count_nonzero(mask & MaskBits.NO_DATA)) / npix,
        "read_noise": float(read_noise),
        "master_noise": float(np.sqrt(gain**2 * var_master + np.median(image[good]) ** 2 * master.flat_var)),
    }
    return StageResult(exposure, qa)
