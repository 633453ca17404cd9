"""Hyperparameter search with keras-tuner over the pipeline's own training loop.

Library side of `python -m pipeline.tune` (no absl FLAGS here):

* `space`: `HYPERPARAMETERS` (what can be searched) and
  `make_search_space(base, tune=..., ranges=..., choices=...)` (the validated
  space; every default is the base value, so the default trial is the untuned run).
* `overrides`: a trial's hyperparameters as flag overrides, applied to the base
  RunConfig (`apply_overrides`) and to its flags text (`override_flags_text`),
  so `--flagfile=<trial>/flags.cfg` repeats the trial.
* `hypermodel`: `PipelineHyperModel` (build = the registry's model, fit = a
  normal run in `<tune_dir>/trials/<trial_id>`), `PipelineTuner`, `make_tuner`.
* `results`: trials.csv (every trial, best first), best.cfg, console text.
* `runner`: `search(...)`, the whole search (resumable, distributable).
* `layout`: the tuning directory's names and `OBJECTIVES`.

Import the submodule you need (`from pipeline.tuning import runner`): this
package imports nothing, so reading `layout` (reporting does) does not bring
keras-tuner and TensorFlow along.
"""
