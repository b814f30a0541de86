"""Typed records that travel between the stages of the chain.

Conventions everywhere: images are ``(ny, nx)`` numpy (or cupy) arrays, 0-based pixel coordinates
with ``x`` the column and ``y`` the row (so a source at ``(x, y)`` sits in ``image[round(y), round(x)]``);
calibrated images are in electrons (e-), variances in e-^2.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from nightsift.kernels.tiles import TileGrid


class MaskBits(enum.IntFlag):
    """Bit flags of the ``uint16`` pixel masks."""

    BAD = 1  #: bad pixel from the calibration frames (hot pixel, dead/low-response column)
    SAT = 2  #: saturated or bleed trail
    NO_DATA = 4  #: no data (outside the reference footprint after alignment, NaN input)
    CR = 8  #: cosmic ray (when a detector flags it)
    EDGE = 16  #: within a PSF stamp of the CCD edge

    @classmethod
    def describe(cls, value: int) -> list[str]:
        return [b.name for b in cls if value & b]


#: mask bits that make a pixel unusable for subtraction
UNUSABLE = int(MaskBits.BAD | MaskBits.SAT | MaskBits.NO_DATA)


def unusable_of(masks):
    """Boolean map (same shape) of the :data:`UNUSABLE` pixels of a mask or a batch of masks."""
    return (masks & UNUSABLE) != 0


@dataclass(frozen=True)
class RawFrame:
    """A raw CCD frame as read from disk.

    Attributes
    ----------
    data : ndarray (ny, nx) float32, ADU
    header : astropy.io.fits.Header
        Must carry a celestial WCS, ``GAIN`` (e-/ADU), ``SATURATE`` (ADU), ``EXPTIME`` (s).
    path : str or None
        Where it was read from, for error messages.
    """

    data: np.ndarray
    header: fits.Header
    path: str | None = None


@dataclass(frozen=True)
class CalibrationFrames:
    """Raw calibration frames of one CCD, stacks of shape ``(n, ny, nx)`` in ADU.

    ``dark_exptime`` is the exposure time of the dark frames (s); flats are raw dome/twilight
    flats (bias included).
    """

    bias: np.ndarray
    dark: np.ndarray
    flat: np.ndarray
    dark_exptime: float


@dataclass(frozen=True)
class Exposure:
    """A calibrated image with its uncertainty and mask.

    Attributes
    ----------
    image : ndarray (ny, nx) float32, e-
        Calibrated image, background *not* subtracted.
    variance : ndarray (ny, nx) float32, e-^2
        Per-pixel variance of ``image`` (Poisson + read + dark), in the white-noise sense
        (resampling propagates it with the interpolation weights, not their squares).
    mask : ndarray (ny, nx) uint16
        :class:`MaskBits` flags.
    wcs : astropy.wcs.WCS
        Celestial WCS of ``image`` (pixel origin 0 when used through ``*_world2pix(..., 0)``).
    header : astropy.io.fits.Header
        Metadata (EXPTIME, FILTER, MJD-OBS, CCDNUM, GAIN, ...).
    path : str or None
        Source file, for error messages.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS
    header: fits.Header
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its typed ``value`` plus a flat dict of QA numbers.

    A stage of a batch of ``B`` CCD-visits gives each QA number as a ``(B,)`` array on the
    device (read back once for the whole chain by :func:`qa_to_host`), a list of ``B`` host
    values, or one host value for all.
    """

    value: Any
    qa: dict[str, Any] = field(default_factory=dict)


def qa_to_host(qas, batch: int) -> list[dict]:
    """Per-CCD QA dicts from batched stage QA (see :class:`StageResult`), with one download.

    Parameters
    ----------
    qas : sequence of dict
        QA dicts of a batch's stages, in chain order (later keys win).
    batch : int
        ``B``.

    Returns
    -------
    list of B dicts of Python numbers/strings.
    """
    from nightsift.kernels._xp import array_namespace, to_host

    out = [dict() for _ in range(batch)]
    dev_keys, dev_vals = [], []
    for qa in qas:
        for k, v in qa.items():
            if isinstance(v, (list, tuple)):
                for b in range(batch):
                    out[b][k] = _plain(v[b])
            elif v is None or isinstance(v, (str, bool, int, float, np.generic)) or np.ndim(v) == 0 and \
                    isinstance(v, np.ndarray):
                for b in range(batch):
                    out[b][k] = _plain(v)
            elif isinstance(v, np.ndarray):
                for b in range(batch):
                    out[b][k] = _plain(v.reshape(-1)[b] if v.size == batch else v)
            else:  # a device array (B,)
                dev_keys.append(k)
                dev_vals.append(v)
    if dev_vals:
        xp = array_namespace(*dev_vals)
        host = to_host(xp.stack([xp.reshape(v, (-1,)).astype(xp.float64) for v in dev_vals]), label="qa")
        for k, row, v in zip(dev_keys, host, dev_vals):
            for b in range(batch):
                out[b][k] = int(row[b]) if v.dtype.kind in "iub" else float(row[b])
    return out


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    return v


#: The candidate table returned by the detection stage (one row per candidate), as a numpy
#: structured array. Field names follow the ZTF candidate schema where one exists.
CANDIDATE_DTYPE = np.dtype(
    [
        ("candid", "i8"),  # unique id: (visit, ccd, index) packed, see engine.stages.detect
        ("xpos", "f8"),  # x of the candidate on the science grid (0-based column, pixels)
        ("ypos", "f8"),  # y (0-based row, pixels)
        ("ra", "f8"),  # right ascension (deg, ICRS)
        ("dec", "f8"),  # declination (deg)
        ("flux", "f8"),  # PSF-fit flux in the difference, science units (e-); negative if isdiffpos=False
        ("fluxerr", "f8"),  # 1-sigma error of flux (e-), source noise included
        ("magpsf", "f8"),  # -2.5 log10(|flux| / EXPTIME) + zero point (mag)
        ("sigmapsf", "f8"),  # 1.0857 fluxerr / |flux| (mag)
        ("snr", "f8"),  # |flux| / fluxerr
        ("scorr", "f8"),  # peak value of S_corr (signed, sigma)
        ("fwhm", "f8"),  # FWHM of the candidate in the difference image (pixels)
        ("elong", "f8"),  # a/b of the candidate's second moments in the difference (>= 1)
        ("nbad", "i4"),  # bad/saturated/no-data pixels in the 5x5 box around the candidate
        ("isdiffpos", "?"),  # True: science brighter than reference (positive in D)
        ("distnr", "f8"),  # distance to the nearest reference-image source (pixels); -999 if none
        ("magnr", "f8"),  # magnitude of that reference source (mag); -999 if none
        ("sky", "f8"),  # local background of the science image (e-)
        ("edge", "?"),  # True if any cutout is padded because it crosses the CCD edge
    ]
)


#: header keys of the photometric zero point (mag giving 1 e-/s), in order of preference
ZERO_POINT_KEYS = ("MAGZP", "MAGZPT", "MAGZERO")

#: candid = (visit * CANDID_CCD + ccd) * CANDID_INDEX + index: unique per (visit, ccd, candidate) and
#: deterministic, so a rerun of a CCD-visit reproduces its alert ids
CANDID_CCD = 1000
CANDID_INDEX = 100000
#: largest visit number that keeps candid within int64
MAX_VISIT = (np.iinfo(np.int64).max // CANDID_INDEX - CANDID_CCD) // CANDID_CCD


def make_candid(visit: int, ccd: int, index) -> np.ndarray:
    """Candidate ids (int64) from the visit, the CCD (< 1000) and the row numbers (< 100000)."""
    return (np.int64(visit) * CANDID_CCD + np.int64(ccd)) * CANDID_INDEX + np.asarray(index, dtype=np.int64)


def difference_sign(candidates: np.ndarray) -> np.ndarray:
    """+1 for positive candidates, -1 for negative ones (float32, shape (n,)).

    The ZTF convention for the difference cutout, which nightsift's alerts and classifier follow
    (and braai was trained on): a negative candidate's difference cutout is reference minus
    science, so a real candidate's centre is positive whatever its sign; ``isdiffpos`` carries
    the sign. Pass it as ``extract_triplets(..., difference_sign=difference_sign(cands))``.
    """
    return np.where(np.asarray(candidates["isdiffpos"], bool), 1.0, -1.0).astype(np.float32)


def empty_candidates(n: int = 0) -> np.ndarray:
    """A candidate table of ``n`` zeroed rows (``n=0`` is the valid 'no detections' result)."""
    return np.zeros(n, dtype=CANDIDATE_DTYPE)


# ------------------------------------------------------------------------------------------------
# what the stages hand each other (arrays on the device the chain runs on: numpy or cupy)
# ------------------------------------------------------------------------------------------------
#: the host form of a source catalogue (one row per source; :meth:`SourceCatalog.table`)
SOURCE_DTYPE = np.dtype([("x", "f8"), ("y", "f8"), ("flux", "f8"), ("fluxerr", "f8"), ("snr", "f8"),
                         ("a", "f8"), ("b", "f8"), ("peak", "f8"), ("flag", "i4"), ("psf_star", "?"),
                         ("fwhm_w", "f8"), ("point", "?")])


@dataclass(frozen=True)
class SourceCatalog:
    """Sources of one image, on the device of the image (struct of arrays, one row per source).

    Attributes
    ----------
    x, y : (n,) float64
        0-based windowed centroid (pixels) on the grid of the image the catalogue describes.
    flux, fluxerr, snr : (n,) float64
        Aperture flux (e-), its error, their ratio.
    a, b : (n,) float64
        Semi-axes (px, 1 sigma) of the windowed second moments.
    peak : (n,) float64
        Brightest pixel of the 3x3 core (e-).
    flag : (n,) int32
        1: an unusable pixel in the aperture; 2: the aperture crosses the edge.
    size : (n,) float64
        Adaptive-moment FWHM (px) of bright sources (S/N >= 20), NaN for the others.
    point : (n,) bool
        On the stellar locus (point sources the flux ratio trusts as stars).
    psf_star : (n,) bool
        Stacked into the PSF model.
    """

    x: Any
    y: Any
    flux: Any
    fluxerr: Any
    snr: Any
    a: Any
    b: Any
    peak: Any
    flag: Any
    size: Any
    point: Any
    psf_star: Any

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index) -> "SourceCatalog":
        """Rows ``index`` (device integer or boolean array)."""
        return SourceCatalog(**{k: getattr(self, k)[index] for k in _CATALOG_FIELDS})

    def replace(self, **columns) -> "SourceCatalog":
        d = {k: getattr(self, k) for k in _CATALOG_FIELDS}
        d.update(columns)
        return SourceCatalog(**d)

    def table(self) -> np.ndarray:
        """The catalogue as a host :data:`SOURCE_DTYPE` table (one explicit download)."""
        from nightsift.kernels._xp import array_namespace, to_host

        n = len(self)
        out = np.zeros(n, SOURCE_DTYPE)
        if n == 0:
            return out
        xp = array_namespace(self.x)
        cols = ("x", "y", "flux", "fluxerr", "snr", "a", "b", "peak", "flag", "size", "point", "psf_star")
        host = to_host(xp.stack([getattr(self, k).astype(xp.float64) for k in cols]), label="catalog")
        names = dict(size="fwhm_w")
        for k, v in zip(cols, host):
            out[names.get(k, k)] = v
        return out


_CATALOG_FIELDS = ("x", "y", "flux", "fluxerr", "snr", "a", "b", "peak", "flag", "size", "point", "psf_star")


@dataclass(frozen=True)
class PSFModel:
    """Empirical PSFs of one image, one per tile of ``grid`` (device arrays).

    Attributes
    ----------
    stamps : (T, s, s) float64
        Unit-sum PSF stamps, centre pixel ``s // 2``.
    fwhm : (T,) float64
        FWHM (px) of each tile's PSF (pixel-integrated Moffat fit).
    apcorr : (T,) float64
        Aperture correction: total flux of a point source / its PSF-fit flux with the unit-sum
        stamp (1.00-1.02 typically; 1 where the fit cannot be trusted).
    n_stars : (T,) int64
        Stars stacked into each tile's PSF.
    grid : TileGrid
        The tiling the PSFs belong to.
    locus : float
        Adaptive-moment FWHM (px) of the stellar locus the PSF stars were chosen around.
    """

    stamps: Any
    fwhm: Any
    apcorr: Any
    n_stars: Any
    grid: TileGrid
    locus: float = float("nan")

    def tile_of(self, x, y):
        """Tile index (device int64) of pixel positions ``(x, y)`` (device arrays)."""
        from nightsift.kernels.tiles import tile_index

        return tile_index(self.grid, x, y)


@dataclass(frozen=True)
class ImagePSF:
    """What the chain learns about one image on the science grid.

    Attributes
    ----------
    sky : (ny, nx) float32, e-
        Smooth background (zeros for an aligned reference, which is background-subtracted
        before it is resampled).
    sky_sigma : float, e-
        Robust background noise per pixel.
    catalog : SourceCatalog
        Sources (science grid positions).
    model : PSFModel
        Per-tile PSFs on the science tile grid.
    """

    sky: Any
    sky_sigma: float
    catalog: SourceCatalog
    model: PSFModel


@dataclass(frozen=True)
class Subtraction:
    """ZOGY products on the science pixel grid (device arrays).

    Attributes
    ----------
    D : (ny, nx) float32
        Proper difference image (unit-variance white noise on blank sky), in units of F_D.
    difference : (ny, nx) float32
        ``D / F_D``: the difference in science flux units (e-), what the cutouts show.
    S_corr : (ny, nx) float32
        Corrected score (sigma); 0 on the grown mask.
    flux : (ny, nx) float32
        ``apcorr * S / F_S``: total flux (e-, science units) of a point source centred on each pixel.
    flux_err : (ny, nx) float32
        1-sigma error of ``flux`` (background, source and astrometric noise).
    P_D : (T, s, s) float64
        PSF of D per tile (unit sum, centre pixel s // 2).
    F_D, F_S : (T,) float64
        Flux zero point of D and the normalisation of S per tile.
    mask : (ny, nx) uint16
        Union of the science and aligned-reference masks.
    excluded : (ny, nx) bool
        Pixels where S_corr was zeroed (unusable pixels grown by ``subtract.mask_grow``).
    grid : TileGrid
    F_r : float
        Reference flux zero point relative to the science (F_n = 1).
    apcorr : (T,) float64
        Aperture correction of the science PSF per tile, applied to ``flux``/``flux_err``.
    """

    D: Any
    difference: Any
    S_corr: Any
    flux: Any
    flux_err: Any
    P_D: Any
    F_D: Any
    F_S: Any
    mask: Any
    excluded: Any
    grid: TileGrid
    F_r: float
    apcorr: Any = None


@dataclass(frozen=True)
class ReferenceModel:
    """A CCD's reference, measured once in its own frame and kept resident (device arrays).

    Attributes
    ----------
    image : (ny_r, nx_r) float32, e-
        The reference image with its background subtracted (``sky_subtracted``), unusable pixels
        (BAD, NO_DATA, non-finite) filled with a typical value so resampling cannot ring.
    variance : (ny_r, nx_r) float32, e-^2
        Its variance, unusable pixels filled likewise.
    mask : (ny_r, nx_r) uint16
        :class:`MaskBits`.
    wcs, header, path
        Of the reference exposure.
    sky_sigma : float, e-
        Robust background noise per pixel.
    catalog : SourceCatalog
        Sources on the reference grid (with their stellar-locus flags).
    astro : (n,) bool
        Bright isolated catalogue sources for the astrometric residuals.
    psf : PSFModel or None
        Per-tile PSFs on the reference's own tile grid (None when only alignment is wanted).
    sky_subtracted : bool
        Whether ``image`` is background-subtracted (the chain's references always are).
    """

    image: Any
    variance: Any
    mask: Any
    wcs: WCS
    header: fits.Header
    path: str | None
    sky_sigma: float
    catalog: SourceCatalog
    astro: Any
    psf: PSFModel
    sky_subtracted: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class SubtractionBatch:
    """ZOGY products of a batch of B CCDs: the arrays of :class:`Subtraction` stacked, ``(B, ny, nx)``
    images and ``(B * T, ...)`` per-tile values (CCD-major). :meth:`ccd` gives one CCD's view."""

    D: Any
    difference: Any
    S_corr: Any
    flux: Any
    flux_err: Any
    mask: Any
    excluded: Any
    P_D: Any
    F_D: Any
    F_S: Any
    apcorr: Any
    grid: TileGrid
    F_r: tuple
    #: each CCD's own PSF stamp side (P_D is stored at the batch's largest, zero-padded): what a
    #: CCD's features are measured with, so they do not depend on the CCDs batched with it
    stamp: tuple = ()

    def __len__(self) -> int:
        return int(self.D.shape[0])

    def ccd(self, b: int) -> Subtraction:
        T = len(self.grid)
        t = slice(b * T, (b + 1) * T)
        P_D = self.P_D[t]
        if self.stamp and self.stamp[b] < P_D.shape[-1]:
            h = (P_D.shape[-1] - self.stamp[b]) // 2
            P_D = P_D[:, h:h + self.stamp[b], h:h + self.stamp[b]]
        return Subtraction(D=self.D[b], difference=self.difference[b], S_corr=self.S_corr[b], flux=self.flux[b],
                           flux_err=self.flux_err[b], P_D=P_D, F_D=self.F_D[t], F_S=self.F_S[t],
                           mask=self.mask[b], excluded=self.excluded[b], grid=self.grid, F_r=float(self.F_r[b]),
                           apcorr=self.apcorr[t])
