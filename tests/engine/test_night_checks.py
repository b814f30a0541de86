"""A night refuses settings it would otherwise ignore or lose, before any work (one line, exit 2)."""
from __future__ import annotations

import pytest

from nightsift.engine.cli import main


@pytest.mark.parametrize("toml, engine, needle", [
    ('[psf]\nscience_model = "psf.fits"\n', "local", "psf.science_model"),
    ('[psf]\nreference_model = "psf.fits"\n', "local", "psf.reference_model"),
    ('[package]\nquicklook = true\n', "ray", "package.quicklook"),
])
def test_a_night_refuses_a_setting_it_would_ignore(tmp_path, capsys, toml, engine, needle):
    if engine == "ray":
        pytest.importorskip("ray", reason="the Ray engine needs the cluster extra")
    cfg = tmp_path / "night.toml"
    cfg.write_text(toml)
    out = tmp_path / "out"
    rc = main(["--config", str(cfg), "run", "--engine", engine, "--out", str(out), "--quiet",
               "--visits", "1", "--ccds", "1", "--size", "256"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not (out / "records").exists()  # refused before any CCD-visit ran
