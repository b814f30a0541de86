"""The xp source catalogue (kernels.sources) against sep (the host-only C extractor it replaces) and
the truth of simulated CCDs, against brute-force oracles of its measurements, batched vs single
calls, edge cases, and on the strict device stand-in."""
import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from nightsift.kernels import count_transfers, to_device, to_host
from nightsift.kernels import sources as ks
from nightsift.kernels.peaks import find_peaks
from nightsift.kernels.psf import FWHM_PER_SIGMA
from nightsift.kernels.sources import FLAG_EDGE, FLAG_MASKED, Sources, detect_sources, robust_std

sep = pytest.importorskip("sep")

FIELDS = ("image", "x", "y", "flux", "fluxerr", "snr", "peak", "a", "b", "theta", "flag")


def _host(s: Sources) -> dict:
    return {f: to_host(getattr(s, f)) for f in FIELDS}


def _assert_same(s1: Sources, s2: Sources, exact=True):
    h1, h2 = _host(s1), _host(s2)
    for f in FIELDS:
        assert h1[f].dtype == h2[f].dtype, f
        if exact:
            np.testing.assert_array_equal(h1[f], h2[f], err_msg=f)
        else:
            np.testing.assert_allclose(h1[f], h2[f], rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=f)


def _gauss(shape, sources, *, sigma_xy=(1.5, 1.5), theta=0.0):
    """Noise-free image of pixel-centre-sampled elliptical Gaussians ``(x, y, flux)``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    sx, sy = sigma_xy
    c, s = math.cos(theta), math.sin(theta)
    out = np.zeros(shape)
    for x0, y0, f in sources:
        u = (xx - x0) * c + (yy - y0) * s
        v = -(xx - x0) * s + (yy - y0) * c
        out += f / (2 * math.pi * sx * sy) * np.exp(-0.5 * (u**2 / sx**2 + v**2 / sy**2))
    return out


# ------------------------------------------------------------------------------------------
# simulated CCDs, sep as the oracle
# ------------------------------------------------------------------------------------------
def _field(profile, seed):
    from nightsift.engine.records import UNUSABLE
    from nightsift.engine.simulate import simulate_ccd_pair

    sim = simulate_ccd_pair(profile, shape=(1024, 1024), seed=seed)
    e = sim.science_exposure()
    bad = (e.mask & UNUSABLE) != 0
    img = np.ascontiguousarray(e.image, np.float32)
    bkg = sep.Background(img, mask=bad, bw=64, bh=64)
    sub = (img - bkg.back()).astype(np.float32)
    fwhm = float(sim.science_raw.header["FWHM"])
    cat = detect_sources(sub, float(bkg.globalrms), fwhm=fwhm, mask=bad)
    sep.set_extract_pixstack(1_000_000)
    objs = sep.extract(sub, 5.0, err=float(bkg.globalrms), mask=bad, minarea=5)
    return dict(sim=sim, sub=sub, bad=bad, sigma=float(bkg.globalrms), fwhm=fwhm, cat=_host(cat), sep=objs)


@pytest.fixture(scope="module")
def decam():
    return _field("decam", 3)


@pytest.fixture(scope="module")
def ztf():
    return _field("ztf", 1)


def _stars_vs_sep(f):
    """Truth stars inside the CCD (3 px margin, unsaturated); the S/N of the sep.extract object at
    each (``sum_circle`` S/N at the sep position, 0 for a star sep did not detect within 1 px) and
    the distance to and index of the nearest catalogue source."""
    sim, sub, bad, fw, objs = f["sim"], f["sub"], f["bad"], f["fwhm"], f["sep"]
    st = sim.stars
    ny, nx = sub.shape
    st = st[(st["x"] > 3) & (st["x"] < nx - 4) & (st["y"] > 3) & (st["y"] < ny - 4) & ~st["saturated_sci"]]
    flux, err, _ = sep.sum_circle(sub, objs["x"], objs["y"], max(2 * fw, 3.0), err=f["sigma"], mask=bad)
    ds, js = cKDTree(np.c_[objs["x"], objs["y"]]).query(np.c_[st["x"], st["y"]])
    snr = np.where(ds < 1.0, (flux / err)[js], 0.0)
    cat = f["cat"]
    d, j = cKDTree(np.c_[cat["x"], cat["y"]]).query(np.c_[st["x"], st["y"]])
    return st, snr, d, j


@pytest.mark.parametrize("field", ["decam", "ztf"])
def test_finds_every_significant_star(field, request):
    """(a, g) every unsaturated true star with sep aperture S/N > 20 is found within 0.5 px (DECam
    FWHM ~3.3 px; ZTF FWHM ~2.2 px, undersampled)."""
    f = request.getfixturevalue(field)
    st, snr, d, _ = _stars_vs_sep(f)
    sel = snr > 20
    assert sel.sum() >= 30
    assert np.all(d[sel] < 0.5), (d[sel].max(), st[sel][d[sel] >= 0.5])


@pytest.mark.parametrize("field", ["decam", "ztf"])
def test_centroids_of_bright_isolated_stars(field, request):
    """(b) windowed centroids of bright (S/N > 50), isolated, unflagged stars: < 0.05 px RMS per
    axis from the truth, and as good as sep.winpos with the same window (same estimator)."""
    f = request.getfixturevalue(field)
    sim, cat, fw = f["sim"], f["cat"], f["fwhm"]
    st, snr, d, j = _stars_vs_sep(f)
    every = np.r_[np.c_[sim.stars["x"], sim.stars["y"]], np.c_[sim.galaxies["x"], sim.galaxies["y"]],
                  np.c_[sim.transients["x"], sim.transients["y"]]]
    dn, _ = cKDTree(every).query(np.c_[st["x"], st["y"]], k=2)
    sel = (snr > 50) & (dn[:, 1] > 6 * fw) & (d < 0.5) & (cat["flag"][j] == 0)
    assert sel.sum() >= 10
    dx, dy = cat["x"][j[sel]] - st["x"][sel], cat["y"][j[sel]] - st["y"][sel]
    rms = math.sqrt(np.mean(np.r_[dx, dy] ** 2))
    assert rms < 0.05, rms
    window = np.full(sel.sum(), fw / FWHM_PER_SIGMA)
    wx, wy, _ = sep.winpos(f["sub"], st["x"][sel], st["y"][sel], window, mask=f["bad"])
    rms_sep = math.sqrt(np.mean(np.r_[wx - st["x"][sel], wy - st["y"][sel]] ** 2))
    assert rms < 1.1 * rms_sep + 0.002, (rms, rms_sep)


def test_aperture_fluxes_equal_sep_sum_circle(decam):
    """(c) flux = sep.sum_circle on whole pixels (subpix=1) to float precision; within 2% of sep's
    exact-overlap aperture for bright unflagged sources."""
    cat, sub, bad, fw = decam["cat"], decam["sub"], decam["bad"], decam["fwhm"]
    ok = cat["flag"] == 0
    r = max(2 * fw, 3.0)
    f1, _, _ = sep.sum_circle(sub, cat["x"][ok], cat["y"][ok], r, mask=bad, subpix=1)
    np.testing.assert_allclose(cat["flux"][ok], f1, rtol=1e-5, atol=1e-3 * decam["sigma"])
    bright = cat["snr"] > 50
    f0, _, _ = sep.sum_circle(sub, cat["x"][ok & bright], cat["y"][ok & bright], r, mask=bad, subpix=0)
    assert (ok & bright).sum() >= 30
    rel = cat["flux"][ok & bright] / f0 - 1
    assert np.max(np.abs(rel)) < 0.02, np.max(np.abs(rel))
    # the error model: n_pix pixel centres within r (unflagged: all inside the image, usable)
    x, y = cat["x"][ok], cat["y"][ok]
    k = np.arange(-int(r) - 2, int(r) + 3)
    npix = np.array([np.sum((k[:, None] + np.rint(yy) - yy) ** 2 + (k[None, :] + np.rint(xx) - xx) ** 2 <= r * r)
                     for xx, yy in zip(x, y)])
    want = np.sqrt(npix * decam["sigma"] ** 2 + np.maximum(cat["flux"][ok], 0))
    np.testing.assert_allclose(cat["fluxerr"][ok], want, rtol=1e-12)
    np.testing.assert_allclose(cat["snr"], cat["flux"] / cat["fluxerr"], rtol=1e-12)


def test_deeper_than_sep_extract(decam):
    """(d) the matched filter at 5 sigma finds every true star sep.extract (5 sigma, minarea 5)
    finds, and many fainter ones; detections far from any true object are few (artefacts)."""
    sim, cat, fw, objs = decam["sim"], decam["cat"], decam["fwhm"], decam["sep"]
    st = sim.stars[sim.stars["in_sci"] & ~sim.stars["saturated_sci"]]
    d_sep, _ = cKDTree(np.c_[objs["x"], objs["y"]]).query(np.c_[st["x"], st["y"]])
    d_us, _ = cKDTree(np.c_[cat["x"], cat["y"]]).query(np.c_[st["x"], st["y"]])
    found_sep, found_us = d_sep < 1.5, d_us < 1.5
    assert np.all(found_us[found_sep])
    assert found_us.sum() >= 1.8 * found_sep.sum(), (found_us.sum(), found_sep.sum())
    assert np.min(st["flux_sci"][found_us]) < 0.3 * np.min(st["flux_sci"][found_sep])
    assert len(objs) < len(cat["x"])
    # every unflagged detection is a true object (cosmic rays and hot pixels, unmasked, included)
    art = sim.artifacts
    truth = np.r_[np.c_[sim.stars["x"], sim.stars["y"]], np.c_[sim.galaxies["x"], sim.galaxies["y"]],
                  np.c_[sim.transients["x"], sim.transients["y"]],
                  np.c_[art["cosmic_rays"]["x"], art["cosmic_rays"]["y"]],
                  np.c_[art["hot_pixels"]["x"], art["hot_pixels"]["y"]]]
    d, _ = cKDTree(truth).query(np.c_[cat["x"], cat["y"]])
    spurious = (d > 2 * fw) & (cat["flag"] == 0)
    assert spurious.sum() <= 0.02 * len(cat["x"]), spurious.sum()


def test_bright_galaxies_are_not_shredded(decam):
    """At most 2 sources within 2 r_eff + FWHM of each of the 10 brightest galaxies (sep: 1-2; the
    brightest, r_eff 16 px, used to give 7 halo fragments without the local-contrast cut)."""
    sim, cat, fw = decam["sim"], decam["cat"], decam["fwhm"]
    g = sim.galaxies[sim.galaxies["in_sci"]]
    g = g[np.argsort(-g["flux"])][:10]
    counts = [int(np.sum(np.hypot(cat["x"] - gg["x"], cat["y"] - gg["y"]) < 2 * gg["r_eff"] + fw)) for gg in g]
    assert min(counts) >= 1 and max(counts) <= 2, counts


def test_moments_undersampled_ztf(ztf):
    """(g) ZTF-like CCD: bright isolated stars have round windowed moments near the PSF's."""
    cat, fw = ztf["cat"], ztf["fwhm"]
    ok = (cat["snr"] > 100) & (cat["flag"] == 0) & (cat["peak"] < 0.3 * cat["flux"])
    size = FWHM_PER_SIGMA * np.sqrt(cat["a"][ok] * cat["b"][ok])
    assert ok.sum() >= 20
    assert abs(np.median(size) / fw - 1) < 0.15, (np.median(size), fw)


