"""One typed configuration for the whole chain.

Each stage reads its own frozen section. Defaults are documented on the fields; a TOML file may
override any of them::

    [subtract]
    tile_size = 1024

    [detect]
    threshold = 5.0

Load with :func:`load_config`; unknown sections/keys and out-of-range values raise
:class:`~nightsift.engine.errors.ConfigError` naming the key.

Each section checks its own fields when it is made (its ``_check_ranges``, beside the fields); a
field with a fixed set of values is typed with a ``Literal`` (:data:`ClassifyBackend`, ...), which
is the one list of its values: the check, the messages and the modules that dispatch on it
(:mod:`~nightsift.engine.backend`, :mod:`~nightsift.engine.classify.runtime`, the command line)
read the tuples derived from it (:data:`CLASSIFY_BACKENDS`, ...).
"""
from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from .errors import ConfigError

#: real/bogus scorer (``classify.backend``)
ClassifyBackend = Literal["auto", "edgetpu", "tflite", "keras", "braai", "none"]
#: array backend (``run.backend``)
ArrayBackend = Literal["numpy", "cupy", "auto"]
#: night engine (``run.engine``)
NightEngine = Literal["auto", "ray", "local"]
#: FFT precision of the subtraction (``subtract.fft_dtype``)
FFTDtype = Literal["float32", "float64"]
#: header conventions of a folder night (``input.preset``; engine/orchestration/folder.py PRESETS)
InputPreset = Literal["generic", "decam", "ztf", "lsst"]
#: how a folder night's science frames are read (``input.science_kind``)
ScienceKind = Literal["auto", "raw", "calibrated"]

CLASSIFY_BACKENDS: tuple[str, ...] = get_args(ClassifyBackend)
ARRAY_BACKENDS: tuple[str, ...] = get_args(ArrayBackend)
NIGHT_ENGINES: tuple[str, ...] = get_args(NightEngine)
INPUT_PRESETS: tuple[str, ...] = get_args(InputPreset)


def one_of(choices) -> str:
    """``"a, b or c"``: the values of an enumeration, for messages."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else "".join(choices)


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config {key}: {msg}")


class _Section:
    """What every section does when it is made: a ``Literal``-typed field must hold one of its
    values, then the section's own range checks (:meth:`_check_ranges`, written beside its fields)
    run. Raises ConfigError naming the key."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the key of a field outside its choices or its range."""
        section = _section_name(type(self))
        for name, choices in _choices(type(self)).items():
            _check(getattr(self, name) in choices, f"{section}.{name}", f"must be {one_of(choices)}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Range checks of this section's fields (none unless the section defines them)."""


@functools.cache
def _choices(cls) -> dict[str, tuple]:
    """The fields of a section typed with a ``Literal``, and their values."""
    hints = typing.get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if typing.get_origin(hints[f.name]) is Literal}


@functools.cache
def _section_name(cls) -> str:
    """The name of a section class in :class:`Config` (``DetectConfig`` -> ``"detect"``)."""
    return next(f.name for f in fields(Config) if f.default_factory is cls)


@dataclass(frozen=True)
class CalibrateConfig(_Section):
    #: a pixel of the master dark brighter than this many e-/s above the median is hot (bad)
    hot_pixel_threshold: float = 5.0
    #: a flat pixel whose normalised response is below this (or above 1/this) is bad
    flat_bad_threshold: float = 0.5
    #: fraction of SATURATE at which a pixel is flagged saturated
    saturation_fraction: float = 0.98
    #: saturated regions are grown by this many pixels (bleed trails, blooming)
    saturation_grow: int = 1
    #: the GAIN of a coadd read without a noise map, whose variance is estimated from the image:
    #: "header" (GAIN is already the coadd's effective gain, as SWarp writes it) or "ncombine"
    #: (GAIN is one frame's and the coadd a mean of NCOMBINE frames: effective gain GAIN*NCOMBINE)
    coadd_gain: Literal["header", "ncombine"] = "header"


