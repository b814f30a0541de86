"""Real/bogus classification: nightsift CNN, braai (ZTF d6_m7) and inference runtimes.

Modules, in layers (a module imports only from the layers above it; importing this package imports
neither TensorFlow nor LiteRT):

1. pure numpy, no model and no file:

   * :mod:`.preprocess` -- the one normalisation of triplets (``preprocess(triplets)``);
   * :mod:`.metrics` -- AUCPR, ROC AUC, the operating threshold for a target FNR, the operating
     point (precision, recall, FNR, FPR), the breakdowns per domain (``report``);

2. data, models and files (each imports TensorFlow, LiteRT or matplotlib only inside the functions
   that need them):

   * :mod:`.dataset` -- labelled triplets from the chain run on simulated CCD pairs (cached ``.npz``);
   * :mod:`.model` -- the braai-style Keras 3 CNN (``embedding`` layer for anomaly scores);
   * :mod:`.export` -- full-integer int8 TFLite export and its Edge TPU checks;
   * :mod:`.braai` -- ZTF's d6_m7 model with ZTF's preprocessing;
   * :mod:`.runtime` -- the batched scorer backends used by the pipeline (edgetpu/tflite/keras/braai),
     and the one reader of model metadata (``resolve_model``, ``model_variants``);
   * :mod:`.reports` -- the files of an evaluation: plots (PNG) and numbers (JSON);

3. the experiment drivers:

   * :mod:`.train` -- training with augmentation, class weights, early stopping; ``nightsift train``;
     the cross-domain experiment;
   * :mod:`.evaluate` -- ``nightsift evaluate`` (imports :mod:`.train` for the cross-domain
     experiment; nothing imports it back);
   * :mod:`.crossdomain` -- nightsift's classifier on real ZTF and Rubin alert packets, against their own scores (rb, drb, reliability) and braai.

The shipped model lives in ``models/``: ``nightsift_rb.keras`` (float), ``nightsift_rb_int8.tflite``
and ``nightsift_rb.json`` (normalisation, operating thresholds, metrics, training command).
"""
