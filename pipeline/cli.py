"""Flag definitions shared by the entry points, flags -> config, and the one error wrapper.

Entry points (`pipeline/<verb>.py`) call the `define_*_flags()` they need at
import time, then `run_config_from_flags(FLAGS)` inside `main`, wrapped in
`run_cli`. Nothing outside the entry points and this module reads flags.
Importing it and defining the flags are cheap (no TensorFlow): the registries
behind the choice flags load only when --help shows them or a given value is
checked, so a misspelt flag is reported at once. `parse_flags` and `run_cli` give
the exit statuses of `pipeline.errors` (README "Runs").
"""
from __future__ import annotations

import dataclasses
import errno
import os
import sys
import traceback

from absl import flags

from pipeline import config as cfg
from pipeline import errors, run_flags, rundir, validation, workflow

_EXCLUDED_FROM_FLAGFILE = {"model_dir", "resume"}
# Where a run trains (a TPU's address) is not part of the run either: resume with --tpu again.
_EXCLUDED_FROM_FLAGFILE.add("tpu")


def _model_names():
    from pipeline.models import list_models, list_prefixes
    return list_models(), list_prefixes()


# -- choice flags whose registries import TensorFlow, defined without importing it
#
# Their choices are read from the registry only when needed: when --help prints
# them, and by a validator that absl runs after the whole command line is read
# (so a misspelt flag name is reported in well under a second, before the
# 5-10 s TensorFlow import). A bad choice is still refused before any work.


class _LazyEnumParser(flags.ArgumentParser):
    """An enum parser whose values come from `load()` on first use."""

    def __init__(self, load):
        self._load, self._values = load, None

    @property
    def enum_values(self):
        if self._values is None:
            self._values = list(self._load())
        return self._values

    def parse(self, argument):
        return argument  # checked by the flag's validator, once every flag is parsed

    def flag_type(self):
        return "string enum"


class _LazyHelpFlag(flags.Flag):
    """A flag whose help text is computed when --help shows it (see `lazy_enum`, `define_model_flags`)."""

    def __init__(self, parser, name, default, help_fn):
        self._help_fn = help_fn
        super().__init__(parser, flags.ArgumentSerializer(), name, default, "")

    @property
    def help(self):
        return self._help_fn()

    @help.setter
    def help(self, value):  # absl's Flag.__init__ assigns it
        pass


def lazy_enum(name, default, load, help_text):
    """DEFINE_enum over `load()`'s names (a registry that imports TensorFlow), loaded only when needed.

    --help and typos stay fast; a bad choice is still refused before any work.
    Verbs that define their own flags (pipeline.benchmark) use it too.
    """
    parser = _LazyEnumParser(load)
    flags.DEFINE_flag(_LazyHelpFlag(parser, name, default,
                                    lambda: f"<{'|'.join(parser.enum_values)}>: {help_text}"))

    def check(value):
        # Defaults (ours, also a verb's set_default) are valid: only given values load the registry.
        if value is None or value == flags.FLAGS[name].default:
            return True
        if value not in parser.enum_values:
            raise flags.ValidationError("value should be one of "
                                        f"<{'|'.join(parser.enum_values)}>")
        return True
    flags.register_validator(name, check)


def augmentation_names():
    from pipeline.data.augment import AUGMENTATIONS
    return sorted(AUGMENTATIONS)


def _optimizers():
    from pipeline.training.optimizers import OPTIMIZERS
    return sorted(OPTIMIZERS)


def _schedules():
    from pipeline.training import schedules
    return list(schedules.SCHEDULES)


def precision_names():
    from pipeline.training import precision
    return list(precision.POLICIES)


def _strategies():
    from pipeline.training import distribute
    return list(distribute.CHOICES)


