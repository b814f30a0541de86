"""Source catalogue of background-subtracted images: matched-filter detection and windowed
measurements, batched over images, written once over ``xp`` (numpy, cupy, the strict stand-in).

It replaces ``sep.extract`` (host-only C) in the chain. One definition, evaluated with whole-array
operations; the same inputs give the same catalogue on every backend.

Detection
---------
For each image ``b`` of a batch ``(B, ny, nx)`` (float32, e-, background subtracted):

1. unusable pixels (``mask`` True, or non-finite) are set to 0;
2. the image is correlated with a unit-L2 circular Gaussian of FWHM ``fwhm[b]`` (separable, two
   :func:`~scipy.ndimage.correlate1d` passes of ``ndimage_module(xp)``, truncated at +-4 sigma,
   zero outside the image) -- the matched filter of a Gaussian point source;
3. the filtered image is divided by its *robust* standard deviation, measured on a regular
   subsample of the image's usable pixels (MAD, then three 3-sigma-clipped std iterations, all on
   the device): the detection map is in sigma even where the noise is correlated (a resampled
   reference, a stacked image), where ``sigma`` (the map's noise for white noise and a unit-L2
   kernel) would not be;
4. sources are the positive local maxima of that map above ``threshold``, deduplicated within
   ``max(1, 0.5 fwhm[b])`` pixels (:func:`nightsift.kernels.peaks.find_peaks` semantics: a peak is
   dropped when a stronger one lies within the radius). Unusable pixels *may* hold a peak: the
   filtered light of a saturated star's wings peaks inside its masked core, and excluding it
   would drop the star from the catalogue altogether (its unmasked rim is never a maximum);
   such sources carry :data:`FLAG_MASKED`;
5. local contrast: a peak must also stand ``0.6 threshold`` above the median of the detection
   map in the annulus 2-3 FWHM around it. Noise maxima riding on the extended halo of a bright
   galaxy (or a bright star's wings) are high in the map but not above their surroundings; this
   removes them (a simulated r_eff = 16 px galaxy gave 7 sources without it, 2 with it) and
   costs no star of simulated fields (a faint star on a halo stands out of it by its own S/N).

Measurement
-----------
Square stamps of side ``2 ceil(max(3 max(fwhm), max(r_ap) + 2)) + 1`` around every peak pixel are
gathered for the whole batch in one fancy-indexing call (pixels outside the image read 0).

* centroid: Gaussian-windowed (SExtractor's ``XWIN``; :func:`nightsift.kernels.psf.centroid`),
  window sigma ``fwhm / 2.3548``, 6 iterations from the quadratic peak of the detection map; if it
  runs farther than 1.5 px from the peak pixel (a brighter neighbour) the quadratic peak is kept;
* ``a, b, theta``: Gaussian-windowed second moments about the centroid, window sigma
  ``fwhm / 2.3548``, times 2 (as :func:`nightsift.kernels.psf.moments`): exactly the source's
  covariance for a Gaussian source whose FWHM is ``fwhm``; a source of size ``s`` measures
  ``2 s^2 w^2 / (s^2 + w^2)`` (pulled toward the window ``w``);
* ``flux``: sum of the whole pixels whose centre lies within ``r_ap`` of the centroid
  (``sep.sum_circle(..., subpix=1)``), ``r_ap = aperture_radius`` or ``max(2 fwhm, 3)`` px;
  ``fluxerr = sqrt(n_pix sigma^2 + max(flux, 0))`` (e- images; other units scale the source term
  by ``poisson_scale``; ``n_pix`` usable aperture pixels inside the image), ``snr = flux / fluxerr``;
* ``peak``: the brightest pixel of the 3x3 core around the peak pixel;
* ``flag``: :data:`FLAG_MASKED` (1) if an unusable pixel lies in the aperture,
  :data:`FLAG_EDGE` (2) if the aperture crosses the image edge.

The windowed sums are separable (``wy^T I wx``): each iteration is one batched matrix product
over the stamps, no ``(n, s, s)`` float temporaries. Nothing reads device values back to the host
but :func:`~nightsift.kernels.peaks.find_peaks` (the number of peaks) and the one compaction of
the selected peaks (its size); no Python loop runs over pixels, sources or images (the filter
runs once per *distinct* FWHM of the batch: once when the batch shares one FWHM).

>>> import numpy as np
>>> img = np.zeros((64, 64), np.float32)
>>> yy, xx = np.mgrid[0:64, 0:64]
>>> img += 1000 * np.exp(-((xx - 30.3) ** 2 + (yy - 20.6) ** 2) / (2 * 1.5**2))
>>> img += np.random.default_rng(1).normal(0, 1, img.shape).astype(np.float32)
>>> s = detect_sources(img, 1.0, fwhm=3.5)
>>> len(s), round(float(s.x[0]), 1), round(float(s.y[0]), 1)
(1, 30.3, 20.6)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ._xp import array_namespace, ndimage_module, to_device, to_host
from .background import median_mad_sigma
from .peaks import Peaks, disc_offsets, find_peaks, refine_peaks
from .psf import FWHM_PER_SIGMA

__all__ = ["Sources", "detect_sources", "robust_std", "FLAG_MASKED", "FLAG_EDGE"]

#: flag bit: an unusable (masked or non-finite) pixel lies within the aperture
FLAG_MASKED = 1
#: flag bit: the aperture crosses the image edge
FLAG_EDGE = 2

_FWHM_TO_SIGMA = 1.0 / FWHM_PER_SIGMA
#: subsample size (per image) of the detection map for its robust std
_STD_SAMPLES = 1 << 18
#: windowed-centroid iterations, and the distance (px) from the peak pixel beyond which it "ran away"
_CENTROID_ITER = 6
_RUNAWAY = 1.5
#: local contrast: a peak must stand ``_LOCAL_FRACTION * threshold`` above the median of the
#: detection map in the annulus ``_ANNULUS`` (in FWHM) around it
_LOCAL_FRACTION = 0.6
_ANNULUS = (2.0, 3.0)


@dataclass(frozen=True)
class Sources:
    """Sources of a batch of images, one row per source, sorted by the ``(image, y, x)`` of their
    peak pixel; every column lives on the input's device.

    Attributes
    ----------
    image : ndarray (n,) int64
        Index of the image in the batch (0 for a single 2-D image).
    x, y : ndarray (n,) float64
        0-based windowed centroid (pixels, ``x`` the column).
    flux, fluxerr, snr : ndarray (n,) float64
        Aperture flux (image units, e-) in a circle of radius ``r_ap`` around the centroid (whole
        pixels whose centre is inside), its error ``sqrt(n_pix sigma^2 + max(flux, 0))`` and
        ``flux / fluxerr`` (0 where ``fluxerr`` is 0).
    peak : ndarray (n,) float64
        Brightest pixel of the 3x3 core around the peak pixel (image units; unusable pixels 0).
    a, b, theta : ndarray (n,) float64
        Semi-major and semi-minor axes (pixels, 1 sigma, ``a >= b``) and angle (radians,
        counter-clockwise from +x, in ``(-pi/2, pi/2]``) of the Gaussian-windowed second moments
        (see the module notes); NaN where the windowed flux is not positive or the moment matrix
        is not positive definite (noise, a masked core).
    flag : ndarray (n,) int32
        :data:`FLAG_MASKED` (1): an unusable pixel in the aperture; :data:`FLAG_EDGE` (2): the
        aperture crosses the image edge.
    """

    image: object
    x: object
    y: object
    flux: object
    fluxerr: object
    snr: object
    peak: object
    a: object
    b: object
    theta: object
    flag: object

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index) -> "Sources":
        """Rows ``index`` (an integer array on the same device), in that order."""
        return Sources(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def select(self, mask) -> "Sources":
        """Rows where the boolean device array ``mask`` (n,) is True, order kept."""
        return Sources(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


def _empty(xp) -> Sources:
    f8 = xp.zeros(0, dtype=xp.float64)
    return Sources(image=xp.zeros(0, dtype=xp.int64), x=f8, y=f8, flux=f8, fluxerr=f8, snr=f8, peak=f8,
                   a=f8, b=f8, theta=f8, flag=xp.zeros(0, dtype=xp.int32))


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _is_host_value(v) -> bool:
    return np.isscalar(v) or isinstance(v, (np.ndarray, np.generic, list, tuple))


def _host_per_image(value, B: int, name: str, *, allow_zero: bool = False) -> np.ndarray:
    """A float or (B,) host value (a device array is downloaded: its values set array sizes) as
    a (B,) float64 numpy array, validated."""
    v = np.asarray(value if _is_host_value(value) else to_host(value, label=f"sources.{name}"), dtype=np.float64)
    if v.ndim == 0:
        v = np.full(B, float(v))
    if v.shape != (B,):
        raise ValueError(f"detect_sources: {name} must be a number or a ({B},) array (one per image), got shape "
                         f"{v.shape}")
    ok = np.isfinite(v) & ((v >= 0) if allow_zero else (v > 0))
    if not ok.all():
        raise ValueError(f"detect_sources: {name} must be finite and {'>= 0' if allow_zero else '> 0'}, got "
                         f"{v.tolist()}")
    return v


def _per_image(values: np.ndarray, xp):
    """(B,) host values as a Python float when they are all equal (no upload), else a device array."""
    if values.size and np.all(values == values[0]):
        return float(values[0])
    return to_device(values, xp, dtype=np.float64, label="sources.per_image")


def _gather(v, image):
    """``v[image]`` for a device (B,) array, ``v`` itself for a Python float."""
    return v if isinstance(v, float) else v[image]


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------
def _gauss_taps(xp, fwhm: float):
    """Unit-L2 1-D Gaussian taps of FWHM ``fwhm``, truncated at +-4 sigma (device array)."""
    s = fwhm * _FWHM_TO_SIGMA
    h = max(1, int(math.ceil(4.0 * s)))
    off = xp.arange(-h, h + 1, dtype=xp.float64)
    w = xp.exp(-0.5 * (off / s) ** 2)
    return w / xp.sqrt(xp.sum(w * w))  # 1-D unit L2 -> the separable 2-D kernel has unit L2 too


def _matched_filter(xp, img, fwhm_host: np.ndarray):
    """Correlate each image of the (B, ny, nx) float32 stack with its unit-L2 Gaussian (one pair
    of correlate1d calls per distinct FWHM of the batch)."""
    nd = ndimage_module(xp)
    uniq = np.unique(fwhm_host)

    def filt(stack, f):
        w = _gauss_taps(xp, float(f))
        out = nd.correlate1d(stack, w, axis=-1, mode="constant", cval=0.0)
        return nd.correlate1d(out, w, axis=-2, mode="constant", cval=0.0)

    if uniq.size == 1:
        return filt(img, uniq[0])
    out = xp.empty(img.shape, dtype=img.dtype)
    for f in uniq:  # one iteration per distinct FWHM (images sharing a PSF share a call)
        idx = to_device(np.flatnonzero(fwhm_host == f), xp, dtype=np.int64, label="sources.groups")
        out[idx] = filt(img[idx], f)
    return out


def _sorted_median(xp, srt, n):
    """Median of each row of ``srt`` (B, m), ascending, whose first ``n`` (B,) values are valid."""
    m = srt.shape[-1]
    lo = xp.clip((n - 1) // 2, 0, m - 1)[:, None]
    hi = xp.clip(n // 2, 0, m - 1)[:, None]
    med = 0.5 * (xp.take_along_axis(srt, lo, axis=-1)[:, 0] + xp.take_along_axis(srt, hi, axis=-1)[:, 0])
    return xp.where(n > 0, med, xp.nan)


def robust_std(values, valid, *, clip: float = 3.0, iterations: int = 3):
    """Robust standard deviation of each row of ``values`` (B, m) over its ``valid`` entries.

    MAD about the median (both by sorting, on the device), then ``iterations`` rounds of the std
    of the values within ``clip`` sigma of the clipped mean, corrected for the truncation of a
    Gaussian at ``clip`` sigma. NaN for a row without valid values.

    Parameters
    ----------
    values : ndarray (B, m), float
    valid : ndarray (B, m), bool

    Returns
    -------
    ndarray (B,) float64, on the device of ``values``.
    """
    xp = array_namespace(values, valid)
    v = values.astype(xp.float64)
    med, sig = median_mad_sigma(xp.where(valid, v, xp.nan), axis=-1)
    # std of a unit Gaussian truncated at +-clip
    c = float(clip)
    phi = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    trunc = math.sqrt(1.0 - 2.0 * c * phi / math.erf(c / math.sqrt(2.0)))
    centre = med
    for _ in range(iterations):
        keep = valid & (xp.abs(v - centre[:, None]) <= clip * sig[:, None])
        k = xp.sum(keep, axis=-1)
        kk = xp.where(k > 0, k, 1).astype(xp.float64)
        centre = xp.sum(xp.where(keep, v, 0.0), axis=-1) / kk
        var = xp.sum(xp.where(keep, (v - centre[:, None]) ** 2, 0.0), axis=-1) / kk
        sig = xp.where(k > 1, xp.sqrt(var) / trunc, xp.nan)
    return sig


def _detection_map(xp, img, mask, fwhm_h):
    """``(img0, bad, snr_map)`` of the (B, ny, nx) stack: the image with unusable pixels 0
    (float32), the unusable map (bool) and the matched-filter S/N map (float32, in robust sigma
    of each filtered image)."""
    B, ny, nx = img.shape
    img = img.astype(xp.float32, copy=False)
    bad = ~xp.isfinite(img)
    if mask is not None:
        bad = bad | (mask[None] if mask.ndim == 2 else mask).astype(bool)
    img0 = xp.where(bad, xp.zeros((), dtype=xp.float32), img)
    filt = _matched_filter(xp, img0, fwhm_h)
    step = max(1, int(math.sqrt(ny * nx / _STD_SAMPLES)))
    sub_v = xp.reshape(filt[:, ::step, ::step], (B, -1))
    sub_ok = ~xp.reshape(bad[:, ::step, ::step], (B, -1))
    std = robust_std(sub_v, sub_ok)
    # floor for noise-free images (the map stays finite in float32): 1e-6 of the largest value
    std = xp.maximum(std, 1e-6 * xp.max(xp.where(sub_ok, xp.abs(sub_v), 0.0), axis=-1))
    ok_std = xp.isfinite(std) & (std > 0)
    inv = xp.where(ok_std, 1.0 / xp.where(ok_std, std, 1.0), 0.0).astype(xp.float32)
    return img0, bad, filt * inv[:, None, None]


def _annulus_median(xp, v, b, y, x, fw, fw_max: float):
    """Median of the (B, ny, nx) map ``v`` over the pixels at ``_ANNULUS[0] fw <= r <=
    _ANNULUS[1] fw`` from each peak ``(b, y, x)``, inside the image (``fw`` (n,) or a float);
    NaN where there is none."""
    B, ny, nx = v.shape
    R = int(math.ceil(_ANNULUS[1] * fw_max))
    o = xp.arange(-R, R + 1, dtype=xp.int64)
    oy = xp.reshape(xp.broadcast_to(o[:, None], (2 * R + 1, 2 * R + 1)), (-1,))
    ox = xp.reshape(xp.broadcast_to(o[None, :], (2 * R + 1, 2 * R + 1)), (-1,))
    r2 = (oy * oy + ox * ox).astype(xp.float64)[None, :]
    fw = fw[:, None] if not isinstance(fw, float) else fw
    qy, qx = y[:, None] + oy[None, :], x[:, None] + ox[None, :]  # (n, (2R+1)^2)
    ok = ((r2 >= (_ANNULUS[0] * fw) ** 2) & (r2 <= (_ANNULUS[1] * fw) ** 2)
          & (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx))
    vals = v[b[:, None], xp.clip(qy, 0, ny - 1), xp.clip(qx, 0, nx - 1)]
    srt = xp.sort(xp.where(ok, vals, xp.inf), axis=-1)
    return _sorted_median(xp, srt, xp.sum(ok, axis=-1))


def _suppressed(xp, v, b, y, x, val, live, r_src, rmax: float):
    """find_peaks' deduplication with a per-peak radius ``r_src`` (n,): True for a peak of the
    table ``(b, y, x)`` with a stronger ``live`` peak within its radius (ties: the earlier in
    raster order). ``val`` are the peaks' values in the (B, ny, nx) map ``v``."""
    B, ny, nx = v.shape
    is_peak = xp.zeros(v.shape, dtype=bool)
    is_peak[b, y, x] = live
    r2 = r_src * r_src
    out = xp.zeros(b.shape, dtype=bool)
    for dy, dx in disc_offsets(rmax):
        qy, qx = y + dy, x + dx
        inb = (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx) & (float(dy * dy + dx * dx) <= r2)
        qy, qx = xp.clip(qy, 0, ny - 1), xp.clip(qx, 0, nx - 1)
        aq = v[b, qy, qx]
        earlier = dy < 0 or (dy == 0 and dx < 0)
        beats = ((aq > val) | (aq == val)) if earlier else (aq > val)
        out |= inb & is_peak[b, qy, qx] & beats
    return out


