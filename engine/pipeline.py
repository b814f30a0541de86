"""The chain for one CCD, top to bottom: FITS/raw frame -> calibrate -> align -> PSF -> ZOGY ->
detect -> cutouts -> alert packets.

:func:`process_ccd` starts from a raw frame and its master calibration; :func:`process_pair` from
a calibrated science exposure (what ``nightsift subtract`` reads). Each link is one stage call;
every stage's QA numbers are merged into one flat dict. A stage that raises
:class:`~nightsift.engine.errors.SkipCCD` or :class:`~nightsift.engine.errors.AlgorithmFailure`
stops this CCD only; the caller (a night) records it and goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nightsift.kernels.tiles import make_grid

from .backend import get_backend
from .config import Config
from .io.avro import alert_path, write_alerts
from .records import Exposure, RawFrame, difference_sign
from .stages.align import align
from .stages.calibrate import MasterCalibration, calibrate
from .stages.detect import detect
from .stages.package import build_alerts
from .stages.psf import ImagePSF, psf_stage
from .stages.subtract import Subtraction, subtract


@dataclass(frozen=True)
class CCDProducts:
    """The images behind a CCD's alerts (kept only when asked: they are large)."""

    science: Exposure
    reference: Exposure  #: aligned onto the science grid
    subtraction: Subtraction
    sci_psf: ImagePSF
    ref_psf: ImagePSF


@dataclass(frozen=True)
class CCDResult:
    """Outcome of one CCD-visit.

    Attributes
    ----------
    visit, ccd : int
    candidates : CANDIDATE_DTYPE array
    alerts_path : Path or None
        The Avro file written (``None`` when ``write=False``).
    n_alerts : int
    qa : dict
        Every stage's QA numbers plus ``t_<stage>`` wall times (s).
    products : CCDProducts or None
    """

    visit: int
    ccd: int
    candidates: np.ndarray
    alerts_path: Path | None
    n_alerts: int
    qa: dict = field(default_factory=dict)
    products: CCDProducts | None = None


class _Timer:
    def __init__(self, qa: dict):
        self.qa = qa

    def __call__(self, name: str, result):
        """Merge a StageResult's QA, record the time since the last call, return its value."""
        now = time.perf_counter()
        self.qa[f"t_{name}"] = round(now - self.t0, 4)
        self.t0 = now
        self.qa.update(result.qa)
        return result.value

    def start(self):
        self.t0 = time.perf_counter()
        return self


def process_ccd(raw: RawFrame, master: MasterCalibration, reference: Exposure, *, config: Config,
                visit: int = 0, ccd: int = 0, write: bool = True, keep_products: bool = False,
                scorer=None) -> CCDResult:
    """Raw science frame -> alerts. See :func:`process_pair` for the arguments after ``master``."""
    qa: dict = {}
    step = _Timer(qa).start()
    science = step("calibrate", calibrate(raw, master, config=config.calibrate))
    return process_pair(science, reference, config=config, visit=visit, ccd=ccd, write=write,
                        keep_products=keep_products, scorer=scorer, _qa=qa)


def process_pair(science: Exposure, reference: Exposure, *, config: Config, visit: int = 0, ccd: int = 0,
                 write: bool = True, keep_products: bool = False, scorer=None, _qa: dict | None = None) -> CCDResult:
    """Calibrated science exposure + reference -> candidates and alert packets.

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
        Keep the images (science, aligned reference, D, S_corr) in the result.
    scorer : callable, optional
        ``scorer(triplets (n, 63, 63, 3)) -> dict[str, ndarray (n,)]`` (e.g. real/bogus), stored
        in the packets; its ``versions`` attribute, when present, fills ``rbversion``/``drbversion``
        (see :func:`nightsift.engine.classify.runtime.pipeline_scorer`).
    """
    qa: dict = {} if _qa is None else _qa
    step = _Timer(qa).start()
    xp = get_backend(config.run.backend)  # numpy, or cupy for the ZOGY kernel on a GPU; fails fast
    aligned = step("align", align(science, reference, config=config.align))
    grid = make_grid(science.shape, core=config.subtract.tile_size, margin=config.subtract.tile_margin)
    sci_psf = step("psf_sci", psf_stage(science, grid=grid, config=config.psf, prefix="sci_"))
    ref_psf = step("psf_ref", psf_stage(aligned, grid=grid, config=config.psf, prefix="ref_"))
    ast = None
    if qa.get("n_astrometric_stars", 0) >= 5:
        ast = (max(qa["astrometric_rms_x"], 1e-3), max(qa["astrometric_rms_y"], 1e-3))
    sub = step("subtract", subtract(science, aligned, sci_psf, ref_psf, config=config.subtract, astrometric_rms=ast,
                                    xp=xp))
    cands = step("detect", detect(sub, wcs=science.wcs, header=science.header, sky=sci_psf.sky,
                                  ref_catalog=ref_psf.catalog, visit=visit, ccd=ccd, config=config.detect,
                                  cutout_size=config.cutout.size))
    sky_sub = np.asarray(science.image, dtype=np.float32) - sci_psf.sky
    ref_sub = np.asarray(aligned.image, dtype=np.float32) - ref_psf.sky
    scores = None
    if scorer is not None and len(cands):
        from nightsift.kernels.stamps import extract_triplets

        scores = scorer(extract_triplets(sky_sub, ref_sub, sub.difference, cands["xpos"], cands["ypos"],
                                         size=config.cutout.size, difference_sign=difference_sign(cands)))
        step("classify", _Done())
    alerts = step("package", build_alerts(cands, science=sky_sub, reference=ref_sub, difference=sub.difference,
                                          header=science.header, visit=visit, ccd=ccd, config=config.cutout,
                                          scores=scores, score_versions=getattr(scorer, "versions", None)))
    path = None
    if write:
        path = write_alerts(alert_path(config.package.output_dir, visit, ccd), alerts)
        step("write", _Done())
    products = CCDProducts(science, aligned, sub, sci_psf, ref_psf) if keep_products else None
    return CCDResult(visit=visit, ccd=ccd, candidates=cands, alerts_path=path, n_alerts=len(alerts), qa=qa,
                     products=products)


class _Done:
    value = None
    qa: dict = {}
