"""The outside check on real data: the DECam supernova must come out of `nightsift subtract`."""
import numpy as np
import pytest
from astropy.table import Table

from nightsift.engine.cli import main
from nightsift.engine.io.avro import read_alerts

from ..conftest import shared_data


@pytest.mark.data
def test_subtract_finds_the_decam_supernova(tmp_path, capsys):
    d = shared_data("decam")
    out = tmp_path / "sn"
    rc = main(["subtract", str(d / "DEC-OBS04a.mini.fits"), str(d / "DEC-OBS18a.mini.fits"), "--out", str(out)])
    assert rc == 0
    cands = Table.read(out / "candidates.ecsv")
    pos = cands[cands["isdiffpos"]]
    dist = np.hypot(pos["xpos"] - 130, pos["ypos"] - 128)
    i = int(np.argmin(dist))
    assert dist[i] < 2.0, f"no positive candidate within 2 px of the supernova (nearest {dist[i]:.1f} px)"
    assert pos["snr"][i] > 10, f"supernova S/N {pos['snr'][i]:.1f} <= 10"
    alerts = read_alerts(next(out.glob("*.avro")))
    assert len(alerts) == len(cands)
    sn = [a for a in alerts if abs(a["candidate"]["xpos"] - 1 - 130) < 2 and abs(a["candidate"]["ypos"] - 1 - 128) < 2]
    assert sn and sn[0]["candidate"]["isdiffpos"] == "t"
    for f in ("difference.fits", "scorr.fits", "D.fits"):
        assert (out / f).exists()
