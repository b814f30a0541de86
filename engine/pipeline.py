"""The chain, top to bottom, for a batch of CCD-visits on the device their data live on.

::

    raw frames (host)  --upload-->  calibrate -> measure (background, sources) -> align (reference
    resampled, its catalogue carried, registration measured) -> PSF (science stars; the reference's
    PSF carried) -> flux ratio -> ZOGY (all tiles of all CCDs at once) -> detect -> cutouts
    --download-->  candidate tables, triplets, QA (host)  ->  classify -> package (Avro)

:func:`process_visit` runs ``B`` CCD-visits at once; every stage takes and returns arrays of the
module the CCDs' statics live on (numpy on a CPU, cupy on a GPU): the array module comes from
the arrays, never from a flag. The host sees the raw frames going in and the candidate tables,
triplets and QA coming out; every crossing goes through :mod:`nightsift.kernels._xp` and is
counted in the QA (``xfer_*``). Work that is the same for every visit of a CCD -- its master
calibration, and its reference's background, catalogue and PSF measured in the reference's own
frame -- is done once by :func:`prepare_statics` and kept on the device.

:func:`process_ccd` (a raw frame, B = 1) and :func:`process_pair` (a calibrated science
exposure and a reference, what ``nightsift subtract`` reads) are the same chain. A CCD whose
data fail a stage (:class:`~nightsift.engine.errors.SkipCCD`,
:class:`~nightsift.engine.errors.AlgorithmFailure`) is recorded as such and leaves the batch;
the others go on.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from nightsift.kernels._xp import array_namespace, count_transfers, host_scalars, is_cupy, to_device, to_host
from nightsift.kernels.tiles import make_grid

from .config import Config
from .errors import AlgorithmFailure, InputError, NightsiftError, SkipCCD
from .io.avro import alert_path, write_alerts
from .io.fits import celestial_wcs, check_same_shape, input_qa, replace_wcs
from .io.units import poisson_scale_of
from .io.psf_files import read_psf
from .records import (Exposure, ImagePSF, MaskBits, RawFrame, ReferenceModel, SourceCatalog,
                      StageResult, Subtraction, unusable_of)
from .stages.align import AlignedReference, align_reference, astrometric_stars, coarse_map
from .stages.calibrate import (MasterCalibration, calibrate_frames, calibrated_header, frame_params, master_on)
from .stages.cutouts import cut_triplets
from .stages.detect import DETECTION_COLUMNS, candidate_tables, detect, pixel_scale_arcsec
from .stages.measure import fwhm_guess, header_seeing, measure_images
from .stages.package import _julian_date, build_alerts
from .stages.psf import carry_psf, measure_psf, psf_warnings
from .stages.psf_given import given_psf
from .stages.subtract import decide_flux_ratio, flux_ratio, flux_ratio_warning, subtract, zero_point_flux_ratio

__all__ = ["CCDStatics", "VisitFrame", "CCDResult", "CCDProducts", "prepare_statics", "process_visit",
           "package_results", "process_ccd", "process_pair", "align_exposures", "STAGES"]

log = logging.getLogger(__name__)

#: the stages whose wall times (``t_<stage>``, s) every CCD-visit's QA carries: the wall time of the
#: stage for the whole batch the CCD-visit ran in (divide by ``batch_size`` for a per-CCD share)
STAGES = ("upload", "calibrate", "measure", "align", "psf", "flux_ratio", "subtract", "detect", "cutouts",
          "download", "classify", "package", "write")


# ------------------------------------------------------------------------------------------------
# what goes in and what comes out
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CCDStatics:
    """What a worker keeps resident for one CCD between visits (on its device).

    Attributes
    ----------
    ccd : int
    reference : ReferenceModel
        The reference measured once in its own frame (:func:`prepare_statics`).
    master : MasterCalibration or None
        Master calibration (float32 planes, uint16 mask) for raw frames; None for a CCD whose
        science frames arrive calibrated.
    ref_psf_source : str
        ``"measured"``, or ``"file:<name>"`` for a reference PSF given from a file (QA
        ``psf_source_ref``).
    ref_psf_warnings : tuple of str
        What reading that file had to warn about (each CCD-visit's QA ``warnings`` repeats it).
    ref_psf_qa : dict
        The reference's PSF-stage QA in its own frame (``ref_psf_*`` host numbers: candidates,
        stamp, locus floored, crowded retry, ...), repeated in each CCD-visit's QA; the values the
        carried model gives on the science tiles (FWHM, stars) replace those of the same name.
    """

    ccd: int
    reference: ReferenceModel
    master: MasterCalibration | None = None
    ref_psf_source: str = "measured"
    ref_psf_warnings: tuple[str, ...] = ()
    ref_psf_qa: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Device bytes of the resident planes."""
        n = 0
        r = self.reference
        for a in (r.image, r.variance, r.mask) + ((r.psf.stamps,) if r.psf is not None else ()):
            n += int(a.nbytes)
        if self.master is not None:
            for a in (self.master.bias, self.master.dark_rate, self.master.flat, self.master.bad_pixel_mask):
                n += int(a.nbytes)
        return n


@dataclass(frozen=True)
class VisitFrame:
    """One CCD of one visit going into :func:`process_visit`: a raw frame, or a calibrated exposure.

    Attributes
    ----------
    visit, ccd : int
        Identify the CCD-visit: they name the alert file (a rerun replaces it) and the candids.
    raw : RawFrame, optional
        Raw science frame (ADU, host) -- calibrated with the CCD's master.
    science : Exposure, optional
        Calibrated science exposure (e-), instead of ``raw``.
    truth : structured ndarray, optional
        Injected transients (``x``, ``y`` 0-based px, ``flux`` e-) of a simulated frame: the
        chain reports their expected S/N (:attr:`CCDResult.truth_snr`).
    psf : str, optional
        PSF file of this frame (:func:`nightsift.engine.io.psf_files.read_psf`), used instead of
        measuring its PSF (QA ``psf_source_sci``); None = measure.
    """

    visit: int
    ccd: int
    raw: RawFrame | None = None
    science: Exposure | None = None
    truth: np.ndarray | None = field(default=None, repr=False)
    psf: str | None = None

    @property
    def path(self) -> str | None:
        src = self.raw if self.raw is not None else self.science
        return getattr(src, "path", None)


@dataclass(frozen=True)
class CCDProducts:
    """The images behind a CCD's alerts, on the host (kept only when asked: they are large)."""

    science: Exposure
    reference: Exposure  #: aligned onto the science grid (background-subtracted)
    subtraction: Subtraction
    sci_psf: ImagePSF
    ref_psf: ImagePSF