@dataclass(frozen=True)
class AlignConfig(_Section):
    #: Lanczos kernel half-width a (Lanczos-a); 3 is the standard choice
    lanczos_order: int = 3
    #: minimum fraction of science pixels covered by the reference, else the CCD is skipped
    min_overlap: float = 0.05
    #: the science->reference pixel map is evaluated exactly (astropy) every this many pixels and
    #: interpolated in between (cubic spline; error ~1e-5 px for real distortions)
    map_step: int = 32
    #: stars of science and aligned reference closer than this (pixels) are matched for the
    #: astrometric residual QA
    match_radius: float = 1.5
    #: if True, a residual offset measured on matched stars (median of >= refine_min_stars stars,
    #: > 0.01 px and > 3x its error) is removed by resampling once more with the shifted map
    #: (a zero-point error between the two WCSs)
    refine_offset: bool = True
    #: fewest matched stars for refine_offset to act
    refine_min_stars: int = 3
    #: fewest matched stars for their measured registration RMS to set ZOGY's astrometric noise
    #: (else subtract.default_astrometric_rms)
    min_astrometric_stars: int = 5
    #: floor (px) on that measured RMS: a handful of stars can agree by chance to ~0
    astrometric_rms_floor: float = 0.001
    #: what sets ZOGY's astrometric noise (sigma_x, sigma_y) from the matched stars: "registration"
    #: (their scatter less their own centroid noise, in quadrature, plus the error of the fitted
    #: offset: the misregistration a source suffers) or "scatter" (the raw scatter, which counts
    #: the stars' centroid noise as misregistration and under-reports transients on bright hosts)
    astrometric_noise: Literal["registration", "scatter"] = "registration"
    #: a star measures the registration only if no other source lies within this many FWHM
    isolation_fwhm: float = 3.0

    def _check_ranges(self):
        _check(self.lanczos_order in (2, 3, 4, 5), "align.lanczos_order", "must be 2..5")
        _check(0 < self.min_overlap <= 1, "align.min_overlap", "must be in (0, 1]")
        _check(4 <= self.map_step <= 256, "align.map_step", "must be in 4..256")
        _check(self.match_radius > 0, "align.match_radius", "must be > 0")
        _check(self.refine_min_stars >= 1, "align.refine_min_stars", "must be >= 1")