# ------------------------------------------------------------------------------------------
# measurements against brute-force oracles (noise-free images)
# ------------------------------------------------------------------------------------------
def _windowed_oracle(img, x0, y0, sigma, iterations=50):
    """Windowed centroid (factor-2 fixed point) and x2 windowed moments over the whole image, one
    plain non-separable sum per quantity (float64)."""
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float64)
    x, y = x0, y0
    for _ in range(iterations):
        w = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) * img
        x, y = x + 2 * np.sum(w * (xx - x)) / w.sum(), y + 2 * np.sum(w * (yy - y)) / w.sum()
    w = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) * img
    mxx = 2 * np.sum(w * (xx - x) ** 2) / w.sum()
    myy = 2 * np.sum(w * (yy - y) ** 2) / w.sum()
    mxy = 2 * np.sum(w * (xx - x) * (yy - y)) / w.sum()
    return x, y, mxx, myy, mxy


def test_measurements_match_brute_force_oracle(xp):
    theta = math.radians(30.0)
    src = [(30.3, 40.7, 2e4), (90.6, 25.2, 5e4)]
    img = _gauss((80, 128), src, sigma_xy=(1.9, 1.4), theta=theta).astype(np.float32)
    fwhm = 3.8
    s = _host(detect_sources(to_device(img, xp), 1.0, fwhm=fwhm))
    assert len(s["x"]) == 2
    for x0, y0, f in src:
        k = int(np.argmin(np.hypot(s["x"] - x0, s["y"] - y0)))
        ox, oy, _, _, _ = _windowed_oracle(img.astype(np.float64), x0 + 0.2, y0 - 0.2, fwhm / FWHM_PER_SIGMA)
        assert abs(s["x"][k] - ox) < 2e-5 and abs(s["y"][k] - oy) < 2e-5  # converged fixed point
        # moments about the catalogue's centroid
        _, _, mxx, myy, mxy = _windowed_oracle(img.astype(np.float64), s["x"][k], s["y"][k], fwhm / FWHM_PER_SIGMA,
                                               iterations=0)
        assert abs(s["x"][k] - x0) < 2e-3 and abs(s["y"][k] - y0) < 2e-3  # symmetric source: unbiased
        tr, dd = (mxx + myy) / 2, math.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        np.testing.assert_allclose([s["a"][k], s["b"][k]], [math.sqrt(tr + dd), math.sqrt(tr - dd)], rtol=1e-9)
        assert abs(s["theta"][k] - theta) < 1e-3
        # aperture: whole pixels with centres within r_ap = 2 fwhm of the centroid
        yy, xx = np.mgrid[0:80, 0:128]
        ap = (xx - s["x"][k]) ** 2 + (yy - s["y"][k]) ** 2 <= (2 * fwhm) ** 2
        np.testing.assert_allclose(s["flux"][k], img.astype(np.float64)[ap].sum(), rtol=1e-6)
        np.testing.assert_allclose(s["fluxerr"][k], math.sqrt(ap.sum() * 1.0 + s["flux"][k]), rtol=1e-9)
        iy, ix = int(round(y0)), int(round(x0))
        assert s["peak"][k] == img[iy - 1 : iy + 2, ix - 1 : ix + 2].max()
    assert np.all(s["flag"] == 0) and np.all(s["image"] == 0)