# --------------------------------------------------------------------------------------------
# the catalogue
# --------------------------------------------------------------------------------------------
def detect_sources(image, sigma, *, fwhm, threshold: float = 5.0, mask=None, aperture_radius=None,
                   max_sources: int | None = None, poisson_scale=None) -> Sources:
    """Detect and measure the sources of background-subtracted images (see the module notes).

    Parameters
    ----------
    image : ndarray (ny, nx) or (B, ny, nx), float32, e-
        Background-subtracted images (numpy, cupy or any array namespace with ``ndimage``); other
        real dtypes are cast to float32. Not modified.
    sigma : float or ndarray (B,)
        Background noise per pixel (e-) of each image, for ``fluxerr`` (detection measures its own
        noise). Host or device.
    fwhm : float or array_like (B,), keyword-only
        Guess of each image's PSF FWHM (pixels): sets the matched filter, the deduplication
        radius ``max(1, 0.5 fwhm)``, the centroid and moment window and the default aperture. A
        device array is read back once (it sets array sizes).
    threshold : float, keyword-only
        Detection threshold in robust sigma of the matched-filtered image (>= 0).
    mask : ndarray of bool, shape of ``image``, optional, keyword-only
        True for unusable pixels: 0 in the filter and the measurements, flagged
        (:data:`FLAG_MASKED`) when inside an aperture (a masked saturated core may hold its
        star's peak; see the module notes). Non-finite pixels are unusable too.
    aperture_radius : float or array_like (B,), optional, keyword-only
        Aperture radius (pixels); default ``max(2 fwhm, 3)``.
    max_sources : int, optional, keyword-only
        Keep at most this many sources per image, those with the highest detection S/N.
    poisson_scale : float or array_like (B,), optional, keyword-only
        Image units per e- of each image, for the source's own Poisson term of ``fluxerr``
        (``poisson_scale * max(flux, 0)``): ``None`` (or 1) for images in e-; an image in flux
        units passes what its variance map implies (0: its map holds no source noise).

    Returns
    -------
    Sources
        On the device of ``image``, sorted by ``(image, y, x)`` of the peak pixels; empty when
        nothing is detected (a blank or fully masked image, an empty batch).

    Raises
    ------
    ValueError
        ``image`` not 2-D or 3-D; ``sigma``, ``fwhm`` or ``aperture_radius`` not a number or a
        ``(B,)`` array, non-finite or not positive (``sigma`` may be 0); a negative or
        non-finite ``threshold``; a ``mask`` of another shape; ``max_sources < 1``.
    """
    xp = array_namespace(image, mask, None if _is_host_value(sigma) else sigma)
    if image.ndim not in (2, 3):
        raise ValueError(f"detect_sources: image must be (ny, nx) or (B, ny, nx), got shape {tuple(image.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(image.shape):
        raise ValueError(f"detect_sources: mask has shape {tuple(mask.shape)}, image {tuple(image.shape)}; "
                         "they must match")
    if not (isinstance(threshold, (int, float, np.integer, np.floating)) and math.isfinite(threshold)
            and threshold >= 0):
        raise ValueError(f"detect_sources: threshold must be a finite number >= 0 (sigma), got {threshold!r}")
    if max_sources is not None and (isinstance(max_sources, bool) or int(max_sources) != max_sources
                                    or max_sources < 1):
        raise ValueError(f"detect_sources: max_sources must be an integer >= 1 or None, got {max_sources!r}")
    img = image[None] if image.ndim == 2 else image
    B, ny, nx = img.shape
    fwhm_h = _host_per_image(fwhm, B, "fwhm")
    rap_h = (np.maximum(2.0 * fwhm_h, 3.0) if aperture_radius is None
             else _host_per_image(aperture_radius, B, "aperture_radius"))
    if _is_host_value(sigma):
        sig = _per_image(_host_per_image(sigma, B, "sigma", allow_zero=True), xp)
    else:
        sig = xp.reshape(sigma.astype(xp.float64), (-1,))
        if sig.shape[0] == 1:
            sig = xp.broadcast_to(sig, (B,))
        if sig.shape != (B,):
            raise ValueError(f"detect_sources: sigma must be a number or a ({B},) array, got shape "
                             f"{tuple(sigma.shape)}")
    pois = None if poisson_scale is None else _per_image(_host_per_image(poisson_scale, B, "poisson_scale",
                                                                          allow_zero=True), xp)
    if B == 0 or ny == 0 or nx == 0:
        return _empty(xp)

    # ---- detection ---------------------------------------------------------------------------
    img0, bad, snr_map = _detection_map(xp, img, mask, fwhm_h)
    fw_dev = _per_image(fwhm_h, xp)  # a float, or (B,) on the device when the FWHMs differ
    radius_h = np.maximum(1.0, 0.5 * fwhm_h)
    uniform = bool(np.all(radius_h == radius_h[0]))
    pk = find_peaks(snr_map, threshold=float(threshold), radius=float(radius_h[0]) if uniform else 0.0,
                    excluded=None)
    # every selection below is a mask over find_peaks' table: one compaction at the end (a boolean
    # gather synchronises a GPU with the host)
    b, yi, xi = pk.image, pk.y, pk.x
    val = snr_map[b, yi, xi]
    sel = pk.sign > 0
    if not uniform:  # per-image radii: find_peaks' rule, each peak with its image's radius
        r_dev = to_device(radius_h, xp, dtype=np.float64, label="sources.radius")
        sel = sel & ~_suppressed(xp, snr_map, b, yi, xi, val, sel, r_dev[b], float(radius_h.max()))
    if b.shape[0]:  # local contrast: drop maxima that do not stand out of their surroundings
        bg = _annulus_median(xp, snr_map, b, yi, xi, _gather(fw_dev, b), float(fwhm_h.max()))
        bg = xp.where(xp.isfinite(bg), bg, 0.0)
        sel = sel & (val - bg >= _LOCAL_FRACTION * float(threshold))
    if max_sources is not None and b.shape[0]:  # rank among the selected peaks of each image
        key = xp.where(sel, -val.astype(xp.float64), xp.inf)
        order = xp.lexsort(xp.stack([key, b.astype(xp.float64)]))
        bs = b[order]
        rank = xp.arange(bs.shape[0]) - xp.searchsorted(bs, bs, side="left")
        top = xp.zeros(b.shape, dtype=bool)
        top[order] = rank < int(max_sources)
        sel = sel & top
    b, yi, xi = b[sel], yi[sel], xi[sel]
    n = int(b.shape[0])
    if n == 0:
        return _empty(xp)

    # ---- measurement -----------------------------------------------------------------------------
    ones8 = xp.ones(b.shape, dtype=xp.int8)
    rx, ry = refine_peaks(snr_map, Peaks(image=b, y=yi, x=xi, value=snr_map[b, yi, xi], sign=ones8))
    dx0, dy0 = rx - xi, ry - yi  # quadratic peak of the detection map, relative to the peak pixel

    half = int(math.ceil(max(3.0 * float(fwhm_h.max()), float(rap_h.max()) + 2.0)))
    off = xp.arange(-half, half + 1, dtype=xp.int64)
    rows = yi[:, None] + off  # (n, S)
    cols = xi[:, None] + off
    row_in = (rows >= 0) & (rows < ny)
    col_in = (cols >= 0) & (cols < nx)
    bb = b[:, None, None]
    rc = xp.clip(rows, 0, ny - 1)[:, :, None]
    cc = xp.clip(cols, 0, nx - 1)[:, None, :]
    inside = row_in[:, :, None] & col_in[:, None, :]
    st = xp.where(inside, img0[bb, rc, cc], xp.zeros((), dtype=xp.float32)).astype(xp.float64)  # (n, S, S)
    st_bad = bad[bb, rc, cc] & inside

    s_win = _gather(fw_dev, b) * _FWHM_TO_SIGMA
    if isinstance(s_win, float):
        s_win = xp.full(b.shape, s_win, dtype=xp.float64)
    u = off.astype(xp.float64)[None, :]  # (1, S): pixel offsets from the peak pixel
    inv2s2 = (0.5 / (s_win * s_win))[:, None]

    def window_sums(dx, dy, powers):
        """M[k, p, q] = sum_ij wy_i dy_i^p I_ij wx_j dx_j^q with the Gaussian window at (dx, dy)."""
        ex = u - dx[:, None]
        ey = u - dy[:, None]
        wx = xp.exp(-(ex * ex) * inv2s2)
        wy = xp.exp(-(ey * ey) * inv2s2)
        X = xp.stack([wx * ex**p for p in powers], axis=-1)  # (n, S, P)
        Y = xp.stack([wy * ey**p for p in powers], axis=1)  # (n, P, S)
        return xp.matmul(Y, xp.matmul(st, X))  # (n, P, P)

    lim = half / 2.0
    dx, dy = dx0, dy0
    for _ in range(_CENTROID_ITER):
        M = window_sums(dx, dy, (0, 1))
        norm = M[:, 0, 0]
        good = norm > 0
        safe = xp.where(good, norm, 1.0)
        # factor 2: the fixed point is unbiased for a Gaussian source in a matched window
        dx = xp.clip(dx + xp.where(good, 2.0 * M[:, 0, 1] / safe, 0.0), -lim, lim)
        dy = xp.clip(dy + xp.where(good, 2.0 * M[:, 1, 0] / safe, 0.0), -lim, lim)
    ran = ~(dx * dx + dy * dy <= _RUNAWAY * _RUNAWAY)  # also catches NaN
    dx = xp.where(ran, dx0, dx)
    dy = xp.where(ran, dy0, dy)

    M = window_sums(dx, dy, (0, 1, 2))
    norm = M[:, 0, 0]
    good = norm > 0
    safe = xp.where(good, norm, 1.0)
    mxx = 2.0 * M[:, 0, 2] / safe
    myy = 2.0 * M[:, 2, 0] / safe
    mxy = 2.0 * M[:, 1, 1] / safe
    tr = 0.5 * (mxx + myy)
    dd = xp.sqrt(0.25 * (mxx - myy) ** 2 + mxy * mxy)
    l1, l2 = tr + dd, tr - dd
    shape_ok = good & (l2 > 0) & xp.isfinite(l1)
    nan = xp.nan
    a_ax = xp.where(shape_ok, xp.sqrt(xp.where(shape_ok, l1, 1.0)), nan)
    b_ax = xp.where(shape_ok, xp.sqrt(xp.where(shape_ok, l2, 1.0)), nan)
    theta = xp.where(shape_ok, 0.5 * xp.arctan2(2.0 * mxy, mxx - myy), nan)

    # ---- aperture photometry, peak, flags ------------------------------------------------------
    r_ap = _gather(_per_image(rap_h, xp), b)
    r2 = (r_ap * r_ap)[:, None, None] if not isinstance(r_ap, float) else r_ap * r_ap
    ex = (u - dx[:, None]) ** 2
    ey = (u - dy[:, None]) ** 2
    ap = (ey[:, :, None] + ex[:, None, :]) <= r2  # (n, S, S)
    flux = xp.sum(xp.where(ap, st, 0.0), axis=(1, 2))
    npix = xp.sum(ap & inside & ~st_bad, axis=(1, 2)).astype(xp.float64)
    sig_src = _gather(sig, b)
    shot = xp.maximum(flux, 0.0)  # the source's photon noise: e-, or image units per e- times it
    if pois is not None and not (isinstance(pois, float) and pois == 1.0):
        shot = shot * _gather(pois, b)
    fluxerr = xp.sqrt(npix * sig_src * sig_src + shot)
    snr = xp.where(fluxerr > 0, flux / xp.where(fluxerr > 0, fluxerr, 1.0), 0.0)
    flag = (xp.where(xp.any(ap & st_bad, axis=(1, 2)), FLAG_MASKED, 0)
            | xp.where(xp.any(ap & ~inside, axis=(1, 2)), FLAG_EDGE, 0)).astype(xp.int32)
    peak = xp.max(xp.reshape(st[:, half - 1:half + 2, half - 1:half + 2], (n, 9)), axis=-1)

    return Sources(image=b.astype(xp.int64), x=xi.astype(xp.float64) + dx, y=yi.astype(xp.float64) + dy,
                   flux=flux, fluxerr=fluxerr, snr=snr, peak=peak, a=a_ax, b=b_ax, theta=theta, flag=flag)