@dataclass(frozen=True)
class PSFConfig(_Section):
    #: side of the PSF stamp in pixels (odd); widened automatically to >= 6 x FWHM
    stamp_size: int = 31
    #: minimum S/N of a PSF star (aperture S/N within 2 FWHM; sep's isophotal S/N, which the former
    #: value 50 was set on, reads 1.2-1.4x higher for the same star)
    min_snr: float = 35.0
    #: a PSF-star candidate with a neighbour (of more than isolation_flux of its flux) within this many
    #: stamp half-sides is not isolated. 1 = inside the stamp's inscribed circle: the catalogue is
    #: a matched-filter one, ~1.5 mag deeper than the isophotal (sep) catalogue the previous
    #: sqrt(2) (the stamp's corners) was chosen with, which left 2 stars on sparse 256^2 CCDs
    isolation_radius: float = 1.0
    #: fewest stars needed for one PSF model; fewer raises AlgorithmFailure
    min_stars: int = 3
    #: most stars stacked per PSF (brightest unsaturated first)
    max_stars: int = 60
    #: stamp radius in units of the FWHM guess (the stamp is the larger of this and stamp_size)
    stamp_radius_fwhm: float = 3.0
    #: replace the stack's noise by the fitted Moffat where the stack is not significantly different
    denoise: bool = True
    #: significance (sigma) below which the stack's departure from the Moffat is treated as noise
    denoise_k: float = 2.0
    #: half-side of the core box (in FWHM) that must hold no unusable pixel for a star to be a PSF
    #: star; unusable pixels further out are left out of the stack. (A whole-stamp rule made every
    #: star of a frame with a few scattered NaN pixels ineligible.)
    core_radius_fwhm: float = 0.5
    #: a PSF-star candidate is not isolated when a neighbour within the isolation radius has more
    #: than this fraction of its flux (a 1 % neighbour biases the stack's wings by ~1 %)
    isolation_flux: float = 0.01
    #: candidates with windowed minor/major axis ratio below this are not stars (an edge-on
    #: galaxy, a blend); the stellar locus in adaptive moments does the finer cleaning
    max_axis_ratio: float = 0.6
    #: stars are weighted by S/N^2 in the stack, the S/N capped here (a saturated-core star just
    #: below the saturation flag would otherwise set the PSF alone)
    max_weight_snr: float = 1000.0
    #: FWHM (px) assumed for detection when the header gives neither FWHM nor SEEING/PIXSCALE
    default_fwhm: float = 3.0
    #: background mesh side (px): larger than the largest galaxies, smaller than sky gradients
    background_box: int = 64
    #: source-catalogue threshold, in sigma of the matched-filtered image (the catalogue feeds
    #: PSF stars, flux-ratio stars, isolation, the blank-sky mask and distnr)
    detect_threshold: float = 5.0
    #: S/N from which a source's adaptive size decides "point source" (the stars the flux ratio
    #: prefers). A choice: the stellar-locus tolerance widens as 2/S/N (``locus_tolerance``: 15 %
    #: at S/N 20, 45 % at S/N 5), so much fainter sources would pass as points whatever their size
    point_min_snr: float = 20.0
    #: S/N from which every unflagged source (isolated or not) enters the lower envelope of sizes
    #: that finds the stellar locus in a galaxy-rich field (``stages.psf._stellar_loci``), and the
    #: S/N of PSF stars in the crowded retry. At S/N 20 a star's adaptive size scatters by ~5 %,
    #: far less than the gap to galaxies; the bright isolated candidates of a galaxy-rich
    #: undersampled field held 1 star among 74 (its locus 2.7x the PSF)
    locus_min_snr: float = 20.0
    #: a bright-candidate locus more than this times the lower envelope of all sources' sizes sat
    #: on resolved sources (galaxies): the envelope is taken instead. Stars measure within ~5 % of
    #: each other (2.44-2.56 px at FWHM 2.1); 1.3 leaves compact galaxies and noise out of it
    locus_resolved_ratio: float = 1.3
    #: isolation radius (in locus FWHMs) of the crowded retry, when fewer than min_stars isolated
    #: bright stars sit on the locus or most bright candidates are resolved: neighbours further
    #: out only touch the stack's wings, where its clipping removes them (a star among many faint
    #: galaxies rarely has 15 px to itself); 0 = no retry
    crowded_isolation_fwhm: float = 3.0
    #: a PSF FWHM (median over tiles) differing from the header's seeing (SEEING, FWHM, ... see
    #: ``stages.measure.header_seeing``) by more than this fraction is flagged in the QA warnings:
    #: header seeing is measured otherwise (a Gaussian, a median over the focal plane), ~10-20 %
    #: apart from a Moffat fit; a locus on galaxies is 1.5-3x off
    seeing_tolerance: float = 0.35
    #: science and reference PSF FWHMs (science pixels) differing by more than this factor are
    #: flagged: ground seeing spans ~0.6-2", and references are stacked from good nights; a
    #: larger factor is more often a PSF measured on galaxies than the sky
    max_fwhm_ratio: float = 2.5
    #: PSF file of the science image used instead of measuring its PSF (`nightsift subtract
    #: --sci-psf`): a FITS PSF image, oversampled ones with their OVERSAMP keyword, or a PSFEx .psf
    #: model (nightsift.engine.io.psf_files); "" = measure. Read by process_pair (one pair): a
    #: night's CCD-visits each need their own, given per frame
    science_model: str = ""
    #: PSF file of the reference image (`--ref-psf`), on the reference's own pixels; "" = measure
    reference_model: str = ""

    def _check_ranges(self):
        _check(self.stamp_size % 2 == 1 and self.stamp_size >= 11, "psf.stamp_size", "must be odd and >= 11")
        _check(self.min_stars >= 1, "psf.min_stars", "must be >= 1")
        _check(self.max_stars >= self.min_stars, "psf.max_stars", "must be >= psf.min_stars")
        _check(self.point_min_snr > 0, "psf.point_min_snr", "must be > 0")
        _check(self.locus_min_snr > 0, "psf.locus_min_snr", "must be > 0")
        _check(self.locus_resolved_ratio > 1, "psf.locus_resolved_ratio", "must be > 1")
        _check(self.crowded_isolation_fwhm >= 0, "psf.crowded_isolation_fwhm", "must be >= 0")
        _check(self.seeing_tolerance > 0, "psf.seeing_tolerance", "must be > 0")
        _check(self.max_fwhm_ratio > 1, "psf.max_fwhm_ratio", "must be > 1")


