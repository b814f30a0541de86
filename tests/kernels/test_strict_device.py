"""The strict device stand-in (tests/strict_device.py): it refuses every implicit host conversion,
counts what really crosses, agrees with nightsift's TransferLedger, and runs the kernels unchanged
with the same results as numpy."""
import operator
import pickle

import numpy as np
import pytest
from scipy import ndimage

from nightsift.kernels import _xp, count_transfers, host_scalars, to_device, to_host
from nightsift.kernels import peaks as kpeaks
from nightsift.kernels import psf as kpsf
from nightsift.kernels import stamps as kstamps
from nightsift.kernels import tiles as ktiles
from nightsift.kernels.zogy import zogy
from tests.strict_device import StrictArray, strict, strict_namespace

REFUSED = r"strict device|__array_ufunc__=None"


@pytest.fixture
def sx():
    return strict_namespace()


@pytest.fixture
def sa(sx):
    a = sx.asarray(np.array([1.5, -2.0, 3.25]))
    sx.reset_stats()
    return a


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def _if_any(a):
    if strict.any(a > 0):
        return 1
    return 0


def _setitem_numpy(a):
    a[:2] = np.zeros(2)


REFUSALS = {
    "np.asarray": lambda a: np.asarray(a),
    "np.array of a list": lambda a: np.array([a, a]),
    "np.float64()": lambda a: np.float64(a[0]),
    "float": lambda a: float(a[0]),
    "int": lambda a: int(a[0]),
    "operator.index": lambda a: operator.index(a.argmax()),
    "range bound": lambda a: range(a.argmax()),
    "complex": lambda a: complex(a[0]),
    "bool in an if": _if_any,
    "and": lambda a: (a[0] > 0) and 1,
    ".item()": lambda a: a[0].item(),
    ".tolist()": lambda a: a.tolist(),
    "iteration of 1-D": lambda a: list(a),
    "for loop": lambda a: [v for v in a],
    "in": lambda a: 1.5 in a,
    "format spec": lambda a: f"{a[0]:.3f}",
    "pickle": lambda a: pickle.dumps(a),
    "np.sqrt (ufunc)": lambda a: np.sqrt(a),
    "np.sum (array function)": lambda a: np.sum(a),
    "np.where": lambda a: np.where(a > 0, a, 0),
    "a + numpy": lambda a: a + np.ones(3),
    "numpy + a": lambda a: np.ones(3) + a,
    "numpy < a": lambda a: np.ones(3) < a,
    "a += numpy": lambda a: operator.iadd(a, np.ones(3)),
    "numpy += a": lambda a: operator.iadd(np.ones(3), a),
    "xp.where with numpy": lambda a: strict.where(a > 0, a, np.zeros(3)),
    "xp.stack with numpy": lambda a: strict.stack([a, np.zeros(3)]),
    "numpy index": lambda a: a[np.array([0, 2])],
    "setitem numpy value": _setitem_numpy,
    "numpy setitem device value": lambda a: operator.setitem(np.zeros(3), slice(None), a),
}


@pytest.mark.parametrize("what", list(REFUSALS))
def test_implicit_conversions_and_mixing_raise(sa, sx, what):
    with pytest.raises(TypeError, match=REFUSED):
        REFUSALS[what](sa)
    assert sx.stats.as_dict() == dict.fromkeys(sx.stats.as_dict(), 0)  # nothing crossed on the way


def test_enum_members_are_refused_as_operands_as_cupy_does(sx):
    # cupy 14 on an H200: ``mask & MaskBits.BAD`` -> TypeError (NotImplemented from __array_ufunc__)
    from nightsift.engine.records import MaskBits

    m = sx.asarray(np.array([0, 1, 5], np.uint16))
    for op in (lambda: m & MaskBits.BAD, lambda: m | (MaskBits.BAD | MaskBits.SAT),
               lambda: sx.bitwise_and(m, MaskBits.NO_DATA)):
        with pytest.raises(TypeError, match="strict device: enum operand"):
            op()
    assert (m & int(MaskBits.NO_DATA)).get().tolist() == [0, 0, 4]


