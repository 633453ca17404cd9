"""`--layer_decay`: the update each variable actually receives, one model per family built offline.

The oracle is the optimizer's own arithmetic: plain SGD (no momentum, no weight
decay) moves a variable by exactly `lr x multiplier x gradient`, so the applied
update over the gradient (the gradient from `tf.GradientTape`) is the rate the
variable learned at. The expected rate of a few layers per family is written
down here from the architecture (which stage the layer is in), not taken from
`pipeline.models.stages`.
"""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as cfg
from pipeline import validation
from pipeline.models import bit, create_model, stages
from pipeline.training import optimizers
from pipeline.tuning import space as search_space
from pipeline.tuning.overrides import apply_overrides

LR, DECAY, BACKBONE = 20.0, 0.5, 0.3  # a large rate: the deep stems' updates stay well above float32 round-off
# family -> (model, input size, {layer: stages counted back from the head (head 0)}).
# The head is "logits"; the stem is the farthest, at stages + 1.
FAMILIES = {
    "cifar_resnet": ("resnet20", 8, {"stem_conv": 4, "stage1_block1_1_conv": 3, "stage2_block3_2_bn": 2,
                                     "stage3_block1_1_conv": 1, "logits": 0}),
    "resnet": ("resnet18", 16, {"stem_conv": 5, "stage1_block2_1_conv": 4, "stage3_block1_shortcut_conv": 2,
                                "stage4_block2_2_bn": 1, "logits": 0}),
    "preact_resnet": ("preact_resnet18", 16, {"stem_conv": 5, "stage2_block1_preact_bn": 3, "final_bn": 1,
                                              "logits": 0}),
    # BiT's table is the family's: a one-unit-per-block, half-width BiT keeps the test to seconds.
    "bit": ("bit_s_r50x1", 16, {"root_block_conv": 5, "block1_unit01_a_proj": 4, "block3_unit01_c_conv": 2,
                                "block4_unit01_b_gn": 1, "pre_head_gn": 1, "logits": 0}),
    "keras_apps": ("keras_mobilenetv2", 32, {"Conv1": 5, "bn_Conv1": 5, "expanded_conv_project": 5,
                                             "block_2_expand": 4, "block_5_project_BN": 3, "block_12_depthwise": 2,
                                             "block_13_expand": 1, "Conv_1_bn": 1, "logits": 0}),
}


def _rates(model, multipliers, *, backbone_lr_multiplier=1.0):
    """Layer name -> the learning-rate factor SGD applied to each of its trainable variables."""
    rng = np.random.RandomState(0)
    head = model.get_layer("logits")
    head.kernel.assign(rng.normal(0, 0.1, head.kernel.shape))  # a zero head passes no gradient back
    x = rng.uniform(0, 1, (2, *model.input_shape[1:])).astype("f4")
    y = np.array([0, 1])
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True), from_logits=True)
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, variables)
    optimizer = optimizers.make_optimizer(cfg.OptimizerConfig("sgd", LR, momentum=0.0), LR,
                                          backbone_lr_multiplier=backbone_lr_multiplier,
                                          head_variable_paths=optimizers.head_variable_paths(model),
                                          variable_lr_multipliers=multipliers)
    before = [v.numpy().copy() for v in variables]
    optimizer.apply_gradients(zip(grads, variables))
    out = {}
    for v, g, b in zip(variables, grads, before):
        g = np.asarray(g, np.float64)
        delta = b.astype(np.float64) - v.numpy()
        mask = (np.abs(delta) > 1e-4 * (np.abs(b) + 1e-6)) & (g != 0)  # updates float32 resolves to 1e-3
        if not mask.any():  # no measurable gradient (a shift the next BatchNorm removes in training)
            continue
        ratio = delta[mask] / (LR * g[mask])
        np.testing.assert_allclose(ratio, np.median(ratio), rtol=5e-3, err_msg=v.path)  # one rate per variable
        out[v.path] = float(np.median(ratio))
    assert len(out) > 0.8 * len(variables)
    return out


def _layer_of(model, path):
    return path.rsplit("/", 1)[0].split("/")[-1]


def _build(model_name, size):
    if model_name.startswith("bit_"):
        return bit.build_bit(depths=(1, 1, 1, 1), width=0.5, num_classes=2, input_shape=(size, size, 3))
    return create_model(model_name, num_classes=2, image_size=size)


def _check_family(model_name, size, expected):
    keras.utils.set_random_seed(0)
    model = _build(model_name, size)
    rates = _rates(model, stages.layer_decay_multipliers(model, model_name, DECAY),
                   backbone_lr_multiplier=BACKBONE)
    by_layer = {}
    for path, rate in rates.items():
        by_layer.setdefault(_layer_of(model, path), []).append(rate)
    for layer, depth in expected.items():
        want = DECAY ** depth * (BACKBONE if layer != "logits" else 1.0)
        assert by_layer[layer] == pytest.approx([want] * len(by_layer[layer]), rel=5e-3), layer
    # Every variable learns at one of the stage rates (stem D**(n+1) ... last stage D, head 1), and
    # every stage rate is someone's.
    deepest = max(expected.values())
    allowed = [DECAY ** k * BACKBONE for k in range(1, deepest + 1)] + [1.0]
    seen = {min(range(len(allowed)), key=lambda i: abs(rate / allowed[i] - 1)) for rate in rates.values()}
    assert all(min(abs(rate / a - 1) for a in allowed) < 5e-3 for rate in rates.values())
    assert seen == set(range(len(allowed)))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_decay_gives_each_stage_its_rate(family):
    model_name, size, expected = FAMILIES[family]
    _check_family(model_name, size, expected)