@dataclass(frozen=True)
class SubtractConfig(_Section):
    #: side of the square ZOGY tiles (core, in pixels); a CCD is cut into tiles of this size, each
    #: with its own PSFs. 0 means one tile for the whole CCD. 512 keeps the PSF model within a
    #: few % of the local PSF for a typical field variation: with 1024, bright-star residuals at
    #: tile corners tripled the 5-sigma false positives of a transient-free 2048^2 pair (6 vs 1.9
    #: expected); with 512 they match (2 vs 1.9)
    tile_size: int = 512
    #: margin added on each side of a tile core before the FFT (kills wrap-around); >= PSF stamp
    tile_margin: int = 32
    #: relative error of the flux ratio given by the photometric zero points (MAGZP, EXPTIME) of
    #: both headers; the star-based F_r and the zero-point one are averaged with inverse-variance
    #: weights (0 = the stars alone whenever they give a value)
    zero_point_rms: float = 0.02
    #: S/N of the catalogue sources whose PSF fluxes measure F_r. A choice: at S/N 20 a star's
    #: ratio (two images) is good to ~7 %, about twice the PSF-model error every star carries
    #: (3 %). Keep it >= psf.point_min_snr (the point-source test the flux ratio prefers is made
    #: from there)
    flux_ratio_min_snr: float = 20.0
    #: relative distance from the zero-point F_r within which star ratios are trusted; a star-based
    #: F_r farther than this from it is replaced by it. A choice: the zero points miss this CCD's
    #: flat and aperture terms (a few %), so 30 % only turns away stars that changed (variables,
    #: a transient on a nucleus) or a wrong match
    flux_ratio_prior_window: float = 0.3
    #: a star-fitted F_r farther than this (relative) from the zero points' is flagged in the QA
    #: warnings and replaced by it: the zero points miss a CCD's flat and aperture terms (a few %),
    #: the stars' value on a PSF measured on galaxies came out 20 % off and lost the transient
    flux_ratio_tolerance: float = 0.1
    #: astrometric noise (RMS, pixels) used in S_corr when alignment does not measure it
    default_astrometric_rms: float = 0.02
    #: masked pixels (bad, saturated, no data) are grown by this many pixels; S_corr is zeroed there
    mask_grow: int = 3
    #: divide S_corr by its measured blank-sky standard deviation. The noise model already makes
    #: it ~1 for white input noise (tested with this off); real frames that were resampled before
    #: they reached us have correlated noise the variance maps cannot know about. The factor is
    #: reported as QA ``scorr_std_raw``.
    renormalize_scorr: bool = True
    #: a blank-sky S_corr std (before renormalisation) outside [scorr_std_min, scorr_std_max] fails
    #: the CCD-visit: the subtraction is degenerate (identical inputs give ~0: renormalising that
    #: turns round-off into alerts) or its noise model is badly wrong; renormalisation only
    #: corrects what resampled, correlated noise does to a sound subtraction (1.0-1.3 seen)
    scorr_std_min: float = 0.5
    scorr_std_max: float = 2.0
    #: remove the residual sky offset of D (per tile, median of D on blank sky)
    remove_difference_offset: bool = True
    #: FFT precision: "float32" (S_corr within 5e-6 RMS of float64 on a 2048^2 pair, same candidates,
    #: 2.8x faster on the CPU, half the memory; what a GPU wants) or "float64"
    fft_dtype: FFTDtype = "float32"

    def _check_ranges(self):
        _check(self.tile_size == 0 or self.tile_size >= 128, "subtract.tile_size", "0 or >= 128")
        _check(self.tile_margin >= 8, "subtract.tile_margin", "must be >= 8")
        _check(self.default_astrometric_rms >= 0, "subtract.default_astrometric_rms", "must be >= 0")
        _check(0 <= self.scorr_std_min < 1 < self.scorr_std_max, "subtract.scorr_std_min/max",
               "need 0 <= min < 1 < max")
        _check(self.flux_ratio_min_snr > 0, "subtract.flux_ratio_min_snr", "must be > 0")
        _check(self.flux_ratio_prior_window > 0, "subtract.flux_ratio_prior_window", "must be > 0")
        _check(self.flux_ratio_tolerance > 0, "subtract.flux_ratio_tolerance", "must be > 0")