@dataclass(frozen=True)
class CCDResult:
    """Outcome of one CCD-visit.

    Attributes
    ----------
    visit, ccd : int
    status : str
        ``"done"``, ``"skipped"`` (SkipCCD) or ``"failed"`` (AlgorithmFailure / InputError).
    candidates : CANDIDATE_DTYPE array (empty unless done)
    triplets : ndarray (n, s, s, 3) float32
        The cutouts the scorer saw and the packets carry.
    scores : dict of str to ndarray (n,)
        Classifier outputs (empty without a scorer).
    alerts_path : Path or None
        The Avro file written (``None`` when ``write=False`` or not done).
    n_alerts : int
    qa : dict
        Every stage's QA numbers, ``t_<stage>`` wall times (s) and the crossings (``xfer_*``).
    products : CCDProducts or None
    error : NightsiftError or None
        Why the CCD-visit was skipped or failed.
    truth_snr : ndarray or None
        For a frame with injected truth: each transient's expected S/N, ``|flux|`` over the PSF-flux
        error at its position (what :func:`nightsift.engine.truth.expected_snr` computes from the
        error map, without bringing the map to the host).
    header : astropy.io.fits.Header or None
        The science header the packets are made from.
    shape : (ny, nx)
        The CCD's shape.
    quicklook : ndarray (4, h, w) float32 or None
        Science less its background, aligned reference, difference and S_corr binned for display
        (:func:`nightsift.engine.report.display_bin`), when ``package.quicklook`` asks for them.
    """

    visit: int
    ccd: int
    status: str = "done"
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0))
    triplets: np.ndarray | None = None
    scores: dict = field(default_factory=dict)
    alerts_path: Path | None = None
    n_alerts: int = 0
    qa: dict = field(default_factory=dict)
    products: CCDProducts | None = None
    error: NightsiftError | None = None
    truth_snr: np.ndarray | None = None
    header: object = field(default=None, repr=False)
    shape: tuple = ()
    quicklook: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------
# statics: once per CCD
# ------------------------------------------------------------------------------------------------
def _grid(shape, config: Config):
    return make_grid(shape, core=config.subtract.tile_size, margin=config.subtract.tile_margin)


def prepare_statics(reference: Exposure, master: MasterCalibration | None = None, *, config: Config, xp=np,
                    ccd: int = 0, subtract_sky: bool = True, with_psf: bool = True,
                    psf_file: str | None = None) -> CCDStatics:
    """Measure a CCD's reference once, in its own frame, and put its statics on ``xp``'s device.

    Parameters
    ----------
    reference : Exposure
        Calibrated reference (e-, e-^2, mask, WCS); host arrays.
    master : MasterCalibration, optional
        The CCD's master calibration (host), for raw science frames.
    config : Config
    xp : numpy or cupy
        Where the CCD's work will run (``nightsift.engine.backend.get_backend``).
    ccd : int
    subtract_sky : bool
        Keep the reference background-subtracted (the chain's references always are).
    with_psf : bool
        Measure the reference's PSF (the chain needs it; alignment alone does not).
    psf_file : str, optional
        The reference's PSF from this file (:func:`nightsift.engine.io.psf_files.read_psf`, on
        the reference's pixels) instead of measuring it (``with_psf`` only).

    Returns
    -------
    CCDStatics

    Raises
    ------
    AlgorithmFailure
        The reference has too few PSF stars (naming the file).
    InputError
        Its planes differ in shape; its PSF file is not a usable PSF (naming that file).
    """
    for name in ("variance", "mask"):
        check_same_shape(np.shape(reference.image), np.shape(getattr(reference, name)),
                         (f"{reference.path}[IMAGE]", f"{reference.path}[{name.upper()}]"))
    image = to_device(reference.image, xp, dtype=np.float32, label="statics")[None]
    variance = to_device(reference.variance, xp, dtype=np.float32, label="statics")
    mask = to_device(reference.mask, xp, dtype=np.uint16, label="statics")
    guess = fwhm_guess(reference.header, config.psf.default_fwhm)
    meas = measure_images(image, mask[None], fwhm=[guess], config=config.psf, prefix="ref_",
                          poisson_scale=_poisson([reference.header])).value
    model, catalog, source, notes, psf_qa = None, meas.catalogs[0], "measured", [], {}
    if with_psf:
        model, catalog, source, notes, psf_qa = _reference_psf(meas, mask, reference, guess, config, psf_file)
    locus = model.locus if model is not None and np.isfinite(model.locus) else guess
    astro = astrometric_stars(catalog, radius=config.align.isolation_fwhm * locus)
    if model is not None:  # point sources only: a galaxy core's centroid moves with a transient on it
        astro = astro & catalog.point
    # reference planes ready for resampling: flagged-bad / no-data / non-finite pixels get a
    # neutral value (0 on a background-subtracted image; the median variance) so they cannot ring
    img = image[0] - meas.sky[0] if subtract_sky else image[0]
    junk = ((mask & int(MaskBits.BAD | MaskBits.NO_DATA)) != 0) | ~xp.isfinite(img) | ~xp.isfinite(variance)
    sub = (slice(None, None, 4), slice(None, None, 4))
    typical_img = xp.nanmedian(xp.where(junk[sub], xp.nan, img[sub]))
    typical_var = xp.nanmedian(xp.where(junk[sub], xp.nan, variance[sub]))
    img = xp.where(junk, xp.nan_to_num(typical_img).astype(xp.float32), img).astype(xp.float32)
    var = xp.where(junk, xp.nan_to_num(typical_var, nan=1.0).astype(xp.float32), variance).astype(xp.float32)
    sigma = host_scalars(meas.sky_sigma[0])[0]
    ref = ReferenceModel(image=img, variance=var, mask=mask, wcs=reference.wcs, header=reference.header,
                         path=reference.path, sky_sigma=sigma, catalog=catalog, astro=astro, psf=model,
                         sky_subtracted=subtract_sky)
    return CCDStatics(ccd=ccd, reference=ref, master=None if master is None else master_on(master, xp),
                      ref_psf_source=source, ref_psf_warnings=tuple(notes), ref_psf_qa=_host_qa(psf_qa))


def _poisson(headers) -> list[float] | None:
    """Image units per e- of each image (``NSPOISS``: flux units kept by read_exposure), or ``None``
    when every image is in e- (the stages' source-Poisson terms then stay as they always were)."""
    scales = [poisson_scale_of(h) for h in headers]
    return None if all(v == 1.0 for v in scales) else scales


def _host_qa(qa: dict) -> dict:
    """A one-image stage QA (values or 1-lists, host or device) as host numbers (one read)."""
    vals = {k: _pick(v, 0, 1) for k, v in qa.items()}
    dev = [k for k, v in vals.items() if _is_device(v)]
    if dev:
        vals.update(zip(dev, host_scalars(*(vals[k] for k in dev))))
    return {k: _plain(v) for k, v in vals.items()}


