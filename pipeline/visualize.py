"""Plot a run and what its network learned: `python -m pipeline.visualize --model_dir=<run>`.

    --what=curves,lr,confusion,filters      (default: all the run supports)
    --what=feature_maps --image=cat.png --layer=stem_conv,stage2_block1_out
    --what=feature_maps,gradcam --image=test:7   (image 7 of the run's test split)
    --what=activation_max --layer=stage3_block3_2_conv --filters=16
    --what=compare runs/a runs/b runs/c       (or --runs=a,b; --model_dir joins them)
    --list_layers                             (names, indices, output shapes)

PNG files go to `<run>/plots/` (or `--out`); see `pipeline.reporting.visualization`.
"""
from absl import app, flags

from pipeline import cli
from pipeline.reporting.plot_kinds import KINDS

flags.DEFINE_string("model_dir", None, "Run directory to plot.")
flags.DEFINE_list("what", ["all"], f"Plots to make: all, {', '.join(KINDS)}.")
flags.DEFINE_string("out", None, "Output folder (default <model_dir>/plots).")
flags.DEFINE_string("image", None, "feature_maps / gradcam input: an image file, or `test:<i>` / "
                    "`val:<i>` for image i of the run's own split.")
flags.DEFINE_multi_string("layer", [], "feature_maps / activation_max layers: names, indices or "
                          "`backbone/<inner>` paths; repeat or comma-separate (default: first conv "
                          "and last feature map / last conv).")
flags.DEFINE_integer("filters", 16, "activation_max: how many filters per layer.", lower_bound=1)
flags.DEFINE_integer("steps", 128, "activation_max: gradient-ascent steps.", lower_bound=1)
flags.DEFINE_integer("max_channels", 32, "feature_maps: channels shown per layer.", lower_bound=1)
flags.DEFINE_string("gradcam_layer", None, "gradcam: 4-D layer (default: the input of `pool`).")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Checkpoint for model plots.")
flags.DEFINE_enum("split", "test", ["test", "val"], "confusion: which split.")
flags.DEFINE_list("runs", [], "compare: run directories (positional arguments work too).")
flags.DEFINE_bool("list_layers", False, "Print the model's layers (index, name, class, output shape).")
FLAGS = flags.FLAGS


def run(argv):
    from pipeline.reporting import visualization  # here: --help and typos need no matplotlib
    return visualization.make_plots(
        FLAGS.model_dir, FLAGS.what, runs=list(argv[1:]) + FLAGS.runs, out=FLAGS.out, image=FLAGS.image,
        layers=FLAGS.layer, filters=FLAGS.filters, steps=FLAGS.steps, max_channels=FLAGS.max_channels,
        gradcam_layer=FLAGS.gradcam_layer, checkpoint=FLAGS.checkpoint, split=FLAGS.split,
        list_layers=FLAGS.list_layers)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