def test_moments_of_a_matched_gaussian_are_its_covariance():
    """x2 correction: a round Gaussian of exactly the window's FWHM measures its own sigma."""
    sig = 1.7
    img = _gauss((64, 64), [(31.4, 32.8, 1e5)], sigma_xy=(sig, sig)).astype(np.float32)
    s = _host(detect_sources(img, 1.0, fwhm=FWHM_PER_SIGMA * sig))
    np.testing.assert_allclose([s["a"][0], s["b"][0]], [sig, sig], rtol=2e-3)


# ------------------------------------------------------------------------------------------
# batches, edges, masks, empties
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three(decam):
    sub, bad = decam["sub"], decam["bad"]
    img = np.stack([sub[:300, :320], sub[300:600, 400:720], sub[700:1000, 600:920]])
    m = np.stack([bad[:300, :320], bad[300:600, 400:720], bad[700:1000, 600:920]])
    return img, m, decam["sigma"], decam["fwhm"]


def test_batch_equals_single_calls_exactly(three):
    """(e) a batch of 3 images gives exactly the rows of 3 single calls (image index added)."""
    img, m, sig, fw = three
    batch = detect_sources(img, sig, fwhm=fw, mask=m)
    assert np.array_equal(np.unique(batch.image), [0, 1, 2])
    for k in range(3):
        single = detect_sources(img[k], sig, fwhm=fw, mask=m[k])
        assert len(single) > 10
        part = batch.select(batch.image == k)
        _assert_same(Sources(**{**{f: getattr(part, f) for f in FIELDS}, "image": part.image * 0}), single)
    # per-image sigma and FWHM: same detections as single calls (stamps sized for the largest
    # FWHM of the batch: measurements equal to rounding)
    fws, sigs = [fw, 0.8 * fw, 1.25 * fw], np.array([sig, 1.1 * sig, 0.9 * sig])
    batch = detect_sources(img, sigs, fwhm=fws, mask=m)
    for k in range(3):
        single = detect_sources(img[k], sigs[k], fwhm=fws[k], mask=m[k])
        part = batch.select(batch.image == k)
        _assert_same(Sources(**{**{f: getattr(part, f) for f in FIELDS}, "image": part.image * 0}), single,
                     exact=False)