def _reference_psf(meas, mask, reference: Exposure, guess: float, config: Config, psf_file: str | None):
    """The reference's PSF model, its catalogue (point sources flagged), where the PSF came from
    (measured, or given in ``psf_file``: ``"file:<name>"``), the file's warnings and the stage's QA."""
    grid = _grid(reference.shape, config)
    if psf_file:
        notes: list[str] = []
        given = read_psf(psf_file, grid, pixel_scale=pixel_scale_arcsec(reference.wcs), warn=notes.append)
        res = given_psf(meas.image, mask[None], meas.catalogs, [given], config=config.psf, prefix="ref_")
        return (*res.value[0], f"file:{Path(psf_file).name}", notes, res.qa)
    res = measure_psf(meas.image, mask[None], meas.catalogs, [meas.sky_sigma[0]], grid, config=config.psf,
                      fwhm_guess=[guess], paths=[reference.path], prefix="ref_",
                      poisson_scale=_poisson([reference.header]))
    out = res.value[0]
    if isinstance(out, AlgorithmFailure):
        raise out
    return (*out, "measured", [], res.qa)


# ------------------------------------------------------------------------------------------------
# the visit chain
# ------------------------------------------------------------------------------------------------
class _Batch:
    """The CCD-visits of one call: per-CCD host state, the alive ones, QA collected lazily."""

    def __init__(self, frames, statics):
        self.frames = list(frames)
        self.statics = list(statics)
        self.alive = list(range(len(self.frames)))
        self.errors: dict[int, NightsiftError] = {}
        self.qa_entries: list[tuple[list[int], dict]] = []
        self.times = {i: {} for i in range(len(self.frames))}
        self.warnings: dict[int, list[str]] = {i: [] for i in range(len(self.frames))}

    def fail(self, i: int, exc: NightsiftError) -> None:
        self.errors[i] = exc
        self.qa_entries.append(([i], {k: [v] for k, v in getattr(exc, "qa", {}).items()}))

    def qa(self, qa: dict, members: list[int] | None = None) -> None:
        """Record a stage's QA for ``members`` (default: the alive CCDs), values per member."""
        self.qa_entries.append((list(self.alive if members is None else members), qa))

    def warn(self, i: int, message: str) -> None:
        """Record a loud one-line warning for CCD-visit ``i`` (QA key ``"warnings"``, also logged)."""
        self.warnings[i].append(message)
        f = self.frames[i]
        log.warning("visit %s ccd %s: %s", f.visit, f.ccd, message)

    def time(self, name: str, seconds: float, members=None) -> None:
        for i in (self.alive if members is None else members):
            self.times[i][f"t_{name}"] = round(seconds, 4)

    def resolve_qa(self) -> list[dict]:
        """Per-CCD QA dicts with every device value read back in one copy."""
        out = [dict() for _ in self.frames]
        dev = []  # (ccd, key, device array element)
        for members, qa in self.qa_entries:
            for k, v in qa.items():
                for j, i in enumerate(members):
                    val = _pick(v, j, len(members))
                    if _is_device(val):
                        dev.append((i, k, val))
                    else:
                        out[i][k] = _plain(val)
        if dev:
            xp = array_namespace(*(v for _, _, v in dev))
            flat = to_host(xp.stack([xp.reshape(v, ()).astype(xp.float64) for _, _, v in dev]), label="qa")
            for (i, k, v), h in zip(dev, flat.tolist()):
                out[i][k] = int(h) if v.dtype.kind in "iub" and np.isfinite(h) else float(h)
        for i in range(len(out)):
            out[i].update(self.times[i])
            out[i]["warnings"] = list(self.warnings[i])
        return out


def _is_device(v) -> bool:
    """A device array (cupy, the strict stand-in): array-like, not numpy."""
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (np.ndarray, np.generic))


def _pick(v, j: int, n: int):
    """Member ``j``'s value of a QA entry: a per-member list/array, or one value for all."""
    if isinstance(v, (list, tuple)):
        return v[j]
    if _is_device(v) or isinstance(v, np.ndarray):
        if v.ndim == 0:
            return v
        return v[j]
    return v


def _plain(v):
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item()
    return v


class _Clock:
    def __init__(self, xp, sync: bool):
        self.xp, self.sync = xp, sync
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.sync and is_cupy(self.xp):
            self.xp.cuda.get_current_stream().synchronize()
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt


def _take(arrays: dict, idx: list[int], xp) -> dict:
    """Keep batch rows ``idx`` of every (B, ...) array (one gather each; only after a failure)."""
    sel = to_device(np.asarray(idx, np.int64), xp, label="batch_index")
    return {k: v[sel] for k, v in arrays.items()}


def process_visit(frames: Sequence[VisitFrame], statics: Sequence[CCDStatics], *, config: Config, scorer=None,
                  write: bool = True, keep_products: bool = False, package: bool = True) -> list[CCDResult]:
    """Run the chain on a batch of CCD-visits.

    Parameters
    ----------
    frames : sequence of B VisitFrame
        Raw frames (with ``statics[i].master``) or calibrated exposures; one image shape.
    statics : sequence of B CCDStatics
        Each frame's CCD statics (:func:`prepare_statics`), all on one device: the chain runs there.
    config : Config
    scorer : callable, optional
        ``scorer(triplets (n, 63, 63, 3)) -> dict[str, ndarray (n,)]`` (e.g. real/bogus), stored in
        the packets; its ``versions`` attribute, when present, fills ``rbversion``/``drbversion``
        (see :func:`nightsift.engine.classify.runtime.pipeline_scorer`).
    write : bool
        Write each CCD-visit's Avro alert file to ``config.package.output_dir``.
    keep_products : bool
        Bring the images (science, aligned reference, D, S_corr, ...) back to the host in the
        results (large: for tools and tests, not for a night).
    package : bool
        Score, package and write here (:func:`package_results`). ``False`` returns as soon as the
        device work is done (candidates, triplets, QA), for an engine that packages in a CPU pool
        while the device runs the next batch.

    Returns
    -------
    list of B CCDResult, in the order of ``frames``; a CCD that failed a stage has its status and
    ``error`` (the others are unaffected).
    """
    if len(frames) != len(statics):
        raise ValueError(f"process_visit: {len(frames)} frames for {len(statics)} statics")
    wrong = [(f.ccd, s.ccd) for f, s in zip(frames, statics) if f.ccd != s.ccd]
    if wrong:  # another CCD's reference would be subtracted: never silently
        raise ValueError(f"process_visit: frames and statics of different CCDs (frame ccd, statics ccd): {wrong}")
    if not frames:
        return []
    xp = array_namespace(*(s.reference.image for s in statics))
    batch = _Batch(frames, statics)
    with count_transfers() as ledger:
        arrays = _run(batch, xp, config=config, keep_products=keep_products)
        results = _finish(batch, arrays, xp, config=config)
    B = len(frames)
    xq = ledger.as_qa()
    for r in results:  # the batch's crossings, shared out per CCD-visit
        r.qa.update({k: v / B if "bytes" in k else v for k, v in xq.items()})
        r.qa["batch_size"] = B
    if package:
        results = package_results(results, config=config, scorer=scorer, write=write)
    return results


