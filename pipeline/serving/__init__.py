"""Serving: `export` (SavedModels for TF Serving: signatures, versions, model card),
`formats` (ONNX and LiteRT files beside it, quantization), `head` (temperature, TTA,
"unknown": what every format computes after the network), `deploy` and `calibration`
(a run's temperature, rejection table and per-runtime accuracy), `runtimes`
(onnxruntime, LiteRT, SavedModel), `predict` (classify files through an export, in
its own runtime) and `latency` (time an export in each runtime)."""
