from nightsift.engine.orchestration.ledger import read_ledger, record_path, write_record


def test_records_are_replaced_not_duplicated(tmp_path):
    write_record(tmp_path, 3, 7, status="failed", error="InputError: x.fits: NaN-only frame")
    write_record(tmp_path, 3, 7, status="done", n_alerts=12, qa={"scorr_std": 1.01, "bad": float("nan")})
    write_record(tmp_path, 1, 2, status="skipped", error="SkipCCD: no overlap")
    recs = read_ledger(tmp_path)
    assert [(r["visit"], r["ccd"], r["status"]) for r in recs] == [(1, 2, "skipped"), (3, 7, "done")]
    assert recs[1]["n_alerts"] == 12 and recs[1]["qa"]["bad"] is None
    assert record_path(tmp_path, 3, 7).exists()
    assert not list((tmp_path / "records").glob(".rec-*"))


def test_records_are_readable_like_fits_products(tmp_path):
    import os
    import stat

    from nightsift.engine.io.atomic import atomic_write

    old = os.umask(0o022)
    try:
        p = write_record(tmp_path, 1, 1, status="done")
        private = atomic_write(tmp_path / "private.bin", lambda fh: fh.write(b"x"), mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
