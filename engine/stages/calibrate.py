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

from nightsift.kernels._xp import array_namespace, to_device
from nightsift.kernels.morphology import dilate
from nightsift.kernels.background import mad_sigma

from ..config import CalibrateConfig
from ..errors import InputError
from ..io.fits import celestial_wcs, check_same_shape, header_float
from ..records import CalibrationFrames, Exposure, MaskBits, RawFrame, StageResult, qa_to_host

__all__ = ["MasterCalibration", "FrameParams", "make_master", "frame_params", "master_on", "calibrate_frames",
           "calibrate", "calibrated_header"]


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
        Header of the CCD (``GAIN`` in e-/ADU, required, converts the hot-pixel threshold to ADU).
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
    gain = _gain(header, None)
    bias_s = _stack(calib.bias, "bias")
    dark_s = _stack(calib.dark, "dark")
    flat_s = _stack(calib.flat, "flat")
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
    flat, flat_var = _master_flat(flat_s, bias)
    bad = _bad_pixels(dark_rate * gain, flat, config)

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


def _master_flat(flat_s: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, float]:
    """The master flat (median 1) of the raw flats ``(n, ny, nx)`` and its typical relative
    variance per pixel: bias subtracted, each flat scaled to median 1, median-combined."""
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
    return flat / flat_median, _median_stack_var(flats) / flat_median**2


def _bad_pixels(rate_e: np.ndarray, flat: np.ndarray, config: CalibrateConfig) -> np.ndarray:
    """``(ny, nx)`` bool: hot pixels and columns from the dark rate ``rate_e`` (e-/s), low- or
    high-response pixels and (partial) columns from the master flat (:func:`make_master`)."""
    bad = np.zeros(flat.shape, dtype=bool)
    med_rate = np.nanmedian(rate_e)
    hot = config.hot_pixel_threshold
    bad |= ~(rate_e - med_rate < hot)  # NaN is bad too
    bad[:, _bad_columns(rate_e - med_rate, -np.inf, hot)] = True
    lo, hi = config.flat_bad_threshold, 1.0 / config.flat_bad_threshold
    bad |= ~((flat > lo) & (flat < hi))
    bad |= _bad_column_segments(flat, lo, hi)
    return bad


def _gain(header, path: str | None) -> float:
    """``GAIN`` (e-/ADU) of a CCD header: required and positive."""
    gain = header_float(header, "GAIN", path=path, fix="add GAIN (e-/ADU) from the instrument's gain table")
    if gain <= 0:
        raise InputError(f"header GAIN = {gain} must be > 0 (e-/ADU)", path=path)
    return gain


@dataclass(frozen=True)
class FrameParams:
    """The header numbers one raw frame is calibrated with (read on the host, checked there).

    Attributes
    ----------
    gain : float, e-/ADU
    saturate : float, ADU
    exptime : float, s
    read_noise : float, e-
    path : str or None
    """

    gain: float
    saturate: float
    exptime: float
    read_noise: float
    path: str | None = None


def frame_params(raw: RawFrame, master: MasterCalibration) -> FrameParams:
    """Read and check ``GAIN``, ``SATURATE``, ``EXPTIME`` and ``RDNOISE`` of a raw frame.

    Raises
    ------
    InputError
        A missing or non-numeric key, a non-positive GAIN, or a frame whose shape is not the
        masters' (naming the file).
    """
    path = raw.path
    check_same_shape(tuple(raw.data.shape), master.shape, (path, "the master calibration"))
    header = raw.header
    gain = _gain(header, path)
    rn_default = master.read_noise if np.isfinite(master.read_noise) else 0.0
    return FrameParams(gain=gain, saturate=header_float(header, "SATURATE", path=path),
                       exptime=header_float(header, "EXPTIME", path=path),
                       read_noise=header_float(header, "RDNOISE", path=path, default=rn_default), path=path)