@dataclass(frozen=True)
class DetectConfig(_Section):
    #: detection threshold on |S_corr| (sigma)
    threshold: float = 5.0
    #: minimum connected pixels above threshold. S_corr is already the matched-filter statistic, so
    #: one pixel above threshold is a detection (ZOGY's criterion); a larger value suppresses
    #: noise peaks below the Gaussian rate (x0.1 at 4 sigma with 3) and loses transients near
    #: the threshold
    min_area: int = 1
    #: move each S_corr peak to the peak of the PSF-flux image it sits on (at most one FWHM of
    #: P_D) before deduplication: a bright transient's S_corr has a flat or ring-shaped top
    #: (its own photon noise) that sep splits into several peaks; S has one
    climb_to_flux_peak: bool = True
    #: peaks of one sign around one excluded patch of at most this many pixels (a few masked
    #: pixels, grown by subtract.mask_grow) are one candidate; 0 = off
    hole_merge_area: int = 121
    #: ... and so are peaks around a compact patch of any area whose bounding box fits in this many
    #: pixels: a saturated star's masked core, whose residual ring the peak finder sees as several
    #: peaks (8 on an LSST-like CCD); bleed trails and CCD edges are elongated and are left alone;
    #: 0 = off
    hole_merge_extent: int = 41
    #: peaks closer than this (pixels) are one candidate
    dedup_radius: float = 3.0
    #: radius (pixels) of the box in which bad pixels are counted for ``nbad`` (5x5 as ZTF)
    nbad_halfwidth: int = 2
    #: reference sources closer than this (arcsec) are reported as the nearest reference source
    distnr_max_arcsec: float = 30.0

    def _check_ranges(self):
        _check(self.threshold > 0, "detect.threshold", "must be > 0")
        _check(self.min_area >= 1, "detect.min_area", "must be >= 1")


@dataclass(frozen=True)
class CutoutConfig(_Section):
    #: side of the science/reference/difference cutouts (pixels, odd); 63 as in ZTF
    size: int = 63

    def _check_ranges(self):
        _check(self.size % 2 == 1 and self.size >= 15, "cutout.size", "must be odd and >= 15")


@dataclass(frozen=True)
class PackageConfig(_Section):
    #: directory where alert packets are written
    output_dir: str = "nightsift-out"
    #: instrument/survey prefix of candidate ids
    survey: str = "nightsift"
    #: also write a quicklook PNG (science, aligned reference, difference, S_corr binned for display,
    #: candidates circled) beside each CCD-visit's alert file; off for a night by default (~1 s and
    #: ~1 MB per CCD-visit). `nightsift subtract` always writes one (quicklook.png), and a night's
    #: per-CCD-visit QA is in its ledger records (records/*.json), read by nightsift.engine.report
    quicklook: bool = False


@dataclass(frozen=True)
class ClassifyConfig(_Section):
    #: real/bogus scorer: "auto" (Edge TPU when libedgetpu is present, else int8 TFLite on the
    #: CPU), "edgetpu", "tflite" (int8 on the CPU), "keras" (float model), "braai" (ZTF's public
    #: d6_m7 weights) or "none" (no score in the packets)
    backend: ClassifyBackend = "auto"
    #: model file; "" = the model shipped with nightsift (see engine/classify/models/)
    model: str = ""
    #: triplets per inference batch
    batch_size: int = 256
    #: operating threshold on the real/bogus score; < 0 = the one stored with the model (chosen
    #: on validation data for classify.target_fnr)
    threshold: float = -1.0
    #: false-negative rate the operating threshold is chosen for (missed transients cost more
    #: than false alarms)
    target_fnr: float = 0.01
    #: confidence that the target FNR holds on new data: the threshold is the highest whose
    #: one-sided Clopper-Pearson upper bound on the validation FNR is <= target_fnr (0: the
    #: point estimate, which lands above the target on new data about half the time)
    threshold_confidence: float = 0.9

    def _check_ranges(self):
        _check(self.batch_size >= 1, "classify.batch_size", "must be >= 1")
        _check(self.threshold < 1, "classify.threshold", "must be < 1 (< 0: the model's own)")
        _check(0 < self.target_fnr < 0.5, "classify.target_fnr", "must be in (0, 0.5)")
        _check(0 <= self.threshold_confidence < 1, "classify.threshold_confidence", "must be in [0, 1)")


