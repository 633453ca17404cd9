"""Cached backbone features for frozen-backbone phases (`--cache_features`, on by default).

Why: a frozen phase (`--freeze_epochs`, or a linear probe with
`--freeze_epochs=<epochs>`) recomputes the same backbone forward pass for
every image in every epoch, although only the head ("logits") learns. When
every batch is a pure function of the images (`--augment=none`, or
`--feature_views=K` precomputed augmented views), the pooled features (the
"pool" layer's output) are computed once, batched, under the run's precision
and strategy (by `inference.inference_model`'s copy: BiT's standardized
kernels as constants, the same features bit for bit), and the head trains on
them: the same Dense layer object, the same optimizer and schedule (the
phase's compiled `model.optimizer`), the same callbacks, so metrics.csv,
checkpoints and the summary read as before. The
features of epoch `e` are ordered exactly as `TrainingStream.epoch(e)` orders
the images (the same shuffle seed and buffer over the same number of
elements), so with `--augment=none` the head sees the same batches in the same
order as without the cache. Validation of the frozen phase uses cached
validation features too; the unfrozen phase trains on images as before.

Where they live: in memory when they fit (`in_memory_limit_bytes`), else in
`<run>/features/` (`tf.data.Dataset.save` per split, written to a temporary
name and renamed), committed by `features/key.json`, written last, holding a
SHA-256 of the backbone's weights and the data settings: a changed backbone,
another image size, precision or augmentation never reads a stale cache.

The cache switches itself off, with one printed note, whenever a batch is not
a pure function of the image: MixUp (and any batch-level mixing), random
augmentations without `--feature_views`, a model whose trainable variables
in the frozen phase are not exactly its head's, or a frozen backbone that
computes other features in training mode than in inference mode (dropout
inside, as EfficientNet's drop-connect: `training_mode_note`, a check run on
one image unless the model's spec declares `frozen_is_inference`).

Trainer hook: `cached_runner(...)` wraps the run's `loop.Loop`; it behaves as
the Loop except that `train_epoch` in a frozen phase trains the head on the
features, and `epoch_variables` names what such an epoch changes (the head
and its optimizer), so the run commits those epochs once a minute.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from pipeline import rundir
from pipeline.data.dataset import pass_seed
from pipeline.models import get_spec
from pipeline.models.inference import inference_model
from pipeline.models.pretrained import HEAD, POOL, backbone_layers
from pipeline.training import loop as loop_lib
from pipeline.training import memory

FEATURES_DIR = "features"
KEY_FILE = "key.json"
# Augmentations whose output does not depend on the per-example seed.
SEED_FREE_AUGMENTATIONS = frozenset({"none"})
# Features beyond this (or beyond a quarter of the free memory) go to <run>/features/.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
# Bump when the layout of the stored cache changes: older caches are then recomputed.
CACHE_FORMAT = 1


def plan(data, train, *, mixup_alpha: float, model_config=None) -> tuple[int, str]:
    """(views to precompute, note): 0 views means the cache is off, and the note says why.

    A pure rule over the settings, so `--cache_features` is decided (and
    printed) before any feature is computed.
    """
    if not train.freeze_epochs or not train.cache_features:
        return 0, ""
    views = train.feature_views
    if mixup_alpha > 0 or train.cutmix_alpha > 0:
        how = f"MixUp (alpha {mixup_alpha:g})" if mixup_alpha > 0 else f"CutMix (alpha {train.cutmix_alpha:g})"
        return 0, (f"feature cache off: {how} mixes pairs of images, so a batch is not a function of "
                   "cached features.")
    per_image = [f"--{name}={value:g}" for name, value in
                 (("random_erasing", data.random_erasing), ("color_jitter", data.color_jitter)) if value > 0]
    if per_image and not views:
        return 0, (f"feature cache off: {' '.join(per_image)} changes every image at random each epoch; "
                   "use --feature_views=K to precompute K augmented views per image.")
    drop_path = (model_config.drop_path or 0.0) if model_config is not None else 0.0
    if drop_path > 0:
        return 0, (f"feature cache off: --drop_path={drop_path:g} drops residual branches at random in "
                   "training, also in a frozen backbone.")
    if data.augment in SEED_FREE_AUGMENTATIONS:
        return 1, ""
    if views:
        return views, ""
    return 0, (f"feature cache off: --augment={data.augment} draws new random crops every epoch; "
               "use --augment=none, or --feature_views=K to precompute K augmented views per image.")


def backbone_hash(model: keras.Model) -> str:
    """SHA-256 over the backbone's weights (names, shapes, dtypes, values): what features depend on."""
    digest = hashlib.sha256()
    for layer in backbone_layers(model):
        for weight in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{weight.path}:{value.shape}:{value.dtype};".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to its pooled features (the "pool" layer), sharing its layers and weights."""
    return keras.Model(model.inputs, model.get_layer(POOL).output, name="features")


