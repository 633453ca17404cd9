"""Check a dataset before training: `python -m pipeline.inspect_data --dataset=folder:~/photos`.

Writes `data_report.json`, `data_report.md` and PNGs to --output_dir (default
`runs/inspect-<dataset>-<time>`): images per class per split, sizes, aspect
ratios, channels, formats, unreadable files, EXIF rotations, exact and near
duplicates within and across splits, the class imbalance. Prints the
warnings; exit status 2 with --strict_data when an image is in two splits.
"""
from absl import app, flags

from pipeline import cli, rundir

cli.define_data_flags()
flags.DEFINE_integer("seed", 0, "Seed of the split of folders without val/ or test/ (as in training).")
flags.DEFINE_string("output_dir", None, "Where the reports go (default runs/inspect-<dataset>-<time>).")
FLAGS = flags.FLAGS


def run(argv):
    cli.no_arguments(argv)
    config = cli.inspect_config_from_flags(FLAGS)  # bad values refused here, before TensorFlow
    output_dir = FLAGS.output_dir or rundir.default_model_dir("inspect", FLAGS.dataset)
    from pipeline.data import inspection  # imports TensorFlow

    report = inspection.inspect_dataset(config, output_dir)
    print(inspection.summary_text(report))
    print(f"data report: {report['files'][1]}")


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