@dataclass(frozen=True)
class SimulateConfig(_Section):
    #: instrument profile (see nightsift.engine.simulate.instruments.PROFILES)
    instrument: str = "decam"
    #: CCD shape used by `nightsift run` and `nightsift simulate` (ny, nx); 0 = the instrument's own
    ny: int = 1024
    nx: int = 1024
    #: visits and CCDs in the default simulated night
    n_visits: int = 3
    n_ccds: int = 2
    #: transients injected per CCD
    n_transients: int = 30
    seed: int = 2026

    def _check_ranges(self):
        _check(self.ny >= 0 and self.nx >= 0, "simulate.ny/nx", "must be >= 0")
        _check(self.n_visits >= 1 and self.n_ccds >= 1, "simulate.n_visits/n_ccds", "must be >= 1")


@dataclass(frozen=True)
class RunConfig(_Section):
    #: "numpy", "cupy" or "auto" (cupy when a GPU is present)
    backend: ArrayBackend = "numpy"
    #: worker processes/actors for a night (0 = number of cores; with the Ray engine: subtraction
    #: actors, 0 = one per GPU, else one per ``subtraction_cpus`` left after the inference pool)
    workers: int = 0
    #: night engine: "auto" (Ray when it is installed, else the local process pool), "ray", "local"
    engine: NightEngine = "auto"
    #: Ray cluster: "" starts a local Ray on this machine's cores; "auto" joins the cluster that
    #: `ray start` runs on this node; "ray://host:10001" a remote one (Ray client)
    address: str = ""
    #: CPUs reserved by each subtraction actor (a GPU actor also takes one GPU)
    subtraction_cpus: float = 1.0
    #: inference actors scoring cutout batches (real/bogus); unused when classify.backend = "none"
    inference_actors: int = 1
    #: CPUs reserved by each inference actor
    inference_cpus: float = 1.0
    #: custom Ray resource each inference actor takes one unit of, to place the pool on its own
    #: nodes (e.g. "inference" on the KubeRay inference group, see docker/); "" = none
    inference_resource: str = ""
    #: CCD-visits queued per subtraction actor (one running, the rest waiting): bounds memory
    queue_depth: int = 2
    #: cutout batches a subtraction actor keeps in flight to the inference pool
    inference_in_flight: int = 4
    #: times Ray restarts a crashed actor before nightsift replaces it with a new one
    max_restarts: int = 3
    #: times a CCD-visit is run again after its actor died with it in flight (the last time running
    #: alone on its actor, so a death is pinned on the CCD-visit that caused it), before it is
    #: recorded failed
    task_retries: int = 2
    #: CCD references kept resident per subtraction actor (least recently used evicted); 0 = all
    max_resident_ccds: int = 0
    #: object store of a local Ray, MiB; 0 = Ray's default (30% of memory)
    object_store_mb: int = 0
    #: synchronise the device after every stage so the ``t_<stage>`` QA times are the stages'
    #: own (profiling, bench/gpu.py); off in production, where a GPU runs ahead of the host
    sync_stage_times: bool = False
    #: worker processes keep the host memory they free for reuse instead of returning it to the OS
    #: (glibc malloc thresholds; backend.retain_host_memory): a CCD-visit's fresh image-sized arrays
    #: otherwise page-fault in again each time (4096^2: 24 -> 13-16 s per visit on 2 cores)
    retain_host_memory: bool = True
    #: Ray engine: CCD-visits of one visit a subtraction actor runs as one batch
    #: (:func:`~nightsift.engine.pipeline.process_visit` with B of them): a GPU is fed whole
    #: focal-plane slices instead of one CCD per call; 0 = 8 on GPU actors and 1 on numpy ones
    #: (on a CPU a batch saves no launches and costs memory traffic: 2.11 vs 1.69 CPU-s per
    #: 1024^2 CCD-visit with B = 2 vs 1, bench/RESULTS.md "night: batches")
    batch_ccds: int = 0
    #: Ray engine: a batch smaller than ``batch_ccds`` is sent once its first CCD-visit has waited
    #: this long (s) for the rest of its visit's CCDs on that actor: a visit is never held back
    #: for stragglers (a batch closes on size, on its visit being complete, or on this deadline)
    batch_deadline_s: float = 0.2
    #: Ray engine, GPU actors: device memory (GiB) each actor gives to resident CCD statics
    #: (reference planes, PSF, master calibration; ~24 bytes/px); the CCDs beyond it keep their
    #: statics in pinned host memory and upload them with each batch. The rest of the GPU is the
    #: batches' working memory (ZOGY on B CCDs). Unused on numpy (statics are host memory there)
    device_budget_gib: float = 40.0
    #: Ray engine: threads per subtraction actor that score, package (cutout compression, Avro)
    #: and stage the alerts of a batch off the device path, while the device runs the next batch
    package_threads: int = 2

    def _check_ranges(self):
        _check(self.workers >= 0, "run.workers", "must be >= 0")
        _check(self.batch_ccds >= 0, "run.batch_ccds", "must be >= 0 (0: 8 on GPU actors, 1 on numpy ones)")
        _check(self.package_threads >= 1, "run.package_threads", "must be >= 1")
        _check(self.batch_deadline_s >= 0 and self.device_budget_gib >= 0, "run.batch_deadline_s/device_budget_gib",
               "must be >= 0")
        _check(self.subtraction_cpus >= 0 and self.inference_cpus >= 0, "run.subtraction_cpus/inference_cpus",
               "must be >= 0")
        _check(self.inference_actors >= 1, "run.inference_actors", "must be >= 1")
        _check(self.queue_depth >= 1 and self.inference_in_flight >= 1, "run.queue_depth/inference_in_flight",
               "must be >= 1")
        _check(self.max_restarts >= -1, "run.max_restarts", "must be >= -1 (-1: unlimited)")
        _check(self.task_retries >= 0 and self.max_resident_ccds >= 0 and self.object_store_mb >= 0,
               "run.task_retries/max_resident_ccds/object_store_mb", "must be >= 0")