class _Head(keras.Model):
    """A functional model of the head whose `stop_training` is the full model's (what callbacks set)."""

    def __init__(self, inputs, outputs, *, full_model, **kwargs):
        super().__init__(inputs, outputs, **kwargs)
        self._full_model = lambda: full_model  # a function, so Keras does not track the model as a layer

    @property
    def stop_training(self):
        return self._full_model().stop_training

    @stop_training.setter
    def stop_training(self, value):
        if hasattr(self, "_full_model"):
            self._full_model().stop_training = value


def training_mode_note(model: keras.Model, image_size: int) -> str:
    """"" when the pooled features in training mode equal inference mode's on a random image, else why not.

    The uncached frozen phase calls the model with `training=True`; the cache
    computes the features with `training=False`. They differ whenever a layer
    of the backbone acts on the `training` flag although it is frozen:
    Dropout and its kin (EfficientNet's drop-connect, a keras-hub ViT's
    dropout) zero or rescale at random, and a deterministic difference would
    break the equality as surely. A behavioural check, not a list of layer
    types, so it also covers custom sublayers and SavedModel layers.
    """
    extractor = feature_extractor(model)
    images = keras.random.uniform((1, image_size, image_size, 3), seed=0)  # eager calls: ~1 s each for a ResNet-50-sized backbone
    inference = np.asarray(extractor(images, training=False))
    training = np.asarray(extractor(images, training=True))
    # Relative to the features' own scale (randomly initialized backbones give features of ~1e-6).
    if np.abs(training - inference).max() <= 1e-5 * np.abs(inference).max():
        return ""
    return (f"feature cache off: {model.name}'s frozen backbone computes other features in training mode "
            "(dropout or another layer acting on training=True), so cached features would not be the "
            "frozen phase's.")


def head_model(model: keras.Model) -> keras.Model:
    """The head ("logits", the same layer and variables) as a model of the pooled features."""
    head = model.get_layer(HEAD)
    features = keras.Input(shape=tuple(model.get_layer(POOL).output.shape[1:]), dtype="float32",
                           name="features")
    return _Head(features, head(features), full_model=model, name="head")


def feature_step(extractor: keras.Model, strategy):
    """One compiled `(image, label, valid) -> (features, label, valid)` step under `strategy`, gathered.

    Inference mode (`training=False`): what a frozen backbone computes in a
    training step too (Keras runs frozen BatchNorm in inference mode).
    """
    def replica(x, y, valid):
        return tf.cast(extractor(x, training=False), tf.float32), y, valid

    @tf.function
    def step(x, y, valid):
        out = strategy.run(replica, args=(x, y, valid))
        return tuple(strategy.gather(o, axis=0) for o in out)
    return step


