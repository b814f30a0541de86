"""Teacher labels: real survey triplets labelled by a production model, as extra training rows.

nightsift's CNN learns the simulator's bogus classes; real ZTF alerts hold others (residuals of
bright stars, ghosts, imperfect galaxy subtractions) that no simulator reproduces well. ZTF's
production real/bogus model, braai, has labelled millions of them. This module turns real ZTF
packets with no human label into training rows labelled by braai. This is semi-supervised domain
adaptation with a teacher, also called knowledge distillation on unlabelled real triplets:
``nightsift train --teacher-packets PATH --braai W``.

* Each ZTF packet is read by :func:`nightsift.engine.io.packets.read_packets`: nightsift's own
  triplet, exactly as the scorer sees it.
* braai scores the packet's stored cutouts with ZTF's preprocessing.
* The row is labelled real when braai's score is ``>= 1 - margin``, bogus when it is
  ``<= margin``. Rows in between are left out; they are braai's uncertain calls, which would be
  label noise.
* Each kept row is repeated ``repeat`` times. The training split's random dihedral augmentation
  makes the copies differ.

What a model trained so can and cannot claim (the real-data rule, :mod:`.realeval`):

* Every packet used is listed by candid in the model metadata, so ``nightsift evaluate --real``
  drops it.
* ``ztf/alerts_drb``'s ``drb`` **is** braai: its scores equal braai d6_m7's to 1e-6. A student of
  braai measured against drb on other packets shows that it reproduces ZTF's production judgement
  on new alerts, not that it is right about the sky.
* Rubin packets stay a cross-survey measurement: the teacher is never run on them here.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError

__all__ = ["TEACHER_KINDS", "teacher_dataset"]

log = logging.getLogger(__name__)

#: ``truth.kind`` of teacher rows (real, bogus)
TEACHER_KINDS = ("teacher_real", "teacher_bogus")


def teacher_dataset(paths, braai_model=None, *, margin: float = 0.2, repeat: int = 1):
    """Real ZTF triplets labelled by braai, as extra training rows (module docstring).

    Parameters
    ----------
    paths : path or iterable of paths
        ZTF alert packets (files or folders of ``*.avro``). Rubin packets are skipped with a line.
    braai_model : path, optional
        braai's d6_m7 files (default: :func:`.braai.default_braai_dir`).
    margin : float
        Keep braai scores ``<= margin`` (bogus) and ``>= 1 - margin`` (real); ``0 <= margin < 0.5``.
    repeat : int
        Copies of each kept row (>= 1).

    Returns
    -------
    (RBData, dict)
        The rows are standardised as :func:`.preprocess.standardize` does. ``truth.label`` is 1 or 0
        and ``truth.kind`` is one of :data:`TEACHER_KINDS`. ``domain.instrument`` is ``"ztf-real"``
        and ``domain.split`` is ``"train"``. ``meta["candids"]`` lists every packet used, once. The
        counts are ``n_packets``, ``n_used``, ``n_uncertain_left_out``, ``n_real``, ``n_bogus``,
        ``margin``, ``repeat`` and ``braai_score_histogram``.

    Raises
    ------
    InputError
        No ZTF packet, or no braai score outside the uncertain band.
    ValueError
        ``margin`` or ``repeat`` out of range.
    """
    from ..io.packets import read_packets
    from ..stages.package import filter_name
    from .crossdomain import _braai_scores
    from .dataset import packet_rows
    from .preprocess import NORMALIZATION

    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    if int(repeat) < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    ps = read_packets(paths, surveys=("ztf",), keep_stamps=True)
    warns: list[str] = []
    b = np.asarray(_braai_scores(ps, braai_model, False, warns), np.float64)
    real, bogus = b >= 1.0 - margin, b <= margin
    keep = np.flatnonzero(real | bogus)
    counts = {"n_packets": len(ps.records), "n_used": int(len(keep)),
              "n_uncertain_left_out": int(len(b) - len(keep)), "n_real": int(real.sum()), "n_bogus": int(bogus.sum()),
              "margin": float(margin), "repeat": int(repeat),
              "braai_score_histogram": np.histogram(b, bins=10, range=(0.0, 1.0))[0].tolist()}
    if not len(keep):
        raise InputError(f"no braai score outside ({margin:g}, {1 - margin:g}) among {len(b)} ZTF packets: "
                         f"no teacher label to train on ({counts})", path=str(paths))
    log.info("teacher labels: %s", counts)
    recs = [ps.records[i] for i in keep]
    meta = {"source": "teacher labels (braai d6_m7)", "packets": [str(p) for p in np.atleast_1d(paths)],
            "normalization": NORMALIZATION, "warnings": warns, **counts,
            # real packets that touch training: the model metadata lists them, the real-data kit drops them
            "candids": sorted({int(r["candid"]) for r in recs})}
    rows = packet_rows(ps.triplets[keep], real[keep], recs, kinds=TEACHER_KINDS, instrument="ztf-real", meta=meta,
                       filters=[filter_name(r.get("fid")) for r in recs])
    return rows.select(np.repeat(np.arange(len(keep)), int(repeat))), counts  # built once, then copied
