"""Flags of `pipeline.export` and `pipeline.predict` for deployment: formats, quantization, calibration,
rejection and test-time augmentation (issue 18).

Beside `pipeline.cli` (which is over its size budget) for the same reasons as
it: definitions in `define_*` functions called by the verbs, no TensorFlow at
definition time (a typo is reported in < 2 s), and `deploy_settings_from_flags`
turns the values into a checked `deploy.DeploySettings` before anything heavy.
"""
from __future__ import annotations

from absl import flags

def define_deploy_flags():
    """`pipeline.export`'s formats, quantization, calibration, rejection and TTA (no TensorFlow import)."""
    from pipeline.serving.formats import FORMAT_CHOICES, QUANTIZATIONS
    from pipeline.tta import TTA_MODES
    flags.DEFINE_enum("format", "saved_model", list(FORMAT_CHOICES),
                      "What to write into the version folder besides the SavedModel (always written: "
                      "it holds the model card): onnx (model.onnx), litert (model.tflite) or all.")
    flags.DEFINE_enum("quantize", "none", list(QUANTIZATIONS),
                      "LiteRT post-training quantization: float16 weights, dynamic int8 weights, or int8 "
                      "inside (float32 input and output) calibrated on --quantize_samples training images.")
    flags.DEFINE_integer("quantize_samples", 256, "Training images int8 quantization calibrates on.",
                         lower_bound=1)
    flags.DEFINE_bool("calibrate", True, "Fit a temperature on the validation split (minimum NLL) and "
                      "apply it in every format; --nocalibrate keeps the raw softmax.")
    flags.DEFINE_float("reject_below", None, "Add is_unknown (top probability below this, in (0, 1)); "
                       "the bytes signature's class_names says 'unknown' for those.")
    flags.DEFINE_enum("tta", "none", list(TTA_MODES), "Test-time augmentation averaged inside every "
                      "format's graph: flip, or flip_crops (10 views).")


def deploy_settings_from_flags(fv):
    """The `deploy.DeploySettings` of `define_deploy_flags`, checked (one line) before anything heavy."""
    from pipeline.serving.deploy import DeploySettings, check_settings
    settings = DeploySettings(format=fv.format, quantize=fv.quantize, quantize_samples=fv.quantize_samples,
                              calibrate=fv.calibrate, reject_below=fv.reject_below, tta=fv.tta)
    check_settings(settings)
    return settings


def define_predict_tta_flag():
    """`--tta` for `pipeline.predict`: views made here and run through the export, probabilities averaged."""
    from pipeline.tta import TTA_MODES
    flags.DEFINE_enum("tta", "none", list(TTA_MODES), "Test-time augmentation: each view goes through "
                      "the export and the probabilities are averaged (flip: 2 views, flip_crops: 10).")