def _host_checks(batch: _Batch, config: Config):
    """Per-frame host work before anything is uploaded: header numbers, WCS, shapes, time."""
    prepared = {}
    for i in list(batch.alive):
        f, st = batch.frames[i], batch.statics[i]
        try:
            if (f.raw is None) == (f.science is None):
                raise InputError("a visit frame needs exactly one of raw or science", path=f.path)
            src = f.raw if f.raw is not None else f.science
            _same_file(f.path, st.reference.path)
            header = src.header
            plane = src.data if f.raw is not None else src.image  # host, or uploaded ahead by an engine
            shape = tuple(plane.shape if hasattr(plane, "shape") else np.shape(plane))
            if f.raw is not None:
                if st.master is None:
                    raise InputError("raw frame but no master calibration for its CCD", path=f.path)
                params = frame_params(f.raw, st.master)
                if _no_finite_pixel(f.raw.data):
                    raise InputError("raw frame has no finite pixel; drop it", path=f.path)
                wcs = celestial_wcs(header, shape, path=f.path)
                header = calibrated_header(header, params.read_noise)
            else:
                params = None
                wcs = f.science.wcs
            _julian_date(header)  # a packet needs its time: fail now, not after the chain ran
            batch.qa(input_qa(header, "sci_") | input_qa(st.reference.header, "ref_"), [i])
            prepared[i] = dict(params=params, wcs=wcs, header=header, shape=shape,
                               guess=fwhm_guess(header, config.psf.default_fwhm))
            if f.psf:  # a given PSF: read (and refused) before anything is uploaded
                prepared[i]["psf"] = read_psf(f.psf, _grid(shape, config), pixel_scale=pixel_scale_arcsec(wcs),
                                              warn=lambda m, i=i: batch.warn(i, f"sci {m}"))
        except NightsiftError as e:
            batch.fail(i, e)
    batch.alive = [i for i in batch.alive if i in prepared]
    shapes = {prepared[i]["shape"] for i in batch.alive}
    if len(shapes) > 1:
        raise ValueError(f"process_visit: one batch must share one image shape, got {sorted(shapes)}; "
                         "group CCD-visits by shape")
    return prepared


def _no_finite_pixel(data) -> bool:
    """A float raw frame without one finite pixel: checked in host memory (cheap), or on the device
    for a frame an engine uploaded ahead of its batch (one scalar read)."""
    if np.dtype(data.dtype).kind != "f":
        return False
    if _is_device(data):
        return not host_scalars(array_namespace(data).isfinite(data).any())[0]
    return not np.isfinite(data).any()


def _narrow(batch: _Batch, ok: list[int], xp, arrays: dict, lists: dict) -> tuple[dict, dict]:
    """Keep the CCD-visits at batch positions ``ok`` (the others failed): gather the rows of the
    ``(B, ...)`` device ``arrays`` (only when some failed), pick the items of the per-CCD
    ``lists``, and narrow ``batch.alive`` to match."""
    if len(ok) < len(batch.alive):
        arrays = _take(arrays, ok, xp)
        lists = {k: [v[j] for j in ok] for k, v in lists.items()}
        batch.alive = [batch.alive[j] for j in ok]
    return arrays, lists


def _upload(batch: _Batch, prep: dict, xp, clock: _Clock, config: Config) -> dict:
    """The raw frames up and calibrated (or the calibrated planes up): ``image``, ``variance``,
    ``mask`` as ``(B, ny, nx)`` device arrays."""
    alive = batch.alive
    B = len(alive)
    ny, nx = prep[alive[0]]["shape"]
    raw_mode = batch.frames[alive[0]].raw is not None
    if any((batch.frames[i].raw is not None) != raw_mode for i in alive):
        raise ValueError("process_visit: a batch is either raw frames or calibrated exposures, not both")
    if raw_mode:
        data = xp.empty((B, ny, nx), dtype=np.result_type(*(batch.frames[i].raw.data.dtype for i in alive)))
        for j, i in enumerate(alive):
            data[j] = to_device(batch.frames[i].raw.data, xp, label="raw", pinned=True)
        batch.time("upload", clock.lap())
        res = calibrate_frames(data, [batch.statics[i].master for i in alive], [prep[i]["params"] for i in alive],
                               config=config.calibrate)
        image, variance, mask = res.value
        batch.qa(res.qa)
        del data
    else:
        image = xp.empty((B, ny, nx), xp.float32)
        variance = xp.empty((B, ny, nx), xp.float32)
        mask = xp.empty((B, ny, nx), xp.uint16)
        for j, i in enumerate(alive):
            e = batch.frames[i].science
            image[j] = to_device(e.image, xp, dtype=np.float32, label="science")
            variance[j] = to_device(e.variance, xp, dtype=np.float32, label="science")
            mask[j] = to_device(e.mask, xp, dtype=np.uint16, label="science")
        batch.time("upload", clock.lap())
    batch.time("calibrate", clock.lap())
    return dict(image=image, variance=variance, mask=mask)


def _align(batch: _Batch, prep: dict, catalogs: list, grid, shape, config: Config) -> dict[int, AlignedReference]:
    """Each CCD's reference onto its science grid, its catalogue carried, the registration measured
    (a CCD that cannot be aligned is failed and left out of the result)."""
    aligned: dict[int, AlignedReference] = {}
    for j, i in enumerate(batch.alive):
        st = batch.statics[i]
        try:
            cm = coarse_map(prep[i]["wcs"], st.reference.wcs, shape, step=config.align.map_step)
            cat = catalogs[j]
            astro = astrometric_stars(cat, radius=config.align.isolation_fwhm * prep[i]["guess"])
            r = align_reference(st.reference, cm, sci_catalog=cat, sci_astro=astro, tile_centres=grid.visible_centres(),
                                science_path=batch.frames[i].path, config=config.align)
            aligned[i] = r.value
            batch.qa(r.qa, [i])
        except NightsiftError as e:
            batch.fail(i, e)
    return aligned