def _padded(batches: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """`(image, label, valid)` batches all padded to `batch_size` (zeros, `valid` 0): one shape, one trace.

    A BiT-R50 trace takes seconds, as long as a pass over a small split; a last,
    partial batch would cost a second trace per split (and a validation split
    a third and fourth).
    """
    def pad(x, y):
        n = tf.shape(x)[0]

        def fill(t):
            t = tf.pad(t, [[0, batch_size - n]] + [[0, 0]] * (len(t.shape) - 1))
            return tf.ensure_shape(t, [batch_size, *t.shape[1:]])
        return fill(x), fill(y), tf.cast(tf.range(batch_size) < n, tf.int32)  # gather takes no bool
    return batches.map(pad)


def _without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning off (its AUTOTUNE maps then run one call per core).

    Why: with autotuning, the iterator of a pass over the digits split stalled
    for 4-6 s at its end in 3 of 5 runs (TensorFlow 2.21, this 2-core CPU;
    the pass itself takes 10-15 s), and in none of 5 without. A pass is one
    long convolution-bound loop whose input is cheap: there is nothing to tune.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def compute_features(step, strategy, batches: tf.data.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, D], labels [N]) of `(image, label)` batches of at most `batch_size`, in order."""
    features, labels = [], []
    for x, y, valid in strategy.experimental_distribute_dataset(_without_autotune(_padded(batches, batch_size))):
        f, label, keep = (t.numpy() for t in step(x, y, valid))
        features.append(f[keep == 1])
        labels.append(label[keep == 1])
    return np.concatenate(features), np.concatenate(labels)


def view_batches(stream, view: int) -> tf.data.Dataset:
    """The training split in stored order, augmented as view `view` (seeds (pass_seed(seed, view), i))."""
    ds = stream.elements
    if stream.decode is not None:
        ds = ds.map(stream.decode, num_parallel_calls=tf.data.AUTOTUNE)
    seed, aug = tf.constant(pass_seed(stream.seed, view), tf.int64), stream.augmentation
    ds = ds.enumerate().map(
        lambda i, example: (aug(tf.image.convert_image_dtype(example[0], tf.float32), tf.stack([seed, i])),
                            example[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(stream.batch_size).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class Features:
    """The cached features: one unbatched `(features, label)` dataset per training view, and validation's."""

    train_views: list
    val: Optional[tf.data.Dataset]
    nbytes: int
    where: str  # "memory" or the features/ directory


def _key(model: keras.Model, stream, settings: dict) -> dict:
    return {"format": CACHE_FORMAT, "backbone_sha256": backbone_hash(model), "examples": stream.size,
            **settings}


def _stored(directory: str, key: dict) -> Optional[Features]:
    """The committed cache in `directory` if its key is `key` (same backbone and settings), else None."""
    key_file = os.path.join(directory, KEY_FILE)
    if not os.path.exists(key_file):
        return None
    with open(key_file) as f:
        stored = json.load(f)
    if stored.get("key") != key:
        return None
    views = [tf.data.Dataset.load(os.path.join(directory, f"train-{v}")) for v in range(stored["views"])]
    val = tf.data.Dataset.load(os.path.join(directory, "val")) if stored["has_val"] else None
    return Features(views, val, int(stored["nbytes"]), directory)