def test_layer_decay_on_a_keras_hub_backbone(tmp_path):
    from tests.test_keras_hub import save_tiny_preset
    preset = save_tiny_preset(str(tmp_path / "preset"))  # conv1 stem, stack0, stack1
    _check_family(f"keras_hub:{preset}", 32, {"conv1_conv": 3, "conv1_bn": 3, "stack0_block0_1_conv": 2,
                                              "stack1_block0_0_conv": 1, "logits": 0})


def test_weight_decay_is_not_scaled():
    """Decoupled weight decay stays at the base rate: a zero gradient leaves only lr x wd x w."""
    keras.utils.set_random_seed(0)
    model = create_model("resnet20", num_classes=2, image_size=8)
    multipliers = stages.layer_decay_multipliers(model, "resnet20", DECAY)
    stem = model.get_layer("stem_conv").kernel
    assert multipliers[stem.path] == DECAY ** 4
    wd = 0.01
    optimizer = optimizers.make_optimizer(cfg.OptimizerConfig("sgd", LR, momentum=0.0, weight_decay=wd), LR,
                                          variable_lr_multipliers=multipliers)
    before = stem.numpy().copy()
    optimizer.apply_gradients([(tf.zeros_like(stem), stem)])
    np.testing.assert_allclose(before - stem.numpy(), LR * wd * before, rtol=1e-5, atol=1e-9)


def test_decay_one_is_the_plain_optimizer_and_rates_are_powers():
    model = create_model("resnet20", num_classes=2, image_size=8)
    assert stages.layer_decay_multipliers(model, "resnet20", 1.0) == {}
    plain = optimizers.make_optimizer(cfg.OptimizerConfig("sgd", LR), LR, variable_lr_multipliers={})
    assert type(plain) is keras.optimizers.SGD
    assert stages.layer_decay_rates(3, 0.5) == [0.25, 0.5, 1.0]
    names = [name for name, _ in stages.variable_stages(model, "resnet20")]
    assert names == ["stem", "stage1", "stage2", "stage3", "head"]


def test_a_model_without_stages_is_refused_in_one_line(tmp_path):
    """A TF-Hub module is opaque (one SavedModel layer): its family declares no stages."""
    module = tf.Module()
    module.kernel = tf.Variable(tf.ones((3, 4)))
    module.__call__ = tf.function(lambda images: tf.matmul(tf.reduce_mean(images, axis=[1, 2]), module.kernel),
                                  input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "module"))
    name = f"hub:{tmp_path / 'module'}"
    model = create_model(name, num_classes=2, image_size=8)
    with pytest.raises(stages.StageError, match=r"--layer_decay: --model=hub:.* declares no stages"):
        stages.layer_decay_multipliers(model, name, 0.7)


def test_flags_are_checked_searchable_and_recorded(tmp_path, mirrored_recipe_run):
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--layer_decay=.* is out of range: must be in \(0, 1\]"):
            validation.check_train(cfg.TrainConfig(layer_decay=bad))
    base = cfg.RunConfig(model_dir=str(tmp_path), model=cfg.ModelConfig("resnet20"),
                         train=cfg.TrainConfig(layer_decay=0.8))
    space = search_space.make_search_space(base, tune=["layer_decay"], ranges={"layer_decay": ["0.6", "0.9"]})
    (param,) = space.params
    assert (param.default, param.low, param.high) == (0.8, 0.6, 0.9)
    assert "layer_decay" not in search_space.make_search_space(base).names  # opt-in: the default search is as before
    nasnet = dataclasses.replace(base, model=cfg.ModelConfig("keras_nasnetmobile"))
    with pytest.raises(ValueError, match="declares no stages"):
        search_space.make_search_space(nasnet, tune=["layer_decay"])
    # drop_path is searched for models that take it, and a trial's values reach the model and the trainer.
    assert search_space.make_search_space(base, tune=["drop_path"]).params[0].default == 0.0
    with pytest.raises(ValueError, match="has no stochastic depth"):
        search_space.make_search_space(nasnet, tune=["drop_path"])
    trial = apply_overrides(base, {"drop_path": 0.2, "layer_decay": 0.6})
    assert trial.model.drop_path == 0.2 and trial.train.layer_decay == 0.6
    # End to end under MirroredStrategy over 2 logical CPUs (the per-variable rates there are
    # Keras's update_step per replica component, keyed by `optimizers.variable_key`): conftest's
    # run with every recipe flag on (shared with test_recipes_loop and test_augment_policies).
    model_dir = mirrored_recipe_run
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["replicas"] == 2
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["train"]["layer_decay"] == 0.7 and config["model"]["drop_path"] == 0.1
    assert "--layer_decay=0.7" in open(os.path.join(model_dir, "flags.cfg")).read()