@dataclass(frozen=True)
class InputConfig(_Section):
    """A night from a folder of FITS files (``nightsift run --input DIR``; see
    :mod:`nightsift.engine.orchestration.folder` and the README's presets table)."""

    #: folder of the night's FITS files (science, bias/dark/flat, references), searched
    #: recursively; "" = a simulated night ([simulate])
    dir: str = ""
    #: header conventions of the files: "decam" (OBSTYPE, EXPNUM, CCDNUM), "ztf" (IMGTYPE, EXPID,
    #: RCID or CCDID+QID), "lsst" (IMGTYPE, VISIT, DETECTOR) or "generic" (the common keywords)
    preset: InputPreset = "generic"
    #: keyword map: header keyword of the frame type (object/bias/dark/flat/reference), tried
    #: before the preset's; "" = the preset's only
    type_key: str = ""
    #: keyword map: header keyword of the visit (exposure) number; "" = the preset's (then visits
    #: numbered by DATE-OBS + FILTER order, noted in the plan)
    visit_key: str = ""
    #: keyword map: header keyword of the CCD number; "" = the preset's (then a MEF's HDU order)
    ccd_key: str = ""
    #: file names scanned (glob, any depth): .fits, .fits.fz, .fits.gz by default
    pattern: str = "*.fits*"
    #: files under a subfolder of this name are references ("" = none by folder)
    reference_dir: str = "reference"
    #: file names (glob, case-insensitive) that are references wherever they are ("" = none by name)
    reference_pattern: str = "*_ref.fits*"
    #: science frames: "auto" (calibrated when BUNIT is not ADU/DN/counts, a noise-map extension
    #: is there or the preset's processed mark is, else raw ADU calibrated with the CCD's masters),
    #: "raw" or "calibrated" (read as `nightsift subtract` reads its inputs)
    science_kind: ScienceKind = "auto"
    #: a rerun of a folder night skips the CCD-visits its ledger records as done (alert file
    #: present); false runs every CCD-visit again (records and alert files are replaced)
    resume: bool = True