def _science_psfs(batch: _Batch, prep: dict, arrays: dict, catalogs: list, grid, xp, config: Config) -> list:
    """Each alive CCD-visit's science PSF (``(PSFModel, SourceCatalog)`` or an AlgorithmFailure, in
    batch order): measured, or given from its frame's PSF file (read by :func:`_host_checks`);
    records the PSF QA and ``psf_source_sci`` / ``psf_source_ref``."""
    alive = batch.alive
    given = [j for j, i in enumerate(alive) if "psf" in prep[i]]
    measured = [j for j in range(len(alive)) if j not in given]
    outs: list = [None] * len(alive)
    for js, run in ((measured, "measure"), (given, "given")):
        if not js:
            continue
        sel = to_device(np.asarray(js, np.int64), xp, label="batch_index") if len(js) < len(alive) else slice(None)
        N, mask, cats = arrays["N"][sel], arrays["mask"][sel], [catalogs[j] for j in js]
        members = [alive[j] for j in js]
        if run == "measure":
            res = measure_psf(N, mask, cats, [arrays["sigma"][j] for j in js], grid, config=config.psf,
                              fwhm_guess=[prep[i]["guess"] for i in members],
                              paths=[batch.frames[i].path for i in members], prefix="sci_",
                              poisson_scale=_poisson([prep[i]["header"] for i in members]))
        else:
            res = given_psf(N, mask, cats, [prep[i]["psf"] for i in members], config=config.psf, prefix="sci_")
        batch.qa(res.qa, members)
        for j, out in zip(js, res.value):
            outs[j] = out
    batch.qa({"psf_source_sci": [f"file:{Path(batch.frames[i].psf).name}" if "psf" in prep[i] else "measured"
                                 for i in alive],
              "psf_source_ref": [batch.statics[i].ref_psf_source for i in alive]})
    for i in alive:
        batch.qa({k: [v] for k, v in batch.statics[i].ref_psf_qa.items()}, [i])
        for w in batch.statics[i].ref_psf_warnings:
            batch.warn(i, f"ref {w}")
    return outs


def _psfs(batch: _Batch, prep: dict, arrays: dict, catalogs: list, aligned: dict, grid, xp,
          config: Config) -> tuple[list[int], dict]:
    """Science PSFs per tile, and each reference's PSF carried onto the same tiles. Returns the
    batch positions that have both, and the per-CCD lists ``sci_psf``, ``ref_psf``, ``sci_cats``,
    ``ref_cats`` (of those positions)."""
    alive = batch.alive
    outs = _science_psfs(batch, prep, arrays, catalogs, grid, xp, config)
    lists = dict(sci_psf=[], ref_psf=[], sci_cats=[], ref_cats=[])
    ok = []
    for j, (i, out) in enumerate(zip(alive, outs)):
        if isinstance(out, AlgorithmFailure):
            batch.fail(i, out)
            lists = {k: v + [None] for k, v in lists.items()}  # keeps positions; dropped by _narrow
            continue
        model, cat = out
        al = aligned[i]
        rp = carry_psf(batch.statics[i].reference.psf, al.tile_centres, al.tile_jacobian, grid,
                       lanczos_order=config.align.lanczos_order)
        for k, v in (("sci_psf", model), ("sci_cats", cat), ("ref_psf", rp), ("ref_cats", al.catalog)):
            lists[k].append(v)
        ok.append(j)
        ref = batch.statics[i].reference
        batch.qa({"ref_psf_fwhm": xp.median(rp.fwhm), "ref_psf_fwhm_min": rp.fwhm.min(),
                  "ref_psf_fwhm_max": rp.fwhm.max(), "ref_psf_apcorr": xp.median(rp.apcorr),
                  "ref_psf_n_stars": ref.catalog.psf_star.sum(), "ref_psf_locus_fwhm": ref.psf.locus}, [i])
    return ok, lists


def _flux_ratios(batch: _Batch, prep: dict, arrays: dict, lists: dict, xp, config: Config) -> tuple[list[int], list]:
    """F_r per CCD from the stars common to both images (one read for the batch), the zero points
    as prior; a CCD whose PSF models are not finite fails here. Returns the batch positions that
    have an F_r, and those F_r."""
    unusable = unusable_of(arrays["mask"] | arrays["mask_R"])
    priors, fr_dev = [], []
    for j, i in enumerate(batch.alive):
        try:
            prior = zero_point_flux_ratio(prep[i]["header"], batch.statics[i].reference.header)
        except NightsiftError as e:
            prior = e
        priors.append(prior)
        sp, rp = lists["sci_psf"][j], lists["ref_psf"][j]
        fr_dev.extend(flux_ratio(arrays["N"][j], arrays["R"][j], sp, rp, lists["sci_cats"][j], lists["ref_cats"][j],
                                 unusable[j], prior=None if isinstance(prior, Exception) else prior,
                                 config=config.subtract))
        # a PSF model must be finite everywhere (a NaN stamp would poison its tile's ZOGY quietly)
        fr_dev.append(xp.isfinite(sp.stamps).all() & xp.isfinite(rp.stamps).all())
        # the PSF widths the plausibility checks read (science, reference carried, reference own)
        fr_dev.extend((xp.median(sp.fwhm), xp.median(rp.fwhm), xp.median(batch.statics[i].reference.psf.fwhm)))
    fr_host = host_scalars(*fr_dev)
    F_r, ok = [], []
    for j, i in enumerate(batch.alive):
        try:
            if isinstance(priors[j], Exception):
                raise priors[j]
            if not fr_host[7 * j + 3]:
                raise AlgorithmFailure(f"{batch.frames[i].path or 'science'}: a PSF model has non-finite values "
                                       "(a tile without a usable star); check the PSF-star selection", stage="psf")
            f, qa = decide_flux_ratio(fr_host[7 * j], int(fr_host[7 * j + 1]), fr_host[7 * j + 2], priors[j],
                                      config=config.subtract, path=batch.frames[i].path)
            _plausibility(batch, i, prep[i], fr_host[7 * j + 4:7 * j + 7], fr_host[7 * j:7 * j + 2], priors[j], config)
            batch.qa({k: [v] for k, v in qa.items()}, [i])
            F_r.append(f)
            ok.append(j)
        except NightsiftError as e:
            batch.fail(i, e)
    return ok, F_r


def _plausibility(batch: _Batch, i: int, prep: dict, fwhms, stars, prior, config: Config) -> None:
    """Loud QA warnings (:meth:`_Batch.warn`) for CCD-visit ``i``: PSF widths (science, reference
    carried, reference own; px) against each header's seeing and each other
    (:func:`~nightsift.engine.stages.psf.psf_warnings`), and the stars' F_r ``(value, n)``
    against the zero points' ``prior`` (:func:`~nightsift.engine.stages.subtract.flux_ratio_warning`)."""
    ref = batch.statics[i].reference
    sci_seen = header_seeing(prep["header"], pixel_scale=pixel_scale_arcsec(prep["wcs"]))
    ref_seen = header_seeing(ref.header, pixel_scale=pixel_scale_arcsec(ref.wcs))
    msgs = psf_warnings(*fwhms, sci_seen, ref_seen, config=config.psf)
    msgs.append(flux_ratio_warning(stars[0], int(stars[1]), prior, config=config.subtract))
    for m in msgs:
        if m:
            batch.warn(i, m)


def _truth_errors(batch: _Batch, flux_err, shape, xp) -> dict:
    """Simulated frames: the PSF-flux error (device) at each injected transient, per CCD."""
    ny, nx = shape
    out = {}
    for j, i in enumerate(batch.alive):
        t = batch.frames[i].truth
        if t is not None and len(t):
            xi = np.clip(np.rint(t["x"]).astype(np.int64), 0, nx - 1)
            yi = np.clip(np.rint(t["y"]).astype(np.int64), 0, ny - 1)
            idx = to_device(np.stack([yi, xi]), xp, label="truth")
            out[i] = flux_err[j][idx[0], idx[1]]
    return out