def define_data_flags():
    flags.DEFINE_string("dataset", "digits",
                        "`digits` (embedded, offline), a TFDS name (`cifar10`, `tf_flowers`, "
                        "`tfds:<name>`), or `folder:<path>` (one subfolder per class).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (prepared datasets live here).")
    flags.DEFINE_string("train_split", None, "TFDS split for training, with slicing (`train[:90%]`).")
    flags.DEFINE_string("val_split", None, "TFDS split for validation.")
    flags.DEFINE_string("test_split", None, "TFDS split for the final test.")
    flags.DEFINE_float("val_fraction", 0.1, "Image folders without val/: seeded stratified fraction.")
    flags.DEFINE_float("test_fraction", 0.1, "Image folders without test/: seeded stratified fraction.")
    flags.DEFINE_integer("image_size", None, "Square model resolution (default: the data's own).")
    flags.DEFINE_integer("resize_size", None, "`bit` augmentation: resize to this, then crop --image_size.")
    lazy_enum("augment", "cifar", augmentation_names, "Training augmentation: a crop, a policy (after resizing "
              "only), or <crop>+<policy>: the crop and its flip first, then the policy.")
    run_flags.define_augment_policy_flags()
    flags.DEFINE_integer("batch_size", 128, "Global batch size (split over replicas by tf.distribute).",
                         lower_bound=1)
    flags.DEFINE_bool("strict_images", False, "Fail on corrupt or unreadable images instead of skipping them.")
    flags.DEFINE_bool("cache", True, "Cache decoded images in memory when they fit.")
    run_flags.define_inspect_flags()


def _model_help():
    names, prefixes = _model_names()
    return f"Model: one of {', '.join(names)}; or {', '.join(p + '<handle>' for p in prefixes)}."


def define_model_flags(default_model: str = "resnet20"):
    flags.DEFINE_flag(_LazyHelpFlag(flags.ArgumentParser(), "model", default_model, _model_help))
    flags.register_validator("model", lambda name: name == flags.FLAGS["model"].default or _valid_model(name),
                             message="unknown --model; see --helpfull for the list of models")
    flags.DEFINE_string("weights", None, "Pretrained weights: a TF-Hub handle, a SavedModel directory, "
                        "an .npz/.h5/.weights.h5 file, or `imagenet` (Keras Applications).")
    flags.DEFINE_enum("shortcut", None, ["A", "B"], "CIFAR ResNets: A zero-pad (paper default) or B projection.")
    flags.DEFINE_enum("stem", None, ["auto", "cifar", "imagenet"], "ResNet-18..152 stem.")
    flags.DEFINE_enum("pooling", None, ["avg", "max"], "Global pooling before the head.")
    flags.DEFINE_float("width_multiplier", None, "Scale every layer's filters.")
    flags.DEFINE_string("init_from", None, "Initialize from one of our runs or exports (all but the head).")


def _valid_model(name):
    from pipeline.models import is_valid_model_name
    return is_valid_model_name(name)


def define_train_flags(**defaults):
    d = {"epochs": 30, "optimizer": "sgd", "learning_rate": 0.1, "schedule": "step",
         "lr_boundaries": [], **defaults}
    flags.DEFINE_integer("epochs", d["epochs"], "Epochs to train (ignored when a step budget is set).",
                         lower_bound=1)
    lazy_enum("optimizer", d["optimizer"], _optimizers, "Optimizer.")
    flags.DEFINE_float("learning_rate", d["learning_rate"], "Peak learning rate (after warm-up).")
    flags.DEFINE_float("momentum", 0.9, "Momentum for sgd and rmsprop.")
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum for sgd.")
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (0 = none).")
    lazy_enum("schedule", d["schedule"], _schedules, "Learning-rate schedule.")
    flags.DEFINE_list("lr_boundaries", d["lr_boundaries"], "`step` schedule: epochs where lr *= --lr_decay.")
    flags.DEFINE_float("lr_decay", 0.1, "`step`: factor at each boundary; `exponential`: factor per epoch.")
    flags.DEFINE_float("warmup_epochs", 0.0, "Linear warm-up length in epochs (fractions allowed).")
    flags.DEFINE_integer("switch_optimizer_epoch", 0, "Switch to --second_optimizer after this many epochs.")
    lazy_enum("second_optimizer", None, _optimizers, "Optimizer after the switch.")
    flags.DEFINE_float("second_learning_rate", None, "Learning rate after the switch (default: --learning_rate).")
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy.")
    flags.DEFINE_float("mixup_alpha", 0.0, "MixUp alpha (0 = off).")
    run_flags.define_mixing_flags()
    lazy_enum("precision", "auto", precision_names,
              "auto: mixed_float16 on GPUs >= 7.0, mixed_bfloat16 on CPUs with AVX512-BF16/AMX, "
              "else float32.")
    lazy_enum("strategy", "auto", _strategies,
              "tf.distribute strategy. auto: tpu when --tpu is set, else multi_worker when "
              "TF_CONFIG names more than one chief/worker task, else mirrored over several "
              "GPUs, else default (one device). --batch_size stays the global batch.")
    flags.DEFINE_string("tpu", None, "Cloud TPU for --strategy=tpu (or auto): its name or grpc:// "
                        "address, or `local` on a TPU VM.")
    flags.DEFINE_enum("lr_scaling", "none", ["none", "linear"],
                      "none: learning rates as given (right when --batch_size, the global batch, is "
                      "the recipe's). linear: every learning rate (flag, second optimizer, HyperRule) "
                      "x the number of replicas in sync, for a --batch_size grown with the replicas "
                      "(HyperRule's default rate already follows --batch_size: don't add linear).")
    flags.DEFINE_integer("seed", 0, "Seed for initialization, shuffling and augmentation.")
    flags.DEFINE_bool("deterministic", False, "Turn on TensorFlow op determinism (slower).")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: one pass over the training data).")
    flags.DEFINE_integer("total_steps", None, "Step budget; overrides --epochs.")
    flags.DEFINE_bool("tensorboard", True, "Write TensorBoard scalars to <run>/tensorboard.")
    flags.DEFINE_integer("histogram_freq", 0, "TensorBoard weight and gradient histograms every N epochs "
                         "(0 = off, for speed).", lower_bound=0)
    flags.DEFINE_integer("verbose", None, "Keras verbosity (default: progress bar on a TTY, a line per epoch otherwise).")
    run_flags.define_time_flags()
    run_flags.define_layer_decay_flags()
    run_flags.define_remat_flags()
    run_flags.define_recipe_flags()