@dataclass(frozen=True)
class DiscoverConfig(_Section):
    """Drift monitoring (the ``drift_*`` fields: the thresholds of
    :func:`nightsift.engine.discover.drift.compare`), anomaly scores and the labeling queue."""

    #: drift: PSI at or above which a distribution has shifted (0.1 minor, 0.25 major by convention)
    drift_psi_threshold: float = 0.25
    #: drift: family-wise false-alarm rate of the KS tests (Bonferroni over CCDs x features)
    drift_ks_alpha: float = 0.01
    #: drift: robust z-score at or above which a per-visit quantity (noise, counts) has shifted
    drift_z_threshold: float = 5.0
    #: drift: smallest scale of a per-visit quantity, as a fraction of its reference median (a
    #: reference that happens to be very tight must not make every small change a flag)
    drift_rel_floor: float = 0.05
    #: drift: quantile bins of the reference for the PSI (plus one for missing values)
    drift_bins: int = 10
    #: drift: a PSI must also exceed this times the PSI spread of the reference's own groups
    #: (visits of a history, CCDs of the focal plane)
    drift_null_factor: float = 1.5
    #: drift: fewest candidates (night and reference) for a distribution to be tested; reference
    #: groups with fewer than half as many do not enter the null
    drift_min_candidates: int = 20
    #: drift: fewest visits (history) or CCDs (focal plane) a reference needs to be used: with one
    #: visit the natural visit-to-visit scatter is unknown, and a healthy CCD would be flagged for it
    drift_min_groups: int = 2
    #: anomaly model (.npz from nightsift retrospective or discover.anomaly.fit_anomaly); "" = no
    #: anomaly score in the packets
    anomaly_model: str = ""
    #: labeling queue: weight of the real/bogus uncertainty against the anomaly rank (0..1)
    label_uncertainty_weight: float = 0.5

    def _check_ranges(self):
        _check(self.drift_psi_threshold > 0, "discover.drift_psi_threshold", "must be > 0")
        _check(0 < self.drift_ks_alpha < 1, "discover.drift_ks_alpha", "must be in (0, 1)")
        _check(self.drift_z_threshold > 0, "discover.drift_z_threshold", "must be > 0")
        _check(self.drift_rel_floor >= 0, "discover.drift_rel_floor", "must be >= 0")
        _check(self.drift_bins >= 2, "discover.drift_bins", "must be >= 2")
        _check(self.drift_null_factor >= 1, "discover.drift_null_factor", "must be >= 1")
        _check(self.drift_min_candidates >= 2, "discover.drift_min_candidates", "must be >= 2")
        _check(self.drift_min_groups >= 1, "discover.drift_min_groups", "must be >= 1")
        _check(0 <= self.label_uncertainty_weight <= 1, "discover.label_uncertainty_weight", "must be in [0, 1]")


@dataclass(frozen=True)
class Config:
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    run: RunConfig = field(default_factory=RunConfig)
    input: InputConfig = field(default_factory=InputConfig)
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)

    def __post_init__(self):
        validate(self)

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """Return a copy with some fields of some sections changed:
        ``cfg.replace(detect={"threshold": 4.5})``."""
        return from_dict(_merge(to_dict(self), sections))


def validate(cfg: Config) -> None:
    """Check every section of ``cfg`` (each checks its own fields: :class:`_Section`); raises
    ConfigError naming the key."""
    for f in fields(Config):
        section = getattr(cfg, f.name)
        _check(isinstance(section, f.default_factory), f"[{f.name}]",  # type: ignore[arg-type]
               f"must be a {f.default_factory.__name__}, got {type(section).__name__}")  # type: ignore[union-attr]
        section.check()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown sections or keys raise ConfigError."""
    kwargs = {}
    sections = {f.name: f for f in fields(Config)}
    for name, value in d.items():
        if name not in sections:
            raise ConfigError(f"config: unknown section [{name}]; known: {sorted(sections)}")
        cls = sections[name].default_factory  # type: ignore[misc]
        if not isinstance(value, Mapping):
            raise ConfigError(f"config [{name}] must be a table of key = value")
        known = {f.name: f for f in fields(cls)}
        for k, v in value.items():
            if k not in known:
                raise ConfigError(f"config {name}.{k}: unknown key; known: {sorted(known)}")
            want = type(getattr(cls(), k))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                continue
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ConfigError(f"config {name}.{k}: expected {want.__name__}, got {v!r}")
        kwargs[name] = cls(**{k: (float(v) if type(getattr(cls(), k)) is float else v) for k, v in value.items()})
    return Config(**kwargs)


def load_config(path: str | Path | None = None, **overrides: Mapping[str, Any]) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return from_dict(_merge(data, overrides))


assert all(is_dataclass(f.default_factory) for f in fields(Config))  # noqa: S101 (module invariant)