def test_no_array_interfaces_and_values_never_printed(sa):
    for name in ("__array_interface__", "__array_struct__", "__dlpack__", "flat"):
        assert not hasattr(sa, name)
    for name in ("save", "loadtxt", "array2string", "testing"):  # host I/O behind the ledger's back
        with pytest.raises(AttributeError, match="reads or writes host data"):
            getattr(strict, name)
    for text in (repr(sa), str(sa), f"{sa}", repr(sa.sum())):
        assert "1.5" not in text and "2.75" not in text and "StrictArray(shape=" in text


def test_numba_refuses_it(sa):
    numba = pytest.importorskip("numba")
    with pytest.raises(numba.core.errors.TypingError):
        numba.njit(lambda v: v.sum())(sa)


# ------------------------------------------------------------------------------------------------
# what is allowed stays on the device and behaves like numpy
# ------------------------------------------------------------------------------------------------
def test_device_operations_match_numpy(sx):
    h = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    a = sx.asarray(h)
    checks = [
        (a * np.float32(2) + 1, h * np.float32(2) + 1),
        (np.float64(0.5) * a, np.float64(0.5) * h),
        (2 ** a[0], 2 ** h[0]),
        (divmod(a, 3)[1], divmod(h, 3)[1]),
        (abs(-a) @ a.T, abs(-h) @ h.T),
        (a[a > 0], h[h > 0]),
        (a[sx.asarray([2, 0]), 1:], h[[2, 0], 1:]),
        (a.sum(axis=0), h.sum(axis=0)),
        (a.max(), h.max()),
        (sx.where(a > 0, a, 0.0), np.where(h > 0, h, 0.0)),
        (sx.add.reduce(a, axis=1), np.add.reduce(h, axis=1)),
        (sx.mgrid[0:2, 0:3][1], np.mgrid[0:2, 0:3][1]),
        (sx.fft.irfft2(sx.fft.rfft2(a, workers=1), s=h.shape), h),
        (sx.ndimage.uniform_filter(a, 3), ndimage.uniform_filter(h, 3)),
        (sx.random.default_rng(3).normal(size=4), np.random.default_rng(3).normal(size=4)),
    ]
    for got, want in checks:
        assert isinstance(got, StrictArray)
        g = got.get()
        assert g.dtype == want.dtype and g.shape == want.shape
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-5)
    assert a.sum().shape == () and isinstance(a[0, 0], StrictArray)  # 0-d device arrays, as cupy
    b = a.copy()
    assert operator.iadd(b, 1) is b and b.astype(np.float32, copy=False) is b
    b[0, :] = a[1, :]
    b.sort(axis=1)
    np.testing.assert_array_equal(b.get()[0], np.sort(h[1]))
    rows = list(a)  # iterating >= 2-D yields device rows (tuple unpacking); nothing crosses
    assert len(rows) == len(a) == 3 and isinstance(rows[0], StrictArray)
    assert sx.shape(a) == (3, 4) and sx.result_type(a, 1.0) == np.float32 and sx.newaxis is None
    assert sx.finfo(sx.float32).eps == np.finfo(np.float32).eps and sx.pi == np.pi


def test_explicit_crossings_are_counted(sx):
    d = sx.asarray(np.zeros((4, 5), np.float32))
    sx.asarray([1.0, 2.0])  # a Python list is an upload too (16 bytes), as cupy.asarray
    sx.asarray(3)  # and so is a Python scalar (8 bytes)
    assert sx.stats.as_dict() == {"h2d_bytes": 80 + 16 + 8, "h2d_count": 3, "d2h_bytes": 0, "d2h_count": 0}
    e = sx.stack([sx.asarray(d), d + 1, sx.zeros_like(d)])  # device-side work moves nothing
    sx.asarray([d, d])
    assert sx.stats.h2d_count == 3 and sx.stats.d2h_count == 0
    out = e.get()
    assert out.shape == (3, 4, 5) and isinstance(out, np.ndarray)
    assert (sx.stats.d2h_bytes, sx.stats.d2h_count) == (240, 1)
    assert strict_namespace().stats.as_dict() == dict.fromkeys(sx.stats.as_dict(), 0)