def _run(batch: _Batch, xp, *, config: Config, keep_products: bool) -> dict:
    """The device half of the chain, stage after stage on the batch's CCD-visits still alive (a
    CCD-visit that fails a stage leaves the batch there); returns the per-batch arrays and per-CCD
    objects :func:`_finish` reads back."""
    clock = _Clock(xp, config.run.sync_stage_times)
    prep = _host_checks(batch, config)
    if not batch.alive:
        return {}
    shape = prep[batch.alive[0]]["shape"]
    arrays = _upload(batch, prep, xp, clock, config)

    res = measure_images(arrays["image"], arrays["mask"], fwhm=[prep[i]["guess"] for i in batch.alive],
                         config=config.psf, prefix="sci_",
                         poisson_scale=_poisson([prep[i]["header"] for i in batch.alive]))
    meas = res.value
    batch.qa(res.qa)
    batch.time("measure", clock.lap())
    arrays.update(N=meas.image, sky=meas.sky, sigma=meas.sky_sigma)

    grid = _grid(shape, config)
    aligned = _align(batch, prep, meas.catalogs, grid, shape, config)
    batch.time("align", clock.lap())
    arrays, lists = _narrow(batch, [j for j, i in enumerate(batch.alive) if i in aligned], xp, arrays,
                            {"cats": meas.catalogs})
    if not batch.alive:
        return {}
    for k, attr in (("R", "image"), ("V_R", "variance"), ("mask_R", "mask")):
        arrays[k] = xp.stack([getattr(aligned[i], attr) for i in batch.alive])

    ok, lists = _psfs(batch, prep, arrays, lists["cats"], aligned, grid, xp, config)
    batch.time("psf", clock.lap())
    arrays, lists = _narrow(batch, ok, xp, arrays, lists)
    if not batch.alive:
        return {}

    ok, F_r = _flux_ratios(batch, prep, arrays, lists, xp, config)
    batch.time("flux_ratio", clock.lap())
    arrays, lists = _narrow(batch, ok, xp, arrays, lists)
    if not batch.alive:
        return {}

    # ZOGY on every tile of every CCD at once
    ast = [aligned[i].astrometric_rms or (config.subtract.default_astrometric_rms,) * 2 for i in batch.alive]
    res = subtract(arrays["N"], arrays["R"], arrays["variance"], arrays["V_R"], arrays["mask"], arrays["mask_R"],
                   lists["sci_psf"], lists["ref_psf"], lists["sci_cats"], lists["ref_cats"], F_r=F_r,
                   astrometric_rms=ast, config=config.subtract)
    sub = res.value
    batch.qa(res.qa)
    batch.time("subtract", clock.lap())
    truth_err = _truth_errors(batch, sub.flux_err, shape, xp)

    # detect, then the cutouts of every candidate of the batch
    radius = [config.detect.distnr_max_arcsec / pixel_scale_arcsec(prep[i]["wcs"]) for i in batch.alive]
    res = detect(sub, sky=arrays["sky"], ref_cats=lists["ref_cats"], distnr_radius=radius, config=config.detect,
                 cutout_size=config.cutout.size)
    det = res.value
    batch.qa(res.qa)
    batch.time("detect", clock.lap())
    c = det.columns
    res = cut_triplets(arrays["image"], arrays["sky"], arrays["R"], sub.difference, c["image"], c["x"], c["y"],
                       c["sign"], config=config.cutout)
    batch.qa(res.qa)
    batch.time("cutouts", clock.lap())
    out = dict(alive=list(batch.alive), prep=prep, det=det, triplets=res.value, shape=shape, F_r=F_r, clock=clock,
               truth_err=truth_err)
    if config.package.quicklook:  # small binned planes for a night's quicklook PNGs
        out["quicklook"] = _quicklook_planes(arrays, sub, xp)
    if keep_products:
        out["products"] = _products(batch, arrays, arrays["R"], arrays["V_R"], arrays["mask_R"], sub,
                                    lists["sci_psf"], lists["ref_psf"], lists["sci_cats"], lists["ref_cats"], prep)
    return out


def _quicklook_planes(arrays: dict, sub, xp):
    """``(B, 4, h, w)`` float32 device planes for the quicklooks: science less its background,
    aligned reference, difference, S_corr, each binned for display
    (:func:`nightsift.engine.report.display_bin`)."""
    from .report import display_bin

    return xp.stack([xp.stack([display_bin(p) for p in (arrays["image"][j] - arrays["sky"][j], arrays["R"][j],
                                                        sub.difference[j], sub.S_corr[j])])
                     for j in range(arrays["image"].shape[0])])


def _finish(batch: _Batch, run: dict, xp, *, config: Config) -> list[CCDResult]:
    """End of the device half: one download of the candidate columns, the triplets and the QA; the
    candidate tables (WCS, magnitudes) on the host. Packaging is :func:`package_results`."""
    results: dict[int, CCDResult] = {}
    if run:
        clock = run["clock"]
        alive, prep = run["alive"], run["prep"]
        det = run["det"]
        n = len(det)
        if n:
            stack = xp.stack([det.columns[k].astype(xp.float64) for k in DETECTION_COLUMNS])
            host = dict(zip(DETECTION_COLUMNS, to_host(stack, label="candidates")))
            trip = to_host(run["triplets"], label="triplets")
        else:
            host = {k: np.zeros(0) for k in DETECTION_COLUMNS}
            trip = np.zeros((0, config.cutout.size, config.cutout.size, 3), np.float32)
        te = run["truth_err"]
        if te:
            keys = list(te)
            flat = to_host(xp.concatenate([te[i].astype(xp.float64) for i in keys]), label="truth")
            edges = np.cumsum([0] + [int(te[i].shape[0]) for i in keys])
            te = {i: flat[edges[k]:edges[k + 1]] for k, i in enumerate(keys)}
        quick = to_host(run["quicklook"], label="quicklook") if "quicklook" in run else None
        batch.time("download", clock.lap(), alive)
        tables = candidate_tables(host, batch=len(alive), wcs=[prep[i]["wcs"] for i in alive],
                                  headers=[prep[i]["header"] for i in alive],
                                  visits=[batch.frames[i].visit for i in alive],
                                  ccds=[batch.frames[i].ccd for i in alive], F_r=run["F_r"], shape=run["shape"],
                                  cutout_size=config.cutout.size)
        img = host["image"].astype(np.int64)
        for j, i in enumerate(alive):
            f = batch.frames[i]
            snr = None
            if i in te:
                with np.errstate(divide="ignore", invalid="ignore"):
                    snr = np.where(te[i] > 0, np.abs(f.truth["flux"]) / te[i], 0.0)
            results[i] = CCDResult(visit=f.visit, ccd=f.ccd, status="done", candidates=tables[j],
                                   triplets=trip[img == j], header=prep[i]["header"], shape=run["shape"],
                                   products=run.get("products", {}).get(i), truth_snr=snr,
                                   quicklook=None if quick is None else quick[j])
    qas = batch.resolve_qa()
    for i in results:  # the QA read above says whether the subtraction can be trusted
        err = _degenerate(qas[i], batch.frames[i], batch.statics[i], config)
        if err is not None:
            batch.errors[i] = err
    out = []
    for i, f in enumerate(batch.frames):
        if i in batch.errors:
            e = batch.errors[i]
            status = "skipped" if isinstance(e, SkipCCD) else "failed"
            out.append(CCDResult(visit=f.visit, ccd=f.ccd, status=status, candidates=np.zeros(0), qa=qas[i], error=e))
        else:
            out.append(replace(results[i], qa=qas[i]))
    return out