def test_per_image_dedup_equals_find_peaks():
    """The per-image-radius deduplication is find_peaks' rule: equal radii give find_peaks' table."""
    rng = np.random.default_rng(5)
    from scipy import ndimage

    v = ndimage.gaussian_filter(rng.normal(size=(2, 96, 96)), (0, 1.2, 1.2)).astype(np.float32)
    v /= v.std()
    for r in (1.0, 2.5, 3.9):
        p0 = find_peaks(v, threshold=1.0, radius=0.0)
        b, y, x = p0.image, p0.y, p0.x
        for sign in (1, -1):  # each sign against its own peaks (the other sign's are not live)
            live = p0.sign == sign
            sup = ks._suppressed(np, sign * v, b, y, x, sign * v[b, y, x], live, np.full(b.shape, r), r)
            keep = live & ~sup
            ref = find_peaks(v, threshold=1.0, radius=r)
            want = ref.sign == sign
            assert want.sum() < live.sum() or r < 1.5  # (adjacent pixels cannot both be maxima)
            for g, e in zip((b[keep], y[keep], x[keep]), (ref.image[want], ref.y[want], ref.x[want])):
                np.testing.assert_array_equal(g, e)


def test_empty_blank_and_fully_masked():
    """(f) no source, never an exception: blank, zero-noise, fully masked, NaN, empty batch."""
    z = np.zeros((64, 80), np.float32)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 5, (64, 80)).astype(np.float32)
    star = noise + _gauss((64, 80), [(40, 30, 1e5)]).astype(np.float32)
    cases = [
        detect_sources(z, 0.0, fwhm=3.0),
        detect_sources(z, 1.0, fwhm=3.0),
        detect_sources(noise, 5.0, fwhm=3.0, threshold=6.0),
        detect_sources(star, 5.0, fwhm=3.0, mask=np.ones(star.shape, bool)),
        detect_sources(np.full((64, 80), np.nan, np.float32), 1.0, fwhm=3.0),
        detect_sources(np.zeros((0, 64, 80), np.float32), 1.0, fwhm=3.0),
        detect_sources(np.zeros((2, 0, 5), np.float32), 1.0, fwhm=3.0),
    ]
    for s in cases:
        assert len(s) == 0
        h = _host(s)
        assert h["image"].dtype == np.int64 and h["x"].dtype == np.float64 and h["flag"].dtype == np.int32
    assert len(detect_sources(star, 5.0, fwhm=3.0)) == 1


