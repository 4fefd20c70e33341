"""UNet++: structure, parameter count, shape checks, pruning, mixed precision, serialization."""

import copy
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from medseg.nets import unetpp
from medseg.nets.unetpp import (
    build_unetpp,
    check_input_shape,
    deep_supervision_weights,
    head_levels,
    head_names,
    nearest_valid_sizes,
    prune_unetpp,
    repeat_targets,
)

TINY = dict(filters=(4, 8, 8, 16, 16), input_channels=3)


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return build_unetpp(**TINY)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")


def test_default_parameter_count_matches_paper():
    # Zhou et al. report 9.04 M for UNet++ (filters 32..512). Two 3x3 conv per node without
    # bias + BN (gamma, beta trainable; mean, var not), 2x2 transposed conv up-sampling, 4 1x1
    # heads. Counted by hand per node in docs/model.md; here the build (not run) must agree.
    model = build_unetpp()
    assert model.count_params() == 9_052_776
    assert _trainable(model) == 9_045_480
    assert abs(_trainable(model) - 9.04e6) / 9.04e6 < 1e-3
    # The same network without BatchNorm (biases instead) is the paper's configuration.
    assert build_unetpp(batch_norm=False).count_params() == 9_041_832


def test_bottleneck_node_parameters_by_hand():
    # X(4,0) of the default net: conv 256->512 and 512->512, 3x3, no bias, BN on both.
    model = build_unetpp()
    conv1 = model.get_layer("x4_0_conv1").count_params()
    conv2 = model.get_layer("x4_0_conv2").count_params()
    assert conv1 == 3 * 3 * 256 * 512
    assert conv2 == 3 * 3 * 512 * 512
    assert model.get_layer("x4_0_bn1").count_params() == 4 * 512
    # X(0,4) concatenates X(0,0..3) (4 x 32) and the 32-filter up-sampling: 160 channels in.
    assert model.get_layer("x0_4_conv1").count_params() == 3 * 3 * 160 * 32
    assert model.get_layer("x0_4_up").count_params() == 2 * 2 * 64 * 32 + 32


def test_deep_supervision_heads_are_float32_softmax(tiny, images):
    assert tiny.output_names == head_names(4) == ["head_1", "head_2", "head_3", "head_4"]
    assert head_levels(tiny) == [1, 2, 3, 4]
    outputs = tiny.predict(images, verbose=0)
    assert len(outputs) == 4
    for out in outputs:
        assert out.shape == (2, 32, 32, 2) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_single_output_without_deep_supervision():
    model = build_unetpp(filters=(4, 4, 4), depth=2, deep_supervision=False, num_classes=3)
    assert model.output_names == ["head_2"]
    assert model.output_shape == (None, None, None, 3)


def test_heads_stay_float32_under_mixed_precision(images):
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_unetpp(**TINY)
        assert model.get_layer("x0_0_conv1").compute_dtype == "bfloat16"
        assert model.get_layer("x0_4_logits").compute_dtype == "float32"
        assert [o.dtype for o in model.outputs] == ["float32"] * 4
        out = model.predict(images, verbose=0)
        assert all(o.dtype == np.float32 for o in out)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_bilinear_upsampling_has_no_upsampling_weights():
    trans = build_unetpp(**TINY)
    bilin = build_unetpp(**TINY, upsampling="bilinear")
    up_params = sum(trans.get_layer(f"x{i}_{j}_up").count_params()
                    for j in range(1, 5) for i in range(0, 5 - j))
    # The first conv of each decoder node sees a different channel count (no transposed conv
    # filters, the full lower-level channels instead), so compare only the up-sampling layers.
    assert up_params > 0
    assert all(bilin.get_layer(f"x{i}_{j}_up").count_params() == 0
               for j in range(1, 5) for i in range(0, 5 - j))


def test_regularization_and_dropout_options():
    model = build_unetpp(filters=(4, 4, 4), depth=2, l2=1e-4, dropout=0.2, batch_norm=False)
    assert len(model.losses) == len([l for l in model.layers if hasattr(l, "kernel")])
    assert any(isinstance(l, keras.layers.Dropout) for l in model.layers)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)


@pytest.mark.parametrize(
    ("hw", "depth", "match"),
    [
        ((100, 96), 4, r"height 100 is not a positive multiple of 2\*\*depth = 16 "
                       r"\(nearest valid sizes: 96 or 112\)"),
        ((64, 70), 3, r"width 70 .*nearest valid sizes: 64 or 72"),
        ((0, 32), 4, r"height 0 .* 16 or 16"),
        ((32,), 4, r"expected a \(height, width\) pair"),
    ],
)
def test_check_input_shape_names_nearest_sizes(hw, depth, match):
    with pytest.raises(ValueError, match=match):
        check_input_shape(hw, depth)