def _same_file(science: str | None, reference: str | None) -> None:
    """InputError when the science frame and the reference are one file."""
    if not science or not reference:
        return
    try:
        same = os.path.samefile(science, reference)
    except OSError:
        same = os.path.abspath(science) == os.path.abspath(reference)
    if same:
        raise InputError(f"science {science} and reference {reference} are the same file: there is nothing to "
                         "subtract")


def _degenerate(qa: dict, frame: VisitFrame, statics: CCDStatics, config: Config) -> AlgorithmFailure | None:
    """An AlgorithmFailure naming both files when the raw blank-sky S_corr std is outside
    ``subtract.scorr_std_min/max`` (or not finite): identical inputs, or a broken noise model."""
    v = qa.get("scorr_std_raw")
    lo, hi = config.subtract.scorr_std_min, config.subtract.scorr_std_max
    if v is not None and np.isfinite(v) and lo <= v <= hi:
        return None
    sci = frame.path or f"visit {frame.visit} ccd {frame.ccd}"
    ref = statics.reference.path or "its reference"
    finite = v is not None and np.isfinite(v)
    what = "identical inputs?" if finite and v < lo else "a broken noise model?"
    shown = f"{v:.3g}" if finite else str(v)
    return AlgorithmFailure(f"{sci} minus {ref}: blank-sky S_corr std {shown} before renormalisation, outside "
                            f"[{lo:g}, {hi:g}]: the subtraction cannot be trusted ({what})", stage="subtract",
                            qa=qa)


def package_results(results: Sequence[CCDResult], *, config: Config, scorer=None, write: bool = True,
                    threads: int = 0) -> list[CCDResult]:
    """The host half of a visit: score the triplets, build each CCD-visit's alert packets, write them.

    Host work only (it touches no device array), so an engine can run it in a thread or a CPU pool
    while the device runs the next batch: :func:`process_visit` does it inline unless asked not to
    (``package=False``).

    Parameters
    ----------
    results : sequence of CCDResult
        From :func:`process_visit` with ``package=False`` (those not ``done`` pass through).
    config : Config
    scorer : callable, optional
        Real/bogus scorer: one call for every triplet of the batch.
    write : bool
        Write each Avro alert file to ``config.package.output_dir`` (a rerun replaces it).
    threads : int
        Threads packaging CCD-visits concurrently (gzip and Avro release the GIL for much of their
        work); 0 = one per CCD-visit up to the cores.

    Returns
    -------
    list of CCDResult with ``scores``, ``n_alerts``, ``alerts_path`` and the package QA
    (``n_alerts``, ``n_edge``, ``n_scored``, ``t_classify``, ``t_package``, ``t_write``); a
    CCD-visit whose packets cannot be built (its header has no observation time, say) is ``failed``.
    """
    from concurrent.futures import ThreadPoolExecutor

    results = list(results)
    done = [k for k, r in enumerate(results) if r.status == "done"]
    if not done:
        return results
    t0 = time.perf_counter()
    trip = np.concatenate([results[k].triplets for k in done]) if done else np.zeros((0, 63, 63, 3), np.float32)
    scores_all = {k: np.asarray(v) for k, v in scorer(trip).items()} if scorer is not None and len(trip) else {}
    t_classify = time.perf_counter() - t0
    edges = np.cumsum([0] + [len(results[k].triplets) for k in done])
    versions = getattr(scorer, "versions", None)

    def one(m: int) -> CCDResult:
        k = done[m]
        r = results[k]
        scores = {name: v[edges[m]:edges[m + 1]] for name, v in scores_all.items()}
        t1 = time.perf_counter()
        try:
            pkg = build_alerts(r.candidates, triplets=r.triplets, shape=r.shape, header=r.header, visit=r.visit,
                               ccd=r.ccd, scores=scores, score_versions=versions, survey=config.package.survey)
        except NightsiftError as e:
            return replace(r, status="failed", error=e, qa=dict(r.qa, **e.qa))
        t2 = time.perf_counter()
        path = write_alerts(alert_path(config.package.output_dir, r.visit, r.ccd), pkg.value) if write else None
        if path is not None and r.quicklook is not None:  # package.quicklook: a PNG beside the alert file
            from .report import save_result_quicklook

            save_result_quicklook(path, replace(r, qa=dict(r.qa, **pkg.qa)))
        spent[m] = (t2 - t1, time.perf_counter() - t2)
        return replace(r, scores=scores, n_alerts=len(pkg.value), alerts_path=path, qa=dict(r.qa, **pkg.qa))

    n = len(done)
    spent = [(0.0, 0.0)] * n
    workers = threads or min(n, os.cpu_count() or 1)
    t1 = time.perf_counter()
    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            packaged = list(pool.map(one, range(n)))
    else:
        packaged = [one(m) for m in range(n)]
    # stage times are the batch's wall times (as every t_<stage>): the packaging wall split between
    # building the packets and writing them in proportion to the time each took
    wall = time.perf_counter() - t1
    sp, sw = sum(a for a, _ in spent), sum(b for _, b in spent)
    f = wall / (sp + sw) if sp + sw > 0 else 0.0
    times = {"t_classify": round(t_classify, 4), "t_package": round(sp * f, 4), "t_write": round(sw * f, 4)}
    for m, k in enumerate(done):
        results[k] = replace(packaged[m], qa=dict(packaged[m].qa, **times))
    return results