def test_flags_masked_and_edge():
    """(f) bit 1 for a masked pixel inside the aperture (even the saturated core, where the
    filtered wings peak), bit 2 for an aperture crossing the image edge; clean sources 0."""
    rng = np.random.default_rng(4)
    pos = [(40.2, 40.4, 3e4), (100.6, 40.1, 3e4), (160.3, 41.2, 1e6), (3.2, 90.5, 3e4), (150.0, 118.0, 3e4)]
    img = (_gauss((120, 200), pos) + rng.normal(0, 3, (120, 200))).astype(np.float32)
    m = np.zeros(img.shape, bool)
    m[44, 103] = True  # inside the aperture (r = 6 px) of source 1
    core = np.argsort(_gauss((120, 200), pos[2:3]), axis=None)[-3:]
    m.flat[core] = True  # the 3 brightest pixels of source 2 ("saturated", as a simulated DECam star)
    s = _host(detect_sources(img, 3.0, fwhm=3.0, mask=m))
    tree = cKDTree(np.c_[s["x"], s["y"]])
    d, j = tree.query([(p[0], p[1]) for p in pos])
    assert np.all(d[[0, 1]] < 1e-2) and np.all(d[[3, 4]] < 0.5), d  # edge: the window is cut
    assert list(s["flag"][j]) == [0, FLAG_MASKED, FLAG_MASKED, FLAG_EDGE, FLAG_EDGE]
    # a masked core is no hole in the catalogue: the star is found (the filtered light of its
    # wings peaks on the core's rim) and every fragment around it carries the flag
    assert d[2] < 3.0
    around = np.hypot(s["x"] - pos[2][0], s["y"] - pos[2][1]) < 6.0
    assert 1 <= around.sum() <= 4 and np.all(s["flag"][around] == FLAG_MASKED)
    assert len(s["x"]) == 4 + around.sum()
    # the source next to the masked pixel is measured without it: its flux is the rest
    yy, xx = np.mgrid[0:120, 0:200]
    ap = ((xx - s["x"][j[1]]) ** 2 + (yy - s["y"][j[1]]) ** 2 <= 36) & ~m
    np.testing.assert_allclose(s["flux"][j[1]], img.astype(np.float64)[ap].sum(), rtol=1e-6)
    np.testing.assert_allclose(s["fluxerr"][j[1]], math.sqrt(ap.sum() * 9 + s["flux"][j[1]]), rtol=1e-9)


