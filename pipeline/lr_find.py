"""The learning-rate range test: `python -m pipeline.lr_find --dataset=... --model=... [train flags]`.

Trains the model train/finetune would build (same flags) for --lr_find_steps
steps while the rate grows exponentially from --lr_find_start to
--lr_find_end, stops when the loss diverges, and prints the suggested rate as
a flag (`--learning_rate=3.2e-3`, the "valley" rule). Writes only
`<model_dir>/lr_find.json` and `lr_find.png` (default model_dir:
runs/lr_find-<model>-<dataset>-<time>); no checkpoint.
"""

from absl import app, flags

from pipeline import cli

cli.define_data_flags()
cli.define_model_flags()
cli.define_train_flags()
cli.define_finetune_flags()
cli.define_run_flags()
cli.define_lr_find_flags()
FLAGS = flags.FLAGS


def run(argv):
    cli.no_arguments(argv)
    config, scan = cli.lr_find_config_from_flags(FLAGS)
    from pipeline.training import lr_find  # imports TensorFlow: after the flags are checked

    result = lr_find.find_learning_rate(config, scan)
    print(f"range test: {len(result.losses)} steps from {result.rates[0]:.2g} to {result.rates[-1]:.2g} "
          f"({result.reason}); steepest descent at {result.steepest:.2g}" if result.steepest is not None else
          f"range test: {result.reason}")
    print(f"plot and numbers: {result.model_dir}/lr_find.png, lr_find.json")
    if result.flag is None:
        raise ValueError(f"no step of the range test had a finite loss ({result.reason}); "
                         "lower --lr_find_start.")
    print(result.flag)


def main(argv):
    cli.run_cli(run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