def _products(batch, arrays, R, V_R, mask_R, sub, sci_psf, ref_psf, sci_cats, ref_cats, prep) -> dict:
    """Host copies of the images behind each CCD's alerts (explicit downloads, labelled products)."""
    out = {}
    for j, i in enumerate(batch.alive):
        h = lambda a: to_host(a, label="products")  # noqa: E731
        f = batch.frames[i]
        ref = batch.statics[i].reference
        sci = Exposure(image=h(arrays["image"][j]), variance=h(arrays["variance"][j]), mask=h(arrays["mask"][j]),
                       wcs=prep[i]["wcs"], header=prep[i]["header"], path=f.path)
        header = replace_wcs(ref.header, prep[i]["wcs"])
        header["ALIGNTO"] = (str(f.path or ""), "science image whose grid this is")
        refe = Exposure(image=h(R[j]), variance=h(V_R[j]), mask=h(mask_R[j]), wcs=prep[i]["wcs"], header=header,
                        path=ref.path)
        s = sub.ccd(j)
        s = Subtraction(**{k: (h(v) if _is_device(v) or isinstance(v, np.ndarray) else v)
                           for k, v in vars(s).items()})
        sp = _host_psf(h(arrays["sky"][j]), float(h(arrays["sigma"][j])), sci_cats[j], sci_psf[j], h)
        rp = _host_psf(np.zeros(s.D.shape, np.float32), ref.sky_sigma, ref_cats[j], ref_psf[j], h)
        out[i] = CCDProducts(science=sci, reference=refe, subtraction=s, sci_psf=sp, ref_psf=rp)
    return out


def _host_psf(sky, sigma: float, cat: SourceCatalog, model, h) -> ImagePSF:
    from .records import PSFModel

    m = PSFModel(stamps=h(model.stamps), fwhm=h(model.fwhm), apcorr=h(model.apcorr), n_stars=h(model.n_stars),
                 grid=model.grid, locus=model.locus)
    cat_h = SourceCatalog(**{k: h(getattr(cat, k)) for k in ("x", "y", "flux", "fluxerr", "snr", "a", "b", "peak",
                                                              "flag", "size", "point", "psf_star")})
    return ImagePSF(sky=sky, sky_sigma=sigma, catalog=cat_h, model=m)


def align_exposures(science: Exposure, reference: Exposure, *, config) -> StageResult:
    """Resample a reference exposure onto a science exposure's grid, as the chain does (a tool).

    The reference is measured in its own frame (background, catalogue; no PSF) and aligned with
    :func:`nightsift.engine.stages.align.align_reference`, the registration measured from the
    science catalogue; the returned image keeps the reference's background (unlike the chain's,
    which subtracts it before resampling).

    Parameters
    ----------
    science, reference : Exposure
    config : Config or AlignConfig

    Returns
    -------
    StageResult(Exposure on the science grid (host arrays), qa)
    """
    from .config import AlignConfig

    cfg = Config().replace(align=vars(config)) if isinstance(config, AlignConfig) else config
    xp = np
    st = prepare_statics(reference, None, config=cfg, xp=xp, subtract_sky=False, with_psf=False)
    guess = fwhm_guess(science.header, cfg.psf.default_fwhm)
    img = to_device(science.image, xp, dtype=np.float32)[None]
    msk = to_device(science.mask, xp, dtype=np.uint16)[None]
    cat = measure_images(img, msk, fwhm=[guess], config=cfg.psf,
                         poisson_scale=_poisson([science.header])).value.catalogs[0]
    astro = astrometric_stars(cat, radius=cfg.align.isolation_fwhm * guess)
    cm = coarse_map(science.wcs, reference.wcs, science.shape, step=cfg.align.map_step)
    res = align_reference(st.reference, cm, sci_catalog=cat, sci_astro=astro, science_path=science.path,
                          config=cfg.align)
    al = res.value
    header = replace_wcs(reference.header, science.wcs)
    header["ALIGNTO"] = (str(science.path or ""), "science image whose grid this is")
    out = Exposure(image=to_host(al.image), variance=to_host(al.variance), mask=to_host(al.mask), wcs=science.wcs,
                   header=header, path=reference.path)
    qa = {k: (host_scalars(v)[0] if _is_device(v) else _plain(v)) for k, v in res.qa.items()}
    return StageResult(out, qa)


# ------------------------------------------------------------------------------------------------
# one CCD (B = 1)
# ------------------------------------------------------------------------------------------------
def _single(result: CCDResult) -> CCDResult:
    if result.error is not None:
        raise result.error
    return result


def process_ccd(raw: RawFrame, master: MasterCalibration, reference: Exposure, *, config: Config, visit: int = 0,
                ccd: int = 0, write: bool = True, keep_products: bool = False, scorer=None, xp=None) -> CCDResult:
    """Raw science frame -> alerts for one CCD: :func:`prepare_statics` then :func:`process_visit`.

    ``xp`` (default: ``config.run.backend``) is where it runs. Raises the CCD's
    :class:`~nightsift.engine.errors.SkipCCD` / :class:`~nightsift.engine.errors.AlgorithmFailure`.
    """
    xp = _backend(config) if xp is None else xp
    statics = prepare_statics(reference, master, config=config, xp=xp, ccd=ccd)
    return _single(process_visit([VisitFrame(visit, ccd, raw=raw)], [statics], config=config, scorer=scorer,
                                 write=write, keep_products=keep_products)[0])


def process_pair(science: Exposure, reference: Exposure, *, config: Config, visit: int = 0, ccd: int = 0,
                 write: bool = True, keep_products: bool = False, scorer=None, xp=None, sci_psf: str | None = None,
                 ref_psf: str | None = None) -> CCDResult:
    """Calibrated science exposure + reference -> candidates and alert packets (one CCD).

    Parameters
    ----------
    science : Exposure
        Calibrated science exposure (e-).
    reference : Exposure
        Reference exposure on its own pixel grid (aligned here through both WCSs).
    config : Config
    visit, ccd : int
        Identify the CCD-visit: they name the alert file (a rerun replaces it) and the candids.
    write : bool
        Write the Avro alert file to ``config.package.output_dir``.
    keep_products : bool
        Keep the images (science, aligned reference, D, S_corr) in the result (host copies).
    scorer : callable, optional
        See :func:`process_visit`.
    xp : module, optional
        Where to run (default: ``config.run.backend``).
    sci_psf, ref_psf : str, optional
        PSF files of the science image and of the reference (on its own pixels) used instead of
        measuring them (:func:`nightsift.engine.io.psf_files.read_psf`); default
        ``psf.science_model`` / ``psf.reference_model`` ("" = measure).
    """
    xp = _backend(config) if xp is None else xp
    sci_psf = config.psf.science_model if sci_psf is None else sci_psf
    ref_psf = config.psf.reference_model if ref_psf is None else ref_psf
    _same_file(science.path, reference.path)
    if np.shape(science.image) == np.shape(reference.image) and np.array_equal(science.image, reference.image):
        raise InputError(f"science {science.path or '(in memory)'} and reference {reference.path or '(in memory)'} "
                         "hold the same pixels: there is nothing to subtract")
    statics = prepare_statics(reference, None, config=config, xp=xp, ccd=ccd, psf_file=ref_psf or None)
    frame = VisitFrame(visit, ccd, science=science, psf=sci_psf or None)
    return _single(process_visit([frame], [statics], config=config, scorer=scorer, write=write,
                                 keep_products=keep_products)[0])


def _backend(config: Config):
    from .backend import get_backend

    return get_backend(config.run.backend)