def test_max_sources_keeps_the_most_significant_per_image(three):
    rng = np.random.default_rng(6)
    imgs, want = [], []
    for k in range(3):
        pos = [(20 + 25 * i, 20 + 20 * (i % 3), f) for i, f in enumerate(rng.permutation(np.geomspace(2e3, 2e5, 8)))]
        imgs.append(_gauss((80, 220), pos) + rng.normal(0, 5, (80, 220)))
        want.append(sorted((p for p in pos), key=lambda p: -p[2])[:3])
    top = _host(detect_sources(np.stack(imgs).astype(np.float32), 5.0, fwhm=3.5, max_sources=3))
    assert np.array_equal(top["image"], np.repeat([0, 1, 2], 3))
    for k in range(3):
        got = sorted(zip(top["x"][top["image"] == k], top["y"][top["image"] == k]))
        exp = sorted((p[0], p[1]) for p in want[k])
        np.testing.assert_allclose(got, exp, atol=0.05)
    # on a real field: a subset of the full catalogue, nested, at most k rows per image, same order
    img, m, sig, fw = three
    full = _host(detect_sources(img, sig, fwhm=fw, mask=m))
    row_of = {(i, x, y): r for r, (i, x, y) in enumerate(zip(full["image"], full["x"], full["y"]))}
    prev = set()
    for k in (4, 9):
        t = _host(detect_sources(img, sig, fwhm=fw, mask=m, max_sources=k))
        rows = [row_of[r] for r in zip(t["image"], t["x"], t["y"])]  # KeyError: not a full-catalogue row
        assert np.all(np.diff(rows) > 0)  # the full catalogue's order
        assert np.all(np.bincount(t["image"], minlength=3) == k)
        assert prev <= set(rows)
        prev = set(rows)


def test_detection_map_is_in_sigma_for_correlated_noise():
    """The detection threshold is in robust sigma of the filtered image even when the input noise
    is correlated (a resampled image), where sigma * unit-L2 filter would say ~1.9 sigma."""
    from scipy import ndimage

    rng = np.random.default_rng(8)
    white = rng.normal(0, 10, (2, 512, 512)).astype(np.float32)
    corr = ndimage.gaussian_filter(white, (0, 1.0, 1.0)).astype(np.float32)
    for im in (white, corr):
        _, _, smap = ks._detection_map(np, im, None, np.full(2, 3.0))
        np.testing.assert_allclose(smap.reshape(2, -1).std(axis=-1), 1.0, atol=0.02)
        assert len(detect_sources(im, 10.0, fwhm=3.0)) <= 2