def define_finetune_flags():
    flags.DEFINE_integer("freeze_epochs", 0, "Train only the head on a frozen backbone for this many "
                         "epochs (BatchNorm in inference mode), then the whole network.", lower_bound=0)
    flags.DEFINE_float("backbone_lr_multiplier", 1.0,
                       "After unfreezing, the backbone learns at this multiple of the scheduled rate.")
    run_flags.define_feature_cache_flags()


def define_run_flags():
    flags.DEFINE_string("model_dir", None, "Run directory (default runs/<model>-<dataset>-<time>).")
    flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its last finished epoch.")


def flags_text(fv, verb: str) -> str:
    """The resolved flags of this module and `run_flags` as a flagfile (what repeats the run)."""
    lines = ["# Resolved flags of a run. Repeat it with:",
             f"#   python -m pipeline.{verb} --flagfile=<this file>"]
    for module in (__name__, run_flags.__name__):
        for flag in fv.get_flags_for_module(module):
            if flag.name in _EXCLUDED_FROM_FLAGFILE or flag.value is None:
                continue
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


def reparse_with_run_flagfile(fv):
    """For --resume: re-read the run's flags.cfg, then the command line on top of it."""
    flagfile = rundir.path(fv.model_dir, rundir.FLAGS_FILE)
    if not os.path.exists(flagfile):
        raise rundir.RunDirError(f"Cannot resume {fv.model_dir!r}: {flagfile} is missing.")
    fv.unparse_flags()
    fv([sys.argv[0], f"--flagfile={flagfile}", *sys.argv[1:]])


def _opt(name, lr, fv):
    return cfg.OptimizerConfig(name=name, learning_rate=lr, momentum=fv.momentum,
                               nesterov=fv.nesterov, weight_decay=fv.weight_decay)


