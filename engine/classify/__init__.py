"""Real/bogus classification: nightsift CNN, braai (ZTF d6_m7) and inference runtimes.

Modules (importing this package imports neither TensorFlow nor LiteRT):

* :mod:`.preprocess` -- the one normalisation of triplets (``preprocess(triplets)``), numpy only;
* :mod:`.dataset` -- labelled triplets from the chain run on simulated CCD pairs (cached ``.npz``);
* :mod:`.model` -- the braai-style Keras 3 CNN (``embedding`` layer for anomaly scores);
* :mod:`.train` -- training with augmentation, class weights, early stopping; ``nightsift train``;
* :mod:`.evaluate` -- AUCPR, ROC AUC, the operating threshold for a target FNR, breakdowns, plots;
  ``nightsift evaluate``;
* :mod:`.export` -- full-integer int8 TFLite export and its Edge TPU checks;
* :mod:`.runtime` -- the batched scorer backends used by the pipeline (edgetpu/tflite/keras/braai);
* :mod:`.braai` -- ZTF's d6_m7 model with ZTF's preprocessing.

The shipped model lives in ``models/``: ``nightsift_rb.keras`` (float), ``nightsift_rb_int8.tflite``
and ``nightsift_rb.json`` (normalisation, operating thresholds, metrics, training command).
"""
