"""Export a run for TF Serving: `python -m pipeline.export --model_dir=<run>`.

    [--name=...] [--export_dir=saved_models] [--version=N] [--overwrite] [--checkpoint=best|last]

Prints the export path. The format (signatures, versions, atomic writes) is
described in `pipeline.serving.export`.
"""
from absl import app, flags

from pipeline import cli, rundir
from pipeline.serving import export

flags.DEFINE_string("model_dir", None, "Run directory to export.", required=True)
flags.DEFINE_string("name", None, "Export name (default <model>-<dataset> of the run).")
flags.DEFINE_string("export_dir", "saved_models", "Folder holding <name>/<version>/ exports.")
flags.DEFINE_integer("version", None, "Integer version (default: the next free one).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --version (atomically).")
flags.DEFINE_enum("checkpoint", "best", list(rundir.CHECKPOINTS), "Which checkpoint to export.")
FLAGS = flags.FLAGS


def run(argv):
    cli.no_arguments(argv)
    path = export.export_run(FLAGS.model_dir, export_root=FLAGS.export_dir, name=FLAGS.name,
                             version=FLAGS.version, overwrite=FLAGS.overwrite, checkpoint=FLAGS.checkpoint)
    print(path, flush=True)
    return path


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