def run_config_from_flags(fv, verb: str, **train_extra) -> cfg.RunConfig:
    """Build the frozen RunConfig from parsed flags."""
    model_dir = fv.model_dir or rundir.default_model_dir(fv.model, fv.dataset)
    data = cfg.DataConfig(
        dataset=fv.dataset, data_dir=fv.data_dir, train_split=fv.train_split, val_split=fv.val_split,
        test_split=fv.test_split, val_fraction=fv.val_fraction, test_fraction=fv.test_fraction,
        image_size=fv.image_size, resize_size=fv.resize_size, augment=fv.augment,
        batch_size=fv.batch_size, seed=fv.seed, strict_images=fv.strict_images, cache=fv.cache,
        **run_flags.augment_policy_fields(fv), **run_flags.inspect_fields(fv))
    model = cfg.ModelConfig(name=fv.model, weights=fv.weights, shortcut=fv.shortcut, stem=fv.stem,
                            pooling=fv.pooling, width_multiplier=fv.width_multiplier,
                            init_from=fv.init_from, drop_path=fv.drop_path)
    second = None
    if fv.second_optimizer:
        second = _opt(fv.second_optimizer, fv.second_learning_rate or fv.learning_rate, fv)
    try:
        boundaries = tuple(float(b) for b in fv.lr_boundaries)
    except ValueError:
        raise ValueError(f"--lr_boundaries must be numbers of epochs, got {fv.lr_boundaries}.") from None
    train = cfg.TrainConfig(
        epochs=fv.epochs, optimizer=_opt(fv.optimizer, fv.learning_rate, fv), second_optimizer=second,
        switch_optimizer_epoch=fv.switch_optimizer_epoch, schedule=fv.schedule,
        lr_boundaries=boundaries, lr_decay=fv.lr_decay, warmup_epochs=fv.warmup_epochs,
        label_smoothing=fv.label_smoothing, mixup_alpha=fv.mixup_alpha, precision=fv.precision,
        strategy=fv.strategy, tpu=fv.tpu, lr_scaling=fv.lr_scaling, seed=fv.seed,
        deterministic=fv.deterministic,
        steps_per_epoch=fv.steps_per_epoch, total_steps=fv.total_steps, tensorboard=fv.tensorboard,
        histogram_freq=fv.histogram_freq,
        verbose=fv.verbose, **_finetune_fields(fv), **run_flags.time_fields(fv),
        **run_flags.layer_decay_fields(fv), **run_flags.speed_memory_fields(fv),
        **run_flags.mixing_fields(fv), **run_flags.recipe_fields(fv),
        **train_extra)
    run = cfg.RunConfig(model_dir=model_dir, data=data, model=model, train=train,
                        resume=fv.resume, flags_text=flags_text(fv, verb))
    validation.check_run(run)
    return run


def _finetune_fields(fv) -> dict:
    if "freeze_epochs" not in fv:
        return {}
    return {"freeze_epochs": fv.freeze_epochs, "backbone_lr_multiplier": fv.backbone_lr_multiplier}


# OSError numbers of faults outside the command (storage full or failing): retrying may work.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Paths that are not what the command says they are: fix the command.
_BAD_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# tf.errors classes of a lost worker or an aborted step, matched by name so that this
# module never imports TensorFlow.
_TRANSIENT_TF_ERRORS = {"UnavailableError", "AbortedError"}


def _is_tf_error(err: BaseException, names) -> bool:
    return any(c.__name__ in names and c.__module__.startswith("tensorflow")
               for c in type(err).__mro__)


def exit_status(err: BaseException):
    """The exit status for an exception (`errors.EXIT_*`), or None for an unexpected one.

    2: the command or its data is wrong (ValueError and its subclasses, a path
    that does not exist or is of the wrong kind, a diverged training). 75: a
    fault worth retrying as it is (`errors.TransientError`, a full or failing
    disk, a lost worker). 130: interrupted. 1: any other OSError (one line too).
    """
    if isinstance(err, KeyboardInterrupt):
        return errors.EXIT_INTERRUPTED
    if isinstance(err, errors.TransientError) or _is_tf_error(err, _TRANSIENT_TF_ERRORS):
        return errors.EXIT_TRANSIENT
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return errors.EXIT_TRANSIENT
    if isinstance(err, (ValueError, FloatingPointError, *_BAD_PATH_ERRORS)):
        return errors.EXIT_BAD_INPUT
    if isinstance(err, OSError):
        return 1
    return None


def _message(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt) and not str(err):  # a bare Ctrl-C
        return "error: interrupted (Ctrl-C)"
    return f"error: {err}"


def run_cli(fn, *args):
    """Call `fn(*args)`; turn the pipeline's expected errors into one line and an exit status.

    The statuses (`exit_status`, README "Runs") tell a cluster manager what to
    do: 2 fix the command, 75 retry it, 130 the user stopped it. Unexpected
    errors keep their traceback. Set PIPELINE_DEBUG=1 to see the full
    traceback of expected ones too.
    """
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - classified below; the rest is re-raised
        status = exit_status(e)
        if status is None:
            raise
        if os.environ.get("PIPELINE_DEBUG"):
            traceback.print_exc()
        print(_message(e), file=sys.stderr, flush=True)
        sys.exit(status)


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
               "--helpxml", "-helpxml")


