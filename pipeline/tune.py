"""Hyperparameter search: `python -m pipeline.tune --flagfile=flags/quickstart.cfg --tuner=bayesian`.

Takes every `pipeline.train` flag (the untuned recipe: the default trial) plus
the search flags below; see `pipeline.tuning` and the README's "Hyperparameter
search" section. Rerun the same command with `--tune_dir=<dir>` to resume.
"""
from absl import app, flags

from pipeline import cli, rundir, workflow
from pipeline.tuning import layout
from pipeline.tuning import space as search_space

cli.define_data_flags()
cli.define_model_flags()
cli.define_train_flags()
cli.define_finetune_flags()
cli.define_run_flags()


def define_tune_flags():
    flags.DEFINE_string("tune_dir", None, "Search directory (default tuning/<model>-<dataset>-<time>); "
                        "rerunning with the same --tune_dir resumes the search.")
    flags.DEFINE_enum("tuner", "random", list(layout.TUNERS), "Search algorithm.")
    flags.DEFINE_integer("max_trials", 10, "Trials to run in total (a resumed search counts earlier ones).",
                         lower_bound=1)
    flags.DEFINE_enum("objective", "val_accuracy", list(layout.OBJECTIVES), "What the search optimizes.")
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
                      f"default: all that apply. Names: {', '.join(search_space.HYPERPARAMETERS)}.")
    for spec in search_space.HYPERPARAMETERS.values():
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


def run(argv):
    cli.no_arguments(argv)
    from pipeline.tuning import results, runner  # keras-tuner and TensorFlow: after the flags are read
    runner.check_model_dir_unset(FLAGS.model_dir)
    base = runner.base_run_config(cli.run_config_from_flags(FLAGS, "train"), "train")
    values = {spec.flag: FLAGS[spec.flag].value for spec in search_space.HYPERPARAMETERS.values()}
    space = search_space.space_from_flag_values(base, tune=FLAGS.tune, values=values)
    verb = runner.trial_verb(base, space)
    if verb != "train":
        base = runner.base_run_config(cli.run_config_from_flags(FLAGS, verb), verb)
    tune_dir = FLAGS.tune_dir or rundir.default_model_dir(FLAGS.model, FLAGS.dataset, root="tuning")
    result = runner.search(
        base, space, tune_dir, tuner=FLAGS.tuner, max_trials=FLAGS.max_trials, objective=FLAGS.objective,
        executions_per_trial=FLAGS.executions_per_trial, max_epochs_per_trial=FLAGS.max_epochs_per_trial,
        early_stopping_patience=FLAGS.early_stopping_patience, overwrite=FLAGS.overwrite,
        resume=FLAGS.resume, initial_random_trials=FLAGS.initial_random_trials, verb=verb)
    print(results.format_results(result), flush=True)
    return workflow.after_search(result, tune_dir, verb=verb, export_best=FLAGS.export_best,
                                 export_dir=FLAGS.export_dir, export_name=FLAGS.export_name,
                                 report=FLAGS.report)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
