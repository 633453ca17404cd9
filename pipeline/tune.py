"""Hyperparameter search: `python -m pipeline.tune --flagfile=flags/quickstart.cfg --tuner=bayesian`.

Takes every `pipeline.train` flag (the untuned recipe: the default trial) plus
the search flags below; see `pipeline.tuning` and the README's "Hyperparameter
search" section. Rerun the same command with `--tune_dir=<dir>` to resume.
"""
import dataclasses

from absl import app, flags

from pipeline import cli
from pipeline import rundir, workflow
from pipeline.tuning import search as tuning

cli.define_data_flags()
cli.define_model_flags()
cli.define_train_flags()
cli.define_finetune_flags()
cli.define_run_flags()


def define_tune_flags():
    flags.DEFINE_string("tune_dir", None, "Search directory (default tuning/<model>-<dataset>-<time>); "
                        "rerunning with the same --tune_dir resumes the search.")
    flags.DEFINE_enum("tuner", "random", list(tuning.TUNERS), "Search algorithm.")
    flags.DEFINE_integer("max_trials", 10, "Trials to run in total (a resumed search counts earlier ones).",
                         lower_bound=1)
    flags.DEFINE_enum("objective", "val_accuracy", list(tuning.OBJECTIVES), "What the search optimizes.")
    flags.DEFINE_integer("executions_per_trial", 1, "Runs per trial (seeds --seed, --seed+1, ...), averaged.",
                         lower_bound=1)
    flags.DEFINE_integer("max_epochs_per_trial", None, "Epochs of each trial (hyperband: the largest "
                         "budget); default --epochs. --lr_boundaries are scaled to it.", lower_bound=1)
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop a trial after this many epochs without "
                         "improvement of --objective (0 = never).", lower_bound=0)
    flags.DEFINE_integer("initial_random_trials", None, "bayesian: random trials before the Gaussian "
                         "process (default 3 per hyperparameter).", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Delete the search in --tune_dir and start afresh.")
    flags.DEFINE_list("tune", None, "Hyperparameters to search (the rest stay at their flag values); "
                      f"default: all that apply. Names: {', '.join(tuning.HYPERPARAMETERS)}.")
    for spec in tuning.HYPERPARAMETERS.values():
        what = "values" if spec.kind == "choice" else f"lo,hi{' (log scale)' if spec.log else ''}"
        default = (",".join(map(str, spec.values)) if spec.kind == "choice"
                   else f"{spec.low:g},{spec.high:g}")
        flags.DEFINE_list(spec.flag, None, f"Search {spec.help} over these {what} "
                          f"(default {default}, plus the flag value).")
    flags.DEFINE_bool("export_best", False, "Export the best trial's best checkpoint for TF Serving.")
    flags.DEFINE_string("export_dir", "saved_models", "Folder holding <name>/<version>/ exports.")
    flags.DEFINE_string("export_name", None, "Export name (default: <model>-<dataset>).")
    flags.DEFINE_bool("report", True, "Write <tune_dir>/comparison.md and .html (every trial side by "
                      "side) at the end unless --noreport.")


define_tune_flags()
FLAGS = flags.FLAGS


def base_run_config(fv, verb="train"):
    """The untuned RunConfig, with its flags text, from parsed flags (what the default trial runs).

    For `pipeline.train` the flags text leaves out the fine-tuning flags it does
    not define (they are at their defaults: TrainConfig's); for `pipeline.finetune`
    it states `--weights` (the trials train exactly these flags, without
    finetune's model-dependent defaults).
    """
    if fv.model_dir:
        raise ValueError("--model_dir is not used by pipeline.tune: each trial runs in <tune_dir>/trials/<id>; "
                         "set --tune_dir.")
    run = cli.run_config_from_flags(fv, verb)
    if verb == "train":
        pins = {name: None for name in tuning.FINETUNE_FLAGS}
    else:  # pipeline.finetune would pick pretrained weights for an unset --weights; the trials use none
        pins = {"weights": run.model.weights or "none"}
    return dataclasses.replace(run, flags_text=tuning.override_flags_text(run.flags_text, pins))


def search_space(fv, base):
    ranges, choices = {}, {}
    for spec in tuning.HYPERPARAMETERS.values():
        value = getattr(fv, spec.flag)
        if value is not None:
            (choices if spec.kind == "choice" else ranges)[spec.name] = value
    return tuning.make_search_space(base, tune=fv.tune, ranges=ranges, choices=choices)


def run(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    base = base_run_config(FLAGS)
    space = search_space(FLAGS, base)
    # Trials that freeze or scale the backbone are pipeline.finetune runs (its flags name them).
    if any(FLAGS[n].value != FLAGS[n].default or n in space.names for n in tuning.FINETUNE_FLAGS):
        verb = "finetune"
        base = base_run_config(FLAGS, verb)
    else:
        verb = "train"
    tune_dir = FLAGS.tune_dir or rundir.default_model_dir(FLAGS.model, FLAGS.dataset, root="tuning")
    result = tuning.search(
        base, space, tune_dir, tuner=FLAGS.tuner, max_trials=FLAGS.max_trials, objective=FLAGS.objective,
        executions_per_trial=FLAGS.executions_per_trial, max_epochs_per_trial=FLAGS.max_epochs_per_trial,
        early_stopping_patience=FLAGS.early_stopping_patience, overwrite=FLAGS.overwrite,
        resume=FLAGS.resume, initial_random_trials=FLAGS.initial_random_trials, verb=verb)
    if result.role == "worker":
        print("worker finished: the chief writes trials.csv and best.cfg", flush=True)
        return result
    print(tuning.format_results(result), flush=True)
    return workflow.after_search(result, tune_dir, verb=verb, export_best=FLAGS.export_best,
                                 export_dir=FLAGS.export_dir, export_name=FLAGS.export_name,
                                 report=FLAGS.report)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main)