def parse_flags(argv):
    """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`), exiting 2 on a bad flag.

    Same message as absl's own parser, but the exit status says "fix the
    command" like every other bad value (absl's default is 1).
    """
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl's --help/--helpfull print the help, then exit 1: asking for help is no error
        if e.code == 1 and any(arg.split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
            sys.exit(errors.EXIT_OK)
        raise
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.",
              file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_BAD_INPUT)


def no_arguments(argv):
    """Refuse positional arguments a verb does not take (absl passes them in argv[1:])."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")


def define_export_flags():
    """`--export` (on unless --noexport), `--export_dir`, `--export_name` for train and finetune."""
    flags.DEFINE_bool("export", True, "Export the best checkpoint as a TF Serving SavedModel at the end "
                      "unless --noexport.")
    flags.DEFINE_string("export_dir", "saved_models", "Folder holding <name>/<version>/ exports.")
    flags.DEFINE_string("export_name", None, "Export name (default: <model>-<dataset>).")
    flags.DEFINE_bool("report", True, "Write <run>/report.md and report.html at the end unless --noreport.")


def after_training(fv, result):
    """Export and report a finished run as the export flags say (see `workflow.after_training`)."""
    return workflow.after_training(result, export=fv.export, export_dir=fv.export_dir,
                                   export_name=fv.export_name, report=fv.report)


# Where a run's export goes is not part of the run (like --model_dir): keep it out of flags.cfg.
_EXCLUDED_FROM_FLAGFILE.update({"export", "export_dir", "export_name", "report"})


# -- pipeline.evaluate: test-time augmentation (the metrics engineer's block)

def define_evaluate_flags():
    """`--tta` for `pipeline.evaluate` (the modes are `pipeline.tta.TTA_MODES`; it imports no TensorFlow)."""
    from pipeline.tta import TTA_MODES
    flags.DEFINE_enum("tta", "none", list(TTA_MODES),
                      "Test-time augmentation: none; flip (the image and its mirror); flip_crops (four "
                      "corner crops and the centre crop of 87.5%, each plain and mirrored). The softmax "
                      "probabilities are averaged; the accuracy without TTA is printed beside.")



def inspect_config_from_flags(fv) -> cfg.DataConfig:
    """The DataConfig `pipeline.inspect_data` inspects: the splits training would read, checked."""
    data = cfg.DataConfig(
        dataset=fv.dataset, data_dir=fv.data_dir, train_split=fv.train_split, val_split=fv.val_split,
        test_split=fv.test_split, val_fraction=fv.val_fraction, test_fraction=fv.test_fraction,
        seed=fv.seed, strict_images=fv.strict_images, **run_flags.inspect_fields(fv))
    validation.check_data(data)
    return data


# The cache is where this machine keeps scans, not part of the run.
_EXCLUDED_FROM_FLAGFILE.add("data_cache_dir")


# -- pipeline.lr_find: the learning-rate range test (the metrics engineer's block)

def define_lr_find_flags():
    """The scan of `pipeline.lr_find` (the model, data and optimizer flags are train's and finetune's)."""
    flags.DEFINE_float("lr_find_start", 1e-7, "Learning rate of the first step of the scan.")
    flags.DEFINE_float("lr_find_end", 10.0, "Learning rate of the last step (the scan stops sooner when the "
                       "loss diverges).")
    flags.DEFINE_integer("lr_find_steps", 100, "Training steps of the scan (the rate grows exponentially).")
    flags.DEFINE_float("lr_find_diverge", 4.0, "Stop once the smoothed loss exceeds this many times its minimum.")


def lr_find_config_from_flags(fv):
    """(RunConfig, LRFindConfig) of `pipeline.lr_find`, checked before TensorFlow loads."""
    run = run_config_from_flags(fv, "lr_find")
    if not fv.model_dir:  # the training default names a run; a scan's directory says what it is
        run = dataclasses.replace(run, model_dir=rundir.default_model_dir("lr_find-" + fv.model, fv.dataset))
    scan = cfg.LRFindConfig(start_lr=fv.lr_find_start, end_lr=fv.lr_find_end, steps=fv.lr_find_steps,
                            diverge_factor=fv.lr_find_diverge)
    validation.check_lr_find(scan)
    return run, scan