def test_check_input_shape_accepts_valid_and_unknown():
    check_input_shape((None, None), 4)
    check_input_shape((256, 48), 4)
    check_input_shape((None, 8), 3)
    assert nearest_valid_sizes(100, 4) == (96, 112)
    assert nearest_valid_sizes(96, 4) == (96, 96)
    assert nearest_valid_sizes(5, 4) == (16, 16)


def test_fixed_input_shape_checked_at_build():
    with pytest.raises(ValueError, match=r"height 100 .* 96 or 112"):
        build_unetpp(**TINY, input_shape_hw=(100, 96))
    model = build_unetpp(**TINY, input_shape_hw=(32, 48))
    assert model.output_shape[0] == (None, 32, 48, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(filters=(4, 8)), r"filters must have depth \+ 1 = 5 values"),
        (dict(upsampling="nearest"), r"upsampling must be one of \('transpose', 'bilinear'\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), found 1.0"),
        (dict(depth=0, filters=(4,)), r"depth must be >= 1, found 0"),
        (dict(num_classes=1), r"num_classes must be >= 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_unetpp(**kwargs)


def test_prune_keeps_only_needed_layers_and_same_output(tiny, images):
    full = tiny.predict(images, verbose=0)
    counts = []
    for level in (1, 3):
        pruned = prune_unetpp(tiny, level)
        counts.append(pruned.count_params())
        assert pruned.name == f"unetpp_L{level}"
        assert pruned.output_names == [f"head_{level}"]
        np.testing.assert_allclose(pruned.predict(images, verbose=0), full[level - 1],
                                   rtol=0, atol=1e-6)
        # Only nodes X(i, j) with i + j <= level survive.
        node_layers = {l.name.split("_conv")[0] for l in pruned.layers if "_conv" in l.name}
        expected = {f"x{i}_{j}" for i in range(5) for j in range(5) if i + j <= level}
        assert node_layers == expected
    assert counts[0] < counts[1] < tiny.count_params()


def test_pruned_model_owns_its_weights(tiny):
    pruned = prune_unetpp(tiny, 1)
    before = tiny.get_layer("x0_0_conv1").get_weights()[0].copy()
    layer = pruned.get_layer("x0_0_conv1")
    layer.set_weights([w + 1.0 for w in layer.get_weights()])
    np.testing.assert_array_equal(tiny.get_layer("x0_0_conv1").get_weights()[0], before)


def test_prune_missing_head_raises(tiny):
    with pytest.raises(ValueError, match=r"has no output 'head_5'; available heads: "
                                         r"\['head_1', 'head_2', 'head_3', 'head_4'\]"):
        prune_unetpp(tiny, 5)


def test_head_levels_rejects_foreign_model():
    inp = keras.Input((8, 8, 1))
    other = keras.Model(inp, keras.layers.Conv2D(2, 1, name="out")(inp))
    with pytest.raises(ValueError, match=r"output 'out' is not a UNet\+\+ head"):
        head_levels(other)


def test_deep_supervision_weights_and_targets():
    assert deep_supervision_weights(4) == [0.25] * 4
    np.testing.assert_allclose(deep_supervision_weights(4, "linear"), [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"scheme must be 'equal' or 'linear', found 'x'"):
        deep_supervision_weights(4, "x")
    x, ys = repeat_targets("img", "mask", 3)
    assert x == "img" and ys == ("mask", "mask", "mask")


def test_config_round_trip_equal(tiny):
    config = tiny.get_config()
    # from_config consumes its argument, so rebuild from a copy.
    rebuilt = keras.Model.from_config(copy.deepcopy(config))
    assert rebuilt.get_config() == config
    assert rebuilt.count_params() == tiny.count_params()


def test_keras_file_round_trip_identical_outputs(tiny, images, tmp_path):
    path = tmp_path / "model.keras"
    tiny.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(tiny.predict(images, verbose=0), loaded.predict(images, verbose=0)):
        np.testing.assert_array_equal(a, b)
    pruned = prune_unetpp(loaded, 3)
    pruned.save(tmp_path / "pruned.keras")
    again = keras.saving.load_model(tmp_path / "pruned.keras")
    np.testing.assert_array_equal(again.predict(images, verbose=0),
                                  tiny.predict(images, verbose=0)[2])


def test_module_exports():
    assert set(unetpp.__all__) <= set(dir(unetpp))
