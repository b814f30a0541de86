"""Finding the unexpected: drift monitoring, anomaly scores, retrospective searches and the
human-in-the-loop labeling app.

* :mod:`.drift` -- per CCD and per night, the distributions of scores and features against a
  reference (PSI and KS), flagged CCDs and a plot (``nightsift drift``).
* :mod:`.labels` -- the SQLite store of expert labels (who, when).
* :mod:`.app` -- ``nightsift label``: a local page ranking alerts for labeling.
* :mod:`.anomaly` -- an isolation forest / kNN outlier score on the CNN embedding plus features.
* :mod:`.retrospective` -- hold a class of real events out of training and see where it ranks.
"""
