"""Export a run for TF Serving: `python -m pipeline.export --model_dir=<run>`.

    [--name=...] [--export_dir=saved_models] [--version=N] [--overwrite] [--checkpoint=best|last]
    [--format=saved_model|onnx|litert|all] [--quantize=none|float16|dynamic|int8]
    [--[no]calibrate] [--reject_below=P] [--tta=none|flip|flip_crops]

Prints the export path. The format (signatures, versions, atomic writes) is
described in `pipeline.serving.export`, the other formats in
`pipeline.serving.formats`, calibration and rejection in `pipeline.serving.deploy`.
"""
from absl import app, flags

from pipeline import cli, cli_deploy, rundir
from pipeline.serving import deploy

flags.DEFINE_string("model_dir", None, "Run directory to export.", required=True)
flags.DEFINE_string("name", None, "Export name (default <model>-<dataset> of the run).")
flags.DEFINE_string("export_dir", "saved_models", "Folder holding <name>/<version>/ exports.")
flags.DEFINE_integer("version", None, "Integer version (default: the next free one).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --version (atomically).")
flags.DEFINE_enum("checkpoint", "best", list(rundir.CHECKPOINTS), "Which checkpoint to export.")
cli_deploy.define_deploy_flags()
FLAGS = flags.FLAGS


def run(argv):
    cli.no_arguments(argv)
    settings = cli_deploy.deploy_settings_from_flags(FLAGS)
    path = deploy.export_run(FLAGS.model_dir, settings, export_root=FLAGS.export_dir, name=FLAGS.name,
                             version=FLAGS.version, overwrite=FLAGS.overwrite, checkpoint=FLAGS.checkpoint)
    print(path, flush=True)
    return path


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