def _save_split(directory: str, name: str, features: np.ndarray, labels: np.ndarray) -> None:
    """`tf.data.Dataset.save` under a temporary name, then renamed: a reader never sees a part."""
    final, tmp = os.path.join(directory, name), os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.data.Dataset.from_tensor_slices((features, labels)).save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def build_features(model, strategy, stream, val_batches, *, views: int, settings: dict,
                   write_dir: str, in_memory_limit_bytes: Optional[int] = None) -> Features:
    """Compute (or, from a committed `write_dir/features/` of the same key, load) the features.

    Returns in-memory datasets when the arrays fit `in_memory_limit_bytes`
    (default: the smaller of IN_MEMORY_LIMIT_BYTES and a quarter of the free
    memory); else they are written to `write_dir/features/` and read from there.
    """
    directory = rundir.path(write_dir, FEATURES_DIR)
    key = _key(model, stream, {**settings, "views": views})
    stored = _stored(directory, key)
    if stored is not None:
        return stored
    with strategy.scope():
        plain = inference_model(model)  # BiT: standardized kernels as constants, 1.3x faster, same features
    step = feature_step(feature_extractor(plain), strategy)
    batch = stream.batch_size
    arrays = [compute_features(step, strategy, view_batches(stream, v), batch) for v in range(views)]
    val = compute_features(step, strategy, val_batches, batch) if val_batches is not None else None
    nbytes = sum(f.nbytes + y.nbytes for f, y in arrays + ([val] if val else []))
    limit = in_memory_limit_bytes
    if limit is None:
        free = memory.available_bytes()
        limit = min(IN_MEMORY_LIMIT_BYTES, free // 4) if free else IN_MEMORY_LIMIT_BYTES
    if nbytes <= limit:
        slices = tf.data.Dataset.from_tensor_slices
        return Features([slices(a) for a in arrays], slices(val) if val else None, nbytes, "memory")
    os.makedirs(directory, exist_ok=True)
    with_key = os.path.join(directory, KEY_FILE)
    if os.path.exists(with_key):
        os.remove(with_key)  # uncommit the stale cache before its parts are replaced
    for v, (f, y) in enumerate(arrays):
        _save_split(directory, f"train-{v}", f, y)
    if val is not None:
        _save_split(directory, "val", *val)
    rundir.write_json_atomic(with_key, {"key": key, "views": views, "has_val": val is not None,
                                        "nbytes": nbytes})
    return _stored(directory, key)


def _identity(image, seed):
    del seed
    return image


class CachedFeatureRunner:
    """A `loop.Loop` that trains frozen phases' heads on cached features (see the module docstring).

    Everything but `set_optimizer` and `train_epoch` is the wrapped Loop's.
    """

    def __init__(self, runner: loop_lib.Loop, model: keras.Model, *, stream, val_batches, views: int,
                 settings: dict, write_dir: str, label_smoothing: float, num_classes: int,
                 fixed_steps: bool = False, frozen_is_inference: bool = False):
        self._runner, self._model, self._fixed_steps = runner, model, fixed_steps
        self._stream, self._val_batches, self._views = stream, val_batches, views
        self._settings, self._write_dir = settings, write_dir
        self._label_smoothing, self._num_classes = label_smoothing, num_classes
        self._features: Optional[Features] = None
        self._off: Optional[bool] = None  # training_mode_note's verdict, once per run
        self._frozen_is_inference = frozen_is_inference
        self._head: Optional[loop_lib.Loop] = None  # the head's Loop in a frozen phase, else None
        self._val = None

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def _frozen(self) -> bool:
        """The backbone is frozen, the head's variables are exactly what trains, and training mode changes nothing."""
        model = self._model
        if any(layer.trainable for layer in backbone_layers(model)):
            return False
        head = {id(v) for v in model.get_layer(HEAD).trainable_variables}
        if head != {id(v) for v in model.trainable_variables}:
            print("feature cache off: in the frozen phase more than the head trains.", flush=True)
            return False
        if self._off is None and self._features is None and not self._frozen_is_inference:
            note = training_mode_note(model, int(self._settings["image_size"]))
            if note:
                print(note, flush=True)
            self._off = bool(note)
        return not self._off

    def _ensure_features(self) -> Features:
        if self._features is None:
            start = time.time()
            strategy = self._runner.strategy
            self._features = build_features(self._model, strategy, self._stream, self._val_batches,
                                            views=self._views, settings=self._settings,
                                            write_dir=self._write_dir)
            n = self._stream.size
            print(f"feature cache: {n} training images x {self._views} view(s) and the validation split as "
                  f"pooled features ({self._features.nbytes / 2**20:.1f} MiB, {self._features.where}) in "
                  f"{time.time() - start:.1f} s", flush=True)
        return self._features

    def set_optimizer(self, optimizer) -> None:
        """The phase's optimizer for the Loop, and (frozen phase) for the head's Loop on features."""
        self._runner.set_optimizer(optimizer)
        self._head = None
        if not self._frozen():
            return
        features = self._ensure_features()
        strategy = self._runner.strategy
        self._head = loop_lib.Loop(head_model(self._model), strategy, label_smoothing=self._label_smoothing,
                                   **self._runner.recipes)  # the run's EMA, clipping, accumulation, class weights
        self._head.set_optimizer(optimizer)
        self._val = None
        if features.val is not None:
            val = self._one_hot(features.val.batch(self._stream.batch_size))
            self._val = (self._head.distribute(val), loop_lib.steps_of(val))

    def epoch_variables(self):
        """In a frozen phase on features: the head's variables and the optimizer's; else the Loop's (None).

        Nothing else changes in such an epoch (`_frozen` checked that only the
        head trains; the backbone does not even run), so the run commits its
        0.2 s epochs once a minute instead of writing the whole model each
        time (`callbacks.RunCheckpoint.defer_commits`).
        """
        if self._head is None:
            return self._runner.epoch_variables()
        return list(self._head.model.variables) + list(self._head.optimizer.variables)

    def _one_hot(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        n = self._num_classes
        return ds.map(lambda f, y: (f, tf.one_hot(y, n)), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE)

    def epoch_features(self, epoch: int, steps_per_epoch: Optional[int] = None) -> tf.data.Dataset:
        """Epoch `epoch`'s batched `(features, label)`, ordered as `TrainingStream` orders its images."""
        view = self._features.train_views[epoch % len(self._features.train_views)]
        stream = dataclasses.replace(self._stream, elements=view, decode=None, augmentation=_identity)
        return stream.steps(epoch, steps_per_epoch) if steps_per_epoch else stream.epoch(epoch)

    def train_epoch(self, epoch: int, dataset, *, callbacks, steps_per_epoch: int, validation=None,
                    validation_steps=None, **kwargs) -> dict:
        """The Loop's `train_epoch`; in a frozen phase the head's, on epoch `epoch`'s cached features."""
        if self._head is None:
            return self._runner.train_epoch(epoch, dataset, callbacks=callbacks, steps_per_epoch=steps_per_epoch,
                                            validation=validation, validation_steps=validation_steps, **kwargs)
        steps = steps_per_epoch if self._fixed_steps else None
        train = self._head.distribute(self._one_hot(self.epoch_features(epoch, steps)))
        val, val_steps = self._val if (validation is not None and self._val) else (None, None)
        return self._head.train_epoch(epoch, train, callbacks=callbacks, steps_per_epoch=steps_per_epoch,
                                      validation=val, validation_steps=val_steps)


def cached_runner(run, runner: loop_lib.Loop, model: keras.Model, datasets, *, mixup_alpha: float,
                  write_dir: str, policy: str):
    """`runner`, or (cache planned, see `plan`) a CachedFeatureRunner around it; prints why not."""
    views, note = plan(run.data, run.train, mixup_alpha=mixup_alpha, model_config=run.model)
    if views and POOL not in {layer.name for layer in model.layers}:
        views, note = 0, f"feature cache off: {run.model.name} has no \"{POOL}\" layer of pooled features."
    if note:
        print(note, flush=True)
    if not views or datasets.stream is None:
        return runner
    settings = {"model": run.model.name, "weights": run.model.weights, "dataset": datasets.name,
                "image_size": datasets.image_size, "augment": run.data.augment, "seed": run.data.seed,
                "precision": policy}
    return CachedFeatureRunner(runner, model, stream=datasets.stream, val_batches=datasets.val, views=views,
                               settings=settings, write_dir=write_dir,
                               label_smoothing=run.train.label_smoothing,
                               num_classes=len(datasets.class_names),
                               fixed_steps=bool(run.train.steps_per_epoch),
                               frozen_is_inference=get_spec(run.model.name).frozen_is_inference)