def test_array_namespace_finds_it(sx, sa):
    assert _xp.array_namespace(sa) is sx and _xp.array_namespace(None, 2.0, sa, sa) is sx
    assert _xp.fft_module(sx) is sx.fft and _xp.ndimage_module(sx) is sx.ndimage
    assert not _xp.is_host(sx) and not _xp.is_cupy(sx) and _xp.fft_kwargs(sx) == {}
    with pytest.raises(TypeError, match="mixed array modules"):
        _xp.array_namespace(sa, np.zeros(3))


def test_xp_doors_record_what_really_crossed(sx):
    host = np.arange(100, dtype=np.float32)
    with count_transfers() as led:
        d = to_device(host, sx, label="in")
        assert to_device(d, sx) is d  # already on the device: nothing moves
        back = to_host(d * 2, label="out")
        vals = host_scalars(d.sum(), d.max() > 50, d.argmax(), 7)
    np.testing.assert_array_equal(back, host * 2)
    assert vals == (4950.0, True, 99, 7)
    assert [type(v) for v in vals] == [float, bool, int, int]
    want = {"h2d_bytes": 400, "h2d_count": 1, "d2h_bytes": 400 + 3 * 8, "d2h_count": 2}
    assert sx.stats.as_dict() == want
    assert {k: getattr(led, k) for k in want} == want and led.scalar_reads == 1


# ------------------------------------------------------------------------------------------------
# the kernels, unchanged, on the stand-in
# ------------------------------------------------------------------------------------------------
def _gauss(s, fwhm, dx=0.0, dy=0.0):
    y, x = np.mgrid[:s, :s] - s // 2
    g = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * (fwhm / kpsf.FWHM_PER_SIGMA) ** 2))
    return g / g.sum()


def _zogy(rng):
    T, n = 2, 40
    pn = kpsf.embed_psf(np.stack([_gauss(15, 3.0), _gauss(15, 3.4)]), (n, n))
    pr = kpsf.embed_psf(np.stack([_gauss(15, 2.4), _gauss(15, 2.6)]), (n, n))
    N, R = rng.normal(0, 1.0, (T, n, n)), rng.normal(0, 0.7, (T, n, n))
    N[:, 20, 11] += 40.0
    VN, VR = np.full((T, n, n), 1.0), np.full((T, n, n), 0.49)

    def run(*a):
        r = zogy(*a, sigma_n=1.0, sigma_r=0.7, F_r=1.3, astrometric_rms=(0.1, 0.05))
        return r.D, r.S, r.S_corr, r.V_S, r.V_ast, r.P_D, r.F_D, r.F_S
    return (N, R, pn, pr, VN, VR), run


def _peaks(rng):
    s = ndimage.gaussian_filter(rng.normal(size=(2, 40, 50)), (0, 1.2, 1.2))
    s = (np.round(s / s.std() * 2.5 / 0.5) * 0.5).astype(np.float32)  # flat tops and ties
    s[1, 5, 7] = np.nan
    excluded = rng.random(s.shape) < 0.05

    def run(scores, ex):
        p = kpeaks.find_peaks(scores, threshold=2.0, radius=3.0, excluded=ex, method="reference")
        return (p.image, p.y, p.x, p.value, p.sign) + kpeaks.refine_peaks(scores, p)
    return (s, excluded), run


