"""Lab reports: `python -m pipeline.report --model_dir=<run>` or `--compare <run> <run> ...`.

    python -m pipeline.report --model_dir=<run>
        writes <run>/report.md and a self-contained <run>/report.html
    python -m pipeline.report --compare <run> <run> ... [--out=comparison]
    python -m pipeline.report --compare <tune_dir>
        one comparison (`comparison.md` / `.html`): a row per run, sorted by the objective

Prints the markdown and the HTML path. See `pipeline.reporting`.
"""
from absl import app, flags

from pipeline import cli, reporting

flags.DEFINE_string("model_dir", None, "Run directory to report on (writes <run>/report.md and .html).")
flags.DEFINE_bool("compare", False, "Compare the run directories (or a tuning directory's trials) "
                  "given as arguments: `--compare runs/a runs/b` or `--compare tuning/x`.")
flags.DEFINE_string("out", None, "--compare: output path without or with .md/.html (default "
                    "./comparison, or <tune_dir>/comparison).")
flags.DEFINE_enum("objective", None, list(reporting.OBJECTIVES), "--compare: sort by this (default "
                  "val_accuracy, or a tuning directory's own objective).")
flags.DEFINE_multi_string("export_dir", None, "Folders holding <name>/<version>/ exports to search "
                          "for the run's exports (default ./saved_models and saved_models/ above the run).")
flags.DEFINE_bool("evaluate", True, "Evaluate the best checkpoint on the test split when no fresh "
                  "evaluation_test.json exists (for per-class accuracy and the confusion matrix).")
FLAGS = flags.FLAGS


def run(argv):
    paths = ([FLAGS.model_dir] if FLAGS.model_dir else []) + list(argv[1:])
    md, page = reporting.write_report(paths, compare=FLAGS.compare, out=FLAGS.out,
                                      objective=FLAGS.objective, export_roots=FLAGS.export_dir,
                                      evaluate=FLAGS.evaluate)
    print(md, flush=True)
    print(page, flush=True)
    return md, page


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