def master_on(master: MasterCalibration, xp) -> MasterCalibration:
    """The master frames in ``xp``'s memory (float32 planes, uint16 mask): a CCD's resident copy
    for a device worker (uploaded once, labelled ``statics``)."""
    from dataclasses import replace

    return replace(master, bias=to_device(master.bias, xp, dtype=np.float32, label="statics"),
                   dark_rate=to_device(master.dark_rate, xp, dtype=np.float32, label="statics"),
                   flat=to_device(master.flat, xp, dtype=np.float32, label="statics"),
                   bad_pixel_mask=to_device(master.bad_pixel_mask, xp, dtype=np.uint16, label="statics"))


def calibrate_frames(data, masters, params, *, config: CalibrateConfig) -> StageResult:
    """Calibrate a batch of raw frames to electrons with their variance and mask.

    Parameters
    ----------
    data : ndarray (B, ny, nx), ADU (uint16 or float), on the device the chain runs on
    masters : sequence of B :class:`MasterCalibration`, on the same device (:func:`master_on`)
    params : sequence of B :class:`FrameParams` (:func:`frame_params`)
    config : CalibrateConfig, keyword-only

    Returns
    -------
    StageResult
        ``value``: ``(image, variance, mask)``, ``(B, ny, nx)`` float32 e-, float32 e-^2,
        uint16. ``qa``: ``(B,)`` device arrays ``sky_median`` (e-), ``sky_noise`` (robust std of
        unmasked pixels, sources included), ``sky_noise_expected`` (median sqrt(variance)),
        ``saturated_fraction``, ``bad_fraction``, ``nodata_fraction``, ``master_noise`` and
        ``n_usable`` (unmasked pixels), plus host ``read_noise`` values.

    Notes
    -----
    Float32 throughout (the masters are float32; the arithmetic of one pixel needs no more).
    The medians of the QA and of the NO_DATA fill come from a 1-in-16 subsample of the frame.
    """
    xp = array_namespace(data, *(m.bias for m in masters))
    B = data.shape[0]
    f32 = xp.float32
    raw = data.astype(f32)
    finite = xp.isfinite(raw)
    image = xp.empty(raw.shape, f32)
    variance = xp.empty(raw.shape, f32)
    mask = xp.empty(raw.shape, xp.uint16)
    sat = xp.empty(raw.shape, bool)
    var_master = np.zeros(B)
    for b, (m, p) in enumerate(zip(masters, params)):  # elementwise work on whole frames, per CCD
        dark_adu = m.dark_rate * f32(p.exptime)
        signal_e = (xp.where(finite[b], raw[b], f32(0)) - m.bias - dark_adu) * f32(p.gain)
        image[b] = signal_e / m.flat
        ratio = p.exptime / m.dark_exptime if m.dark_exptime > 0 else 0.0
        var_master[b] = (1.0 - ratio) ** 2 * m.bias_var + ratio**2 * m.dark_var
        const = f32(p.read_noise**2 + p.gain**2 * var_master[b])
        dark_e = xp.maximum(dark_adu * f32(p.gain), f32(0))
        variance[b] = (xp.maximum(signal_e, f32(0)) + dark_e + const) / (m.flat * m.flat)
        variance[b] += image[b] * image[b] * f32(m.flat_var)
        mask[b] = m.bad_pixel_mask
        sat[b] = finite[b] & (raw[b] >= f32(config.saturation_fraction * p.saturate))
    sat = dilate(sat, iterations=config.saturation_grow, structure="square")
    mask |= xp.where(sat, xp.uint16(MaskBits.SAT), xp.uint16(0))
    mask |= xp.where(finite, xp.uint16(0), xp.uint16(MaskBits.NO_DATA))

    good = mask == 0
    sub = (slice(None), slice(None, None, 4), slice(None, None, 4))
    img_s = xp.where(good[sub], image[sub], xp.nan)
    sky = xp.nanmedian(img_s.reshape(B, -1), axis=1)
    var_s = xp.where(good[sub], variance[sub], xp.nan)
    med_var = xp.nanmedian(var_s.reshape(B, -1), axis=1)
    # NO_DATA pixels (NaN in the raw frame) get the median sky and variance: no NaN downstream
    image = xp.where(finite, image, sky.astype(f32)[:, None, None])
    variance = xp.where(finite, variance, med_var.astype(f32)[:, None, None])

    npix = float(raw[0].size)
    dev = to_device(np.array([[m.flat_var for m in masters], [p.gain for p in params], var_master]), xp,
                    label="header")
    flat_var, gain, vm = dev[0], dev[1], dev[2]
    qa = {
        "sky_median": sky,
        "sky_noise": mad_sigma(img_s.reshape(B, -1), axis=-1),
        "sky_noise_expected": xp.nanmedian(xp.sqrt(var_s).reshape(B, -1), axis=1),
        "saturated_fraction": ((mask & int(MaskBits.SAT)) != 0).reshape(B, -1).sum(axis=1) / npix,
        "bad_fraction": ((mask & int(MaskBits.BAD)) != 0).reshape(B, -1).sum(axis=1) / npix,
        "nodata_fraction": (~finite).reshape(B, -1).sum(axis=1) / npix,
        "read_noise": [float(p.read_noise) for p in params],
        "master_noise": xp.sqrt(gain**2 * vm + sky**2 * flat_var),
        "n_usable": good.reshape(B, -1).sum(axis=1),
    }
    return StageResult((image, variance, mask), qa)