def _stamps(rng):
    img = rng.normal(size=(60, 70)).astype(np.float32)
    x, y = np.array([0.2, 35.6, 69.4, 10.0]), np.array([59.9, 30.2, 0.4, 2.5])
    return (img, x, y), lambda i, xs, ys: kstamps.extract_stamps(i, xs, ys, size=7)


def _fourier_shift(rng):
    st = np.stack([_gauss(s, 3.0) for s in (16, 16, 16)]) + rng.normal(0, 1e-4, (3, 16, 16))
    return (st, rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)), lambda *a: (kpsf.fourier_shift(*a),)


def _moments(rng):
    st = np.stack([_gauss(21, f, dx, -dx) for f, dx in ((3.0, 0.3), (4.5, -1.0), (2.2, 0.0))])
    st = st + rng.normal(0, 1e-4, st.shape)
    st[2] = -st[2]  # no positive flux: NaN moments
    return (st,), lambda a: kpsf.moments(a, sigma=2.0)


def _psf_more(rng):
    st = np.stack([_gauss(15, 3.0, dx, dy) * f for dx, dy, f in ((0.3, -0.2, 100), (-0.4, 0.1, 80), (0, 0.2, 50))])
    return (st + rng.normal(0, 1e-3, st.shape),), lambda a: kpsf.centroid(a) + (kpsf.recenter(a[0]),)


def _stack_psf(rng):
    st, _ = _psf_more(rng)
    return st + (np.array([0.3, -0.4, 0.0]), np.array([-0.2, 0.1, 0.2])), lambda *a: (kpsf.stack_psf(*a),)


def _half_max_fwhm(rng):
    return (_gauss(15, 3.0),), lambda a: (kpsf.half_max_fwhm(a),)


def _tiles(rng):
    img = rng.normal(size=(50, 70)).astype(np.float32)
    grid = ktiles.make_grid(img.shape, core=32, margin=8)

    def run(a):
        t = ktiles.cut_tiles(a, grid, fill=-1.0)
        return t, ktiles.stitch_tiles(t, grid)
    return (img,), run


def _bug(where):
    return pytest.mark.xfail(strict=True, raises=TypeError, reason=f"kernel converts implicitly: {where}")


CASES = {
    "zogy": _zogy,
    "find_peaks+refine_peaks": _peaks,
    "extract_stamps": _stamps,
    "fourier_shift": _fourier_shift,
    "moments": _moments,
    "centroid+recenter": _psf_more,
    "stack_psf": _stack_psf,
    "half_max_fwhm": _half_max_fwhm,
    "cut_tiles+stitch_tiles": _tiles,
}
# kernels that made an upload with xp.asarray bypassing to_device (none left; keep the hook)
HIDDEN: dict = {}


def _params(extra=None):
    out = []
    for name, case in CASES.items():
        marks = list(getattr(case, "marks", ()))
        fn = case.values[0] if hasattr(case, "values") else case
        if extra and name in extra:
            marks = [extra[name]]
        out.append(pytest.param(fn, id=name, marks=marks))
    return out


def _on(xp, case, seed=20261125):
    host, run = case(np.random.default_rng(seed))
    return run(*(to_device(a, xp) for a in host))


@pytest.mark.parametrize("case", _params())
def test_kernel_on_strict_device_equals_numpy(sx, case):
    want = _on(np, case)
    got = _on(sx, case)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, StrictArray), f"output {i} left the device: {type(g).__name__}"
        g, w = to_host(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, f"output {i}"
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12 * max(1.0, np.nanmax(np.abs(w), initial=0)),
                                   equal_nan=True, err_msg=f"output {i}")


@pytest.mark.parametrize("case", _params(HIDDEN))
def test_kernel_moves_nothing_behind_the_ledger(sx, case):
    host, run = case(np.random.default_rng(1))
    args = [to_device(a, sx) for a in host]
    sx.reset_stats()
    with count_transfers() as led:
        run(*args)
    assert sx.stats.as_dict() == {k: getattr(led, k) for k in sx.stats.as_dict()}
