"""Fault injection: the bad-input table for ``nightsift subtract`` (issue #14). It only grows.

Every row is an input a hostile user or a failing machine can hand the chain: broken FITS files,
missing or broken WCS, pixels that carry no information, shape and dtype oddities, a huge header,
the same file twice, a tampered model, output folders that cannot be used. Each must end the same
way:

* exit code 2;
* stderr is ONE line, starting ``nightsift: error:``, naming the file (or folder) and the problem;
* no traceback;
* nothing written: the output folder is not created (or, when it exists, left as it was).

A row is ``Case(name, build, words)``: ``build(tmp, sim)`` writes what the case needs under ``tmp``
and returns the command-line arguments after ``subtract``; ``words`` are substrings the error line
must contain (``{sci}``, ``{ref}``, ``{out}``, ``{tmp}`` are filled in). The pair is a 512x512
simulated CCD from ``nightsift simulate`` (as in test_pipeline.py).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from astropy.io import fits

from nightsift.engine.cli import main
from nightsift.engine.io.fits import MAX_HEADER_CARDS, read_exposure, write_exposure
from nightsift.engine.records import Exposure


@dataclass(frozen=True)
class Sim:
    sci: Path  # calibrated science exposure written by `nightsift simulate`
    ref: Path  # its reference
    exposure: Exposure  # the science exposure as read_exposure returns it


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Sim:
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--out", str(out), "--size", "512", "--seed", "11"]) == 0
    stem = out / "visit0000_ccd000"
    sci, ref = Path(f"{stem}_sci.fits"), Path(f"{stem}_ref.fits")
    return Sim(sci=sci, ref=ref, exposure=read_exposure(sci))


# ------------------------------------------------------------------------------------------------
# helpers that make bad files
# ------------------------------------------------------------------------------------------------
def _exposure(e: Exposure, **kw) -> Exposure:
    d = dict(image=e.image, variance=e.variance, mask=e.mask, wcs=e.wcs, header=e.header)
    d.update(kw)
    return Exposure(**d)


def _write(tmp: Path, name: str, e: Exposure) -> Path:
    write_exposure(tmp / name, e)
    return tmp / name


def _copy(tmp: Path, src: Path, name: str) -> Path:
    shutil.copy(src, tmp / name)
    return tmp / name


def _patch_card(path: Path, key: str, raw_value: str, *, hdu: str = "IMAGE") -> Path:
    """Overwrite card ``key`` of HDU ``hdu`` in place with ``raw_value`` verbatim (it may be
    unparsable: astropy refuses to write such a card, so the bytes are edited)."""
    b = bytearray(path.read_bytes())
    start = b.index(f"EXTNAME = '{hdu}".encode()) if hdu else 0
    start -= start % 2880  # the header's first block
    i = b.index((key.ljust(8) + "=").encode(), start)
    b[i:i + 80] = (key.ljust(8) + "= " + raw_value).ljust(80)[:80].encode()
    path.write_bytes(bytes(b))
    return path


def _edit_image_header(tmp: Path, sim: Sim, name: str, edit: Callable[[fits.Header], None]) -> Path:
    p = _copy(tmp, sim.sci, name)
    with fits.open(p, mode="update") as hdul:
        edit(hdul["IMAGE"].header)
    return p


def _tpv(h: fits.Header) -> None:
    """Turn the TAN WCS into an (identity) TPV one: PV1_1 = PV2_1 = 1, the rest 0."""
    h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    for i in (1, 2):
        for m in range(0, 11):
            h[f"PV{i}_{m}"] = 1.0 if m == 1 else 0.0


def _zero_cd(h: fits.Header) -> None:
    for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        h[k] = 0.0


def _no_wcs(h: fits.Header) -> None:
    for k in list(h.keys()):
        if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1", "CD2", "PC1", "PC2", "CDELT", "CUNIT", "WCSAXES",
                         "LONPOLE", "LATPOLE", "RADESYS")):
            del h[k]


def _huge_header(tmp: Path, sim: Sim) -> Path:
    """The science file with a primary header of MAX_HEADER_CARDS + 1000 COMMENT cards."""
    b = sim.sci.read_bytes()
    end = 0
    while b[end:end + 8] != b"END     ":
        end += 80
    first = end - end % 2880 + 2880  # the primary header's length in bytes
    card = lambda s: s.ljust(80).encode()  # noqa: E731
    head = b"".join(card(c) for c in ("SIMPLE  =                    T", "BITPIX  =                    8",
                                      "NAXIS   =                    0", "EXTEND  =                    T"))
    head += card("COMMENT padding") * (MAX_HEADER_CARDS + 1000) + card("END")
    head += b" " * (-len(head) % 2880)
    p = tmp / "hugeheader.fits"
    p.write_bytes(head + b[first:])
    return p


def _tampered_model_config(tmp: Path) -> Path:
    """A copy of the shipped model folder whose int8 .tflite has 32 KiB of flipped bytes, and a
    TOML configuration pointing classify.model at that .tflite."""
    from nightsift.engine.classify.runtime import MODELS_DIR

    models = tmp / "models"
    models.mkdir()
    for p in MODELS_DIR.iterdir():
        if p.suffix in (".json", ".tflite", ".keras"):
            shutil.copy(p, models / p.name)
    meta = json.loads(next(models.glob("*.json")).read_text())
    tfl = models / meta["files"]["tflite_int8"]
    b = bytearray(tfl.read_bytes())
    k = len(b) // 3
    b[k:k + 32768] = bytes(x ^ 0xFF for x in b[k:k + 32768])
    tfl.write_bytes(bytes(b))
    cfg = tmp / "tampered.toml"
    cfg.write_text(f'[classify]\nbackend = "tflite"\nmodel = "{tfl}"\n')
    return cfg


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Sim], list]  # -> [sci, ref, (options...)]; "--out" is added unless given
    words: tuple[str, ...]
    xfail: str | None = None


def _pair(sci, ref):
    return lambda tmp, sim: [sci(tmp, sim) if callable(sci) else sci, ref(tmp, sim) if callable(ref) else ref]


def _sci(tmp, sim):
    return sim.sci


def _ref(tmp, sim):
    return sim.ref


def _raw(name: str, data: bytes):
    def make(tmp, sim):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _truncated(frac: float, name: str):
    def make(tmp, sim):
        b = sim.sci.read_bytes()
        (tmp / name).write_bytes(b[: int(len(b) * frac)])
        return tmp / name
    return make


def _bytes_flipped_in_first_card(tmp, sim):
    b = bytearray(sim.sci.read_bytes())
    b[:6] = b"XIMPLE"
    (tmp / "flipped.fits").write_bytes(bytes(b))
    return tmp / "flipped.fits"


def _pixels(name: str, fill):
    def make(tmp, sim):
        e = sim.exposure
        return _write(tmp, name, _exposure(e, image=fill(np.asarray(e.image)).astype(np.float32)))
    return make


def _saturated_everywhere(tmp, sim):
    e = sim.exposure
    h = e.header.copy()
    h["SATURATE"] = (5000.0, "e-")
    img = 5000.0 + np.abs(np.random.default_rng(1).normal(0, 20, e.shape))
    return _write(tmp, "saturated.fits", _exposure(e, image=img.astype(np.float32), header=h))


def _hdul_file(name: str, hdus):
    def make(tmp, sim):
        fits.HDUList(hdus(sim)).writeto(tmp / name)
        return tmp / name
    return make


def _with_extension(name: str, ext: str, array):
    """The science exposure with extension ``ext`` replaced by ``array(sim)``."""
    def make(tmp, sim):
        p = _copy(tmp, sim.sci, name)
        with fits.open(p, mode="update") as hdul:
            hdul[ext] = fits.ImageHDU(array(sim), header=hdul[ext].header, name=ext)
        return p
    return make


def _header_edit(name: str, edit):
    return lambda tmp, sim: _edit_image_header(tmp, sim, name, edit)


def _patched(name: str, edit, key: str, value: str):
    return lambda tmp, sim: _patch_card(_edit_image_header(tmp, sim, name, edit), key, value)


def _out_is_file(tmp, sim):
    (tmp / "out.txt").write_text("keep me")
    return [sim.sci, sim.ref, "--out", tmp / "out.txt"]


def _out_under_file(tmp, sim):
    (tmp / "plain").write_text("keep me")
    return [sim.sci, sim.ref, "--out", tmp / "plain" / "sub" / "out"]


def _out_unwritable(tmp, sim):
    return [sim.sci, sim.ref, "--out", "/proc/nightsift-out/sub"]


def _out_read_only_fs(tmp, sim):
    return [sim.sci, sim.ref, "--out", "/sys/nightsift-out"]


def _tampered(tmp, sim):
    return [sim.sci, sim.ref, "--config", _tampered_model_config(tmp)]


def _tampered_and_missing_input(tmp, sim):
    return [tmp / "missing_sci.fits", sim.ref, "--config", _tampered_model_config(tmp)]


def _same_twice(tmp, sim):
    return [sim.sci, sim.sci]


def _same_twice_copy(tmp, sim):
    return [sim.sci, _copy(tmp, sim.sci, "copy_of_sci.fits")]


CASES = [
    # -- the file itself
    Case("missing science", _pair(lambda t, s: t / "nope.fits", _ref), ("nope.fits", "not found")),
    Case("missing reference", _pair(_sci, lambda t, s: t / "noref.fits"), ("noref.fits", "not found")),
    Case("empty file", _pair(_raw("empty.fits", b""), _ref), ("empty.fits", "corrupt")),
    Case("not FITS", _pair(_raw("garbage.fits", b"this is not FITS at all " * 200), _ref),
         ("garbage.fits", "not a readable FITS")),
    Case("first card corrupt", _pair(_bytes_flipped_in_first_card, _ref), ("flipped.fits", "not a readable FITS")),
    Case("truncated in the data", _pair(_truncated(0.5, "half.fits"), _ref), ("half.fits", "truncated")),
    Case("truncated in a header", _pair(_truncated(0.0004, "head.fits"), _ref), ("head.fits",)),
    Case("directory", _pair(lambda t, s: t, _ref), ("{tmp}", "directory")),
    Case("huge header", _pair(_huge_header, _ref), ("hugeheader.fits", f"more than {MAX_HEADER_CARDS} cards")),
    # -- WCS
    Case("no WCS", _pair(_header_edit("nowcs.fits", _no_wcs), _ref), ("nowcs.fits", "no celestial WCS")),
    Case("bad CD card", _pair(_patched("badcd.fits", lambda h: h.update(CD1_1=h["PC1_1"] * h["CDELT1"]), "CD1_1",
                                       "-7.5O00E-05"), _ref), ("badcd.fits", "CD1_1", "unusable")),
    Case("zero CD matrix", _pair(_header_edit("zerocd.fits", _zero_cd), _ref), ("zerocd.fits", "singular")),
    Case("bad PV card", _pair(_patched("badpv.fits", _tpv, "PV1_1", "1.0x"), _ref), ("badpv.fits", "PV1_1")),
    Case("bad CRVAL card", _pair(_patched("badcrval.fits", lambda h: None, "CRVAL2", "'abc'"), _ref),
         ("badcrval.fits", "CRVAL2")),
    Case("unknown projection", _pair(_header_edit("proj.fits", lambda h: h.update(CTYPE1="RA---XYZ")), _ref),
         ("proj.fits", "WCS")),
    # -- pixels
    Case("NaN-only frame", _pair(_pixels("nan.fits", lambda a: np.full(a.shape, np.nan)), _ref),
         ("nan.fits", "no finite pixel")),
    Case("inf-only frame", _pair(_pixels("inf.fits", lambda a: np.full(a.shape, np.inf)), _ref),
         ("inf.fits", "no finite pixel")),
    Case("all-zero frame", _pair(_pixels("zero.fits", np.zeros_like), _ref), ("zero.fits", "constant")),
    Case("NaN-only reference", _pair(_sci, _pixels("nanref.fits", lambda a: np.full(a.shape, np.nan))),
         ("nanref.fits", "no finite pixel")),
    Case("saturated everywhere", _pair(_saturated_everywhere, _ref), ("saturated.fits", "SATURATE", "overexposed")),
    Case("variance all NaN", _pair(_with_extension("varnan.fits", "VARIANCE",
                                                   lambda s: np.full(s.exposure.shape, np.nan, np.float32)), _ref),
         ("varnan.fits", "VARIANCE")),
    # -- shapes and dtypes
    Case("3-D image", _pair(_hdul_file("cube.fits", lambda s: [fits.PrimaryHDU(np.zeros((3, 64, 64), np.float32))]),
                            _ref), ("cube.fits", "no 2-D image")),
    Case("1-D image", _pair(_hdul_file("line.fits", lambda s: [fits.PrimaryHDU(np.arange(512, dtype=np.float32))]),
                            _ref), ("line.fits", "no 2-D image")),
    Case("variance of another shape", _pair(_with_extension("varshape.fits", "VARIANCE",
                                                            lambda s: np.ones((256, 512), np.float32)), _ref),
         ("varshape.fits", "VARIANCE", "does not match")),
    Case("mask of another shape", _pair(_with_extension("maskshape.fits", "MASK",
                                                        lambda s: np.zeros((512, 256), np.uint16)), _ref),
         ("maskshape.fits", "MASK", "does not match")),
    Case("negative integer mask", _pair(_with_extension("maskneg.fits", "MASK",
                                                        lambda s: np.full(s.exposure.shape, -1, np.int32)), _ref),
         ("maskneg.fits", "MASK", "outside 0..65535")),
    Case("fractional float mask", _pair(_with_extension("maskfloat.fits", "MASK",
                                                        lambda s: np.full(s.exposure.shape, 0.5, np.float32)), _ref),
         ("maskfloat.fits", "MASK", "non-integer")),
    # -- the same pixels twice (the lead's change: a degenerate subtraction is refused naming both files)
    Case("same file twice", _same_twice, ("{sci}", "same file")),
    Case("same pixels in two files", _same_twice_copy, ("{sci}", "copy_of_sci.fits", "same pixels")),
    # -- the model
    Case("tampered model", _tampered, ("nightsift_rb_int8.tflite", "SHA-256")),
    Case("bad input hidden behind a tampered model", _tampered_and_missing_input, ("missing_sci.fits", "not found")),
    # -- the output folder
    Case("--out is a file", _out_is_file, ("out.txt", "is a file")),
    Case("--out under a file", _out_under_file, ("plain", "is a file")),
    Case("--out not creatable", _out_unwritable, ("/proc/nightsift-out/sub", "cannot create")),
    Case("--out on a read-only file system", _out_read_only_fs, ("/sys/nightsift-out", "cannot create")),
]


def _tree(path: Path) -> dict:
    """Every file and folder under ``path`` with its bytes: what 'nothing written' compares."""
    return {q: (q.read_bytes() if q.is_file() else "dir") for q in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input_ends_in_one_clear_line(case, sim, tmp_path, capsys):
    work = tmp_path / "in"
    work.mkdir()
    args = [str(a) for a in case.build(work, sim)]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    out = Path(args[args.index("--out") + 1])
    config = []
    if "--config" in args:  # a global option: before the subcommand
        k = args.index("--config")
        config = args[k:k + 2]
        del args[k:k + 2]
    out_existed = out.exists()
    before = _tree(tmp_path)
    rc = main(config + ["subtract", *args])
    captured = capsys.readouterr()
    err = captured.err.strip("\n")
    assert rc == 2, (case.name, rc, captured.out[-500:], err)
    assert "Traceback" not in err, err
    # LiteRT's own C++ notice (printed when a model loads) is not nightsift's output
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO: Created TensorFlow Lite")]
    assert len(lines) == 1, (case.name, err)
    line = lines[0]
    assert line.startswith("nightsift: error:"), line
    fill = {"sci": str(sim.sci), "ref": str(sim.ref), "out": str(out), "tmp": str(work)}
    for word in case.words:
        assert word.format(**fill) in line, (case.name, word, line)
    # nothing written: no output folder appeared, nothing under the test's folder changed
    assert out.exists() == out_existed, f"{case.name}: {out} was created"
    assert _tree(tmp_path) == before, f"{case.name}: files were written"


def test_the_table_only_grows():
    """The figure for the closing note: the bad inputs the table tries (never fewer)."""
    assert len(CASES) >= 35
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_run_refuses_an_unusable_out_before_any_work(tmp_path, capsys, engine):
    """``nightsift run`` checks --out before simulating or starting Ray (it used to fail after the night)."""
    import time

    (tmp_path / "out.txt").write_text("keep me")
    t0 = time.perf_counter()
    rc = main(["run", "--engine", engine, "--visits", "1", "--ccds", "1", "--size", "512", "--quiet",
               "--out", str(tmp_path / "out.txt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("nightsift: error:") and "out.txt" in err
    assert time.perf_counter() - t0 < 5  # no night ran
    assert (tmp_path / "out.txt").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [tmp_path / "out.txt"]