def calibrate(raw: RawFrame, master: MasterCalibration, *, config: CalibrateConfig) -> StageResult:
    """Calibrate one raw frame (:func:`calibrate_frames` with B = 1) into an :class:`Exposure`.

    Parameters
    ----------
    raw : RawFrame
        ``data`` (ny, nx) ADU (numpy, or on the device of ``master``); header with ``GAIN``
        (e-/ADU), ``SATURATE`` (ADU), ``EXPTIME`` (s), optionally ``RDNOISE`` (e-; else
        ``master.read_noise``, else 0), and a celestial WCS.
    master : MasterCalibration
        From :func:`make_master`; same shape as ``raw.data``; numpy or on a device (:func:`master_on`).
    config : CalibrateConfig, keyword-only

    Returns
    -------
    StageResult
        ``value``: :class:`Exposure` (arrays on the masters' device; header with
        ``BUNIT = 'electron'``); ``qa``: the numbers of :func:`calibrate_frames` as Python floats.

    Raises
    ------
    InputError
        Shape mismatch between the raw frame and the masters, missing/invalid header keys or WCS,
        no usable pixel.
    """
    params = frame_params(raw, master)
    xp = array_namespace(master.bias)
    wcs = celestial_wcs(raw.header, tuple(raw.data.shape), path=raw.path)
    data = to_device(raw.data, xp, label="raw")[None]
    res = calibrate_frames(data, [master], [params], config=config)
    image, variance, mask = res.value
    qa = qa_to_host([res.qa], 1)[0]
    if qa["n_usable"] < 16:
        raise InputError("fewer than 16 usable pixels after masking; the frame or the masters are broken",
                         path=raw.path)
    if qa["nodata_fraction"] >= 1.0:
        raise InputError("raw frame has no finite pixel; drop it", path=raw.path)
    exposure = Exposure(image=image[0], variance=variance[0], mask=mask[0], wcs=wcs,
                        header=calibrated_header(raw.header, params.read_noise), path=raw.path)
    return StageResult(exposure, qa)


def calibrated_header(header: fits.Header, read_noise: float) -> fits.Header:
    """The raw header with ``BUNIT = 'electron'`` and the read noise used for the variance.

    The raw ``SATURATE`` (ADU, bias included) becomes ``SATURADU``: in an e- file ``SATURATE``
    would mean an e- level (:mod:`nightsift.engine.io.fits`), and a calibrated frame has none
    (bias, dark and flat differ per pixel); its ``SAT`` pixels are in the mask.
    """
    out = header.copy()
    out["BUNIT"] = ("electron", "image in e-, variance in e-^2 (nightsift)")
    out["RDNOISE"] = (read_noise, "read noise (e-) used for the variance")
    if "SATURATE" in out:
        out["SATURADU"] = (out["SATURATE"], "raw saturation (ADU, bias incl.); SAT pixels in MASK")
        del out["SATURATE"]
    return out
