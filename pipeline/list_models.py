"""List the models: `python -m pipeline.list_models [--family=resnet]`.

Prints every registered model (name, family, depth, default image size,
default weights) and, grouped by family, the keras-hub image presets this
keras-hub version knows (parameter count, image size where known), all
offline. `--family` filters both. See `pipeline.models.catalog`.
"""
from absl import app, flags

from pipeline import cli

# A string, not an enum: keras-hub's families are known only once it is imported; a typo is one line
# naming the close families.
flags.DEFINE_string("family", None, "Only this family: a registered one (cifar_resnet, resnet, bit, "
                    "keras_apps, ...) or a keras-hub one (resnet, vit, efficientnet, dinov2, ...).")
FLAGS = flags.FLAGS


def run(argv):
    from pipeline.models import catalog  # imports TensorFlow: after the flags are parsed

    cli.no_arguments(argv)
    print(catalog.model_catalog(FLAGS.family), flush=True)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