def test_robust_std_ignores_sources_and_invalid_values():
    rng = np.random.default_rng(9)
    v = rng.normal(0.0, 2.0, (3, 20000))
    v[:, :1000] += rng.exponential(50.0, (3, 1000))  # 5 % sources
    valid = np.ones(v.shape, bool)
    valid[1, ::2] = False
    v[1, ::2] = 1e9  # invalid entries do not count
    valid[2] = False
    s = robust_std(v, valid)
    np.testing.assert_allclose(s[:2], 2.0, rtol=0.03)
    assert np.isnan(s[2])


def test_bad_arguments():
    img = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match="image must be"):
        detect_sources(np.zeros(5, np.float32), 1.0, fwhm=3.0)
    with pytest.raises(ValueError, match="fwhm"):
        detect_sources(img, 1.0, fwhm=0.0)
    with pytest.raises(ValueError, match="fwhm"):
        detect_sources(np.zeros((2, 32, 32), np.float32), 1.0, fwhm=[3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="sigma"):
        detect_sources(img, -1.0, fwhm=3.0)
    with pytest.raises(ValueError, match="threshold"):
        detect_sources(img, 1.0, fwhm=3.0, threshold=-1)
    with pytest.raises(ValueError, match="mask"):
        detect_sources(img, 1.0, fwhm=3.0, mask=np.zeros((31, 32), bool))
    with pytest.raises(ValueError, match="max_sources"):
        detect_sources(img, 1.0, fwhm=3.0, max_sources=0)
    with pytest.raises(ValueError, match="aperture_radius"):
        detect_sources(img, 1.0, fwhm=3.0, aperture_radius=float("nan"))


def test_input_not_modified(three):
    img, m, sig, fw = three
    a, mm = img.copy(), m.copy()
    detect_sources(img, sig, fwhm=fw, mask=m)
    assert np.array_equal(a, img) and np.array_equal(mm, m)


# ------------------------------------------------------------------------------------------
# other array namespaces
# ------------------------------------------------------------------------------------------
def test_same_catalogue_on_xp(xp, three):
    """numpy here; cupy where a GPU is present (float rounding of cupy's filter: tolerance)."""
    img, m, sig, fw = three
    ref = detect_sources(img, sig, fwhm=fw, mask=m)
    got = detect_sources(to_device(img, xp), sig, fwhm=fw, mask=to_device(m, xp))
    g, r = _host(got), _host(ref)
    assert len(g["x"]) == len(r["x"])
    np.testing.assert_array_equal(g["image"], r["image"])
    np.testing.assert_array_equal(g["flag"], r["flag"])
    for f in ("x", "y", "flux", "fluxerr", "snr", "peak", "a", "b"):
        np.testing.assert_allclose(g[f], r[f], rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=f)


def test_strict_device_no_hidden_crossing(three):
    """On the strict stand-in (refuses every implicit host conversion) the catalogue equals
    numpy's; the only crossings are the counted uploads of per-image values."""
    from tests import strict_device as sd

    strict = sd.strict
    img, m, sig, fw = three
    ref = detect_sources(img, sig, fwhm=fw, mask=m)
    dimg, dm = strict.asarray(img), strict.asarray(m)
    with count_transfers() as led:
        got = detect_sources(dimg, sig, fwhm=fw, mask=dm)
    assert led.h2d_count == 0 and led.d2h_count == 0
    _assert_same(got, ref)
    # per-image values (device sigma, host FWHMs): uploads only through to_device, counted
    sigs = np.array([sig, 1.2 * sig, 0.9 * sig])
    ref = detect_sources(img, sigs, fwhm=[fw, 0.9 * fw, fw], mask=m, max_sources=7)
    strict.reset_stats()
    with count_transfers() as led:
        got = detect_sources(dimg, strict.asarray(sigs), fwhm=[fw, 0.9 * fw, fw], mask=dm, max_sources=7)
    assert strict.stats.h2d_count - 1 == led.h2d_count  # the sigma upload above was ours
    assert led.d2h_count == 0
    _assert_same(got, ref)
