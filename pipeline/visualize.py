"""Plot a run and what its network learned: `python -m pipeline.visualize --model_dir=<run>`.

    --what=curves,lr,confusion,filters      (default: all the run supports)
    --what=feature_maps --image=cat.png --layer=stem_conv,stage2_block1_out
    --what=feature_maps,gradcam --image=test:7   (image 7 of the run's test split)
    --what=activation_max --layer=stage3_block3_2_conv --filters=16
    --what=compare runs/a runs/b runs/c       (or --runs=a,b; --model_dir joins them)
    --list_layers                             (names, indices, output shapes)

PNG files go to `<run>/plots/` (or `--out`); see `pipeline.plots`.
"""
import os
import re

from absl import app, flags

from pipeline import cli
from pipeline.reporting import plots
from pipeline import rundir

flags.DEFINE_string("model_dir", None, "Run directory to plot.")
flags.DEFINE_list("what", ["all"], f"Plots to make: all, {', '.join(plots.KINDS)}.")
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


def _layers():
    return [part.strip() for value in FLAGS.layer for part in value.split(",") if part.strip()]


def _image(model_dir, model):
    match = re.fullmatch(r"(test|val):(\d+)", FLAGS.image)
    if match and not os.path.exists(FLAGS.image):
        image, label = plots.dataset_image(model_dir, match[1], int(match[2]))
        return image, f"{match[1]}{match[2]}_{label}"
    image = plots.load_image(FLAGS.image, plots.input_size(model))
    return image, os.path.splitext(os.path.basename(FLAGS.image))[0]


def run(argv):
    kinds = plots.parse_kinds(FLAGS.what)
    explicit = "all" not in FLAGS.what
    model_dir = FLAGS.model_dir
    runs = list(dict.fromkeys(([model_dir] if model_dir else []) + list(argv[1:]) + FLAGS.runs))
    if not model_dir:
        if FLAGS.list_layers or not runs or (explicit and kinds != ["compare"]):
            raise ValueError("--model_dir is required (only --what=compare takes run directories "
                             "instead).")
        model_dir, kinds = runs[0], ["compare"]
    plots.require_run(model_dir)
    out = FLAGS.out or plots.default_out_dir(model_dir)
    model = None

    def get_model():
        nonlocal model
        if model is None:
            model = plots.load_run_model(model_dir, FLAGS.checkpoint)
        return model

    if FLAGS.list_layers:
        print(plots.format_layers(get_model()))
        return []
    written = []
    for kind in kinds:
        skip = _skip_reason(kind, runs)
        if skip:
            if explicit:
                raise ValueError(f"--what={kind} {skip}.")
            print(f"note: skipped {kind}: it {skip}", flush=True)
            continue
        new = _plot(kind, model_dir, get_model, runs, out)
        for path in new:
            print(f"wrote {path}", flush=True)
        written += new
    return written


def _skip_reason(kind, runs):
    if kind in plots.IMAGE_KINDS and not FLAGS.image:
        return "needs --image=<file> (or --image=test:<i>)"
    if kind == "compare" and len(runs) < 2:
        return "needs two or more runs (positional arguments or --runs)"
    return None


def _plot(kind, model_dir, get_model, runs, out):
    if kind == "compare":
        return [plots.plot_compare(runs, out)]
    if kind == "curves":
        return [plots.plot_curves(model_dir, out)]
    if kind == "lr":
        return [plots.plot_lr(model_dir, out)]
    if kind == "confusion":
        return [plots.plot_confusion(model_dir, out, split=FLAGS.split, checkpoint=FLAGS.checkpoint)]
    model = get_model()
    if kind == "filters":
        return [plots.plot_filters(model, out)]
    if kind == "activation_max":
        layers = _layers() or plots.default_activation_layers(model)
        return plots.plot_activation_max(model, layers, out, filters=FLAGS.filters, steps=FLAGS.steps)
    image, tag = _image(model_dir, model)
    if kind == "feature_maps":
        layers = _layers() or plots.default_feature_layers(model)
        return plots.plot_feature_maps(model, image, layers, out, max_channels=FLAGS.max_channels,
                                       tag=tag)
    return [plots.plot_gradcam(model, image, out, layer=FLAGS.gradcam_layer, tag=tag,
                               class_names=rundir.read_labels(model_dir))]


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main)
