"""Network registry: specs, the plain U-Net, bundles naming their network, architecture-free inference."""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from medseg.data.plan import Plan
from medseg.errors import InputError
from medseg.infer.bundle import BUNDLE_FILE, load_bundle, save_bundle
from medseg.infer.predictor import Predictor
from medseg.nets import registry
from medseg.nets.registry import Network, NetworkSpec, network_names, recognize_network, register_network
from medseg.nets.unet import build_unet
from medseg.nets.unetpp import build_unetpp

from _helpers import lesion_folders

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
BREAST = DATA / "nrrd" / "breast1_image.nrrd"  # 45 x 120 x 21, MR


def mr_plan(**changes) -> Plan:
    fields = dict(modality="MR", context_slices=3, divisor=1, patch_size=(32, 32), normalization={"kind": "zscore"})
    fields.update(changes)
    return Plan(**fields)


def unet_params(channels: int, filters: list[int], classes: int, batch_norm: bool) -> int:
    """Parameters of a U-Net counted by hand: per 3x3 conv ``9 * in * out`` (+ ``out`` bias
    without BatchNorm, + ``4 * out`` BatchNorm gamma, beta, mean, var with it), a 2x2 transposed
    conv ``4 * in * out + out``, the 1x1 head ``in * classes + classes``."""
    def conv(cin, cout):
        return 9 * cin * cout + (4 * cout if batch_norm else cout)

    total, cin = 0, channels
    for f in filters:  # encoder
        total += conv(cin, f) + conv(f, f)
        cin = f
    for f in reversed(filters[:-1]):  # decoder: up to f, concat with the skip (f + f), two convs
        total += 4 * cin * f + f + conv(2 * f, f) + conv(f, f)
        cin = f
    return total + cin * classes + classes


# --- registry --------------------------------------------------------------------------------------
def test_spec_json_round_trip_and_declarations():
    assert {"unet", "unetpp"} <= set(network_names())
    spec = NetworkSpec("unetpp", {"filters": (4, 8, 16), "depth": 2})
    data = json.loads(json.dumps(spec.to_dict()))
    assert data == {"name": "unetpp", "args": {"filters": [4, 8, 16], "depth": 2, "deep_supervision": True,
                                               "batch_norm": True, "dropout": 0.0, "upsampling": "transpose",
                                               "l2": 0.0}}
    again = NetworkSpec.from_dict(data)
    assert again == spec and hash(again) == hash(spec) and len({spec, again}) == 1
    assert (spec.divisor, spec.output_names, spec.final_output) == (4, ["head_1", "head_2"], "head_2")
    assert spec.loss_weights == [0.5, 0.5]
    single = NetworkSpec("unetpp", {"depth": 3, "deep_supervision": False})
    assert single.args["filters"] == (32, 64, 128, 256)  # the paper's widths cut to the depth
    assert (single.divisor, single.output_names, single.loss_weights) == (8, ["head_3"], [1.0])
    unet = NetworkSpec.from_settings("unet", filters=[4, 8, 16], depth=2, deep_supervision=True, l2=0.0)
    assert "deep_supervision" not in unet.args  # a plain U-Net has no heads to supervise
    assert (unet.divisor, unet.output_names, unet.final_output, unet.loss_weights) == (4, ["head"], "head", [1.0])
    assert NetworkSpec("unet", {"depth": 2}) != NetworkSpec("unetpp", {"depth": 2})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NetworkSpec("resnet"), r"unknown network 'resnet'; registered networks: unet, unetpp"),
        (lambda: NetworkSpec.from_dict({"name": "resnet", "args": {}}), r"unknown network 'resnet'; registered"),
        (lambda: NetworkSpec("unet", {"deep_supervision": True}), r"takes no argument\(s\) deep_supervision"),
        (lambda: NetworkSpec("unet", {"filters": [4, 8], "depth": 2}), r"filters must have depth \+ 1 = 3 values"),
        (lambda: NetworkSpec("unetpp", {"upsampling": "nearest"}), r"upsampling must be one of"),
        (lambda: NetworkSpec("unet", {"l2": float("nan")}), r"args must be JSON values"),
        (lambda: NetworkSpec.from_dict({"name": "unet", "kwargs": {}}), r"a network is \{\"name\": str"),
        (lambda: NetworkSpec("unet", {"depth": 1}).build(1, 2, strategy="x"), r"takes no run argument\(s\) strategy"),
    ],
)
def test_bad_specs_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_register_network_checks_the_entry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class NoOutputs(Network):
        title = "broken"
        builder = staticmethod(build_unet)

        @classmethod
        def divisor(cls, args):
            return 1

    with pytest.raises(TypeError, match=r"network 'broken' \(NoOutputs\) must define output_names"):
        register_network("broken")(NoOutputs)
    with pytest.raises(ValueError, match=r"network name 'unet' is already registered by UNet"):
        register_network("unet")(type("Other", (NoOutputs,), {"output_names": classmethod(lambda c, a: ["x"])}))
    with pytest.raises(ValueError, match=r"lower-case identifiers, found 'U-Net'"):
        register_network("U-Net")


def test_a_network_in_one_file_is_trained_saved_and_run_without_touching_infer(tmp_path, monkeypatch):
    """A third architecture, registered here, goes through save_bundle/load_bundle/Predictor."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def build_pixelwise(input_channels=1, num_classes=2, hidden=4, name="pixelwise", input_shape_hw=(None, None),
                        sync_batch_norm=False):
        x = inputs = keras.Input((*input_shape_hw, input_channels), name="image")
        x = keras.layers.Conv2D(hidden, 1, activation="relu", name="mix")(x)
        out = keras.layers.Conv2D(num_classes, 1, activation="softmax", dtype="float32", name="probs")(x)
        return keras.Model(inputs, out, name=name)

    @register_network("pixelwise")
    class Pixelwise(Network):
        title = "pixel-wise net"
        builder = staticmethod(build_pixelwise)

        @classmethod
        def divisor(cls, args):
            return 1

        @classmethod
        def output_names(cls, args):
            return ["probs"]

    spec = NetworkSpec("pixelwise", {"hidden": 3})
    keras.utils.set_random_seed(0)
    model = spec.build(3, 2)
    save_bundle(tmp_path, model, mr_plan(), network=spec)
    bundle = load_bundle(tmp_path)
    assert bundle.network == spec and bundle.divisor == 1
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(Predictor(bundle).predict_slices(x), model.predict(x, verbose=0)[..., 1], atol=1e-6)


def test_a_user_network_is_found_again_through_its_module(tmp_path, monkeypatch):
    """The bundle's network entry names the user's module; reading it imports that module."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from medseg.nets.registry import Network, register_network

        def build_tiny(input_channels=1, num_classes=2, width=2):
            raise RuntimeError("not built in this test")

        @register_network("tiny")
        class Tiny(Network):
            title = "tiny net"
            builder = staticmethod(build_tiny)

            @classmethod
            def divisor(cls, args):
                return 4

            @classmethod
            def output_names(cls, args):
                return ["probs"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    entry = {"name": "tiny", "module": "my_nets", "args": {"width": 5}}
    spec = NetworkSpec.from_dict(entry)  # "tiny" is unknown until my_nets is imported
    assert spec.divisor == 4 and spec.to_dict() == entry
    with pytest.raises(ValueError, match="module 'nowhere_xyz', which cannot be imported"):
        NetworkSpec.from_dict({"name": "other", "module": "nowhere_xyz", "args": {}})


# --- the plain U-Net -------------------------------------------------------------------------------
def test_unet_parameters_by_hand_and_softmax_output():
    assert build_unet().count_params() == unet_params(1, [32, 64, 128, 256, 512], 2, batch_norm=True) == 7_768_386
    keras.utils.set_random_seed(0)
    model = build_unet(input_channels=3, num_classes=3, filters=(4, 8, 16), depth=2, batch_norm=False)
    assert model.count_params() == unet_params(3, [4, 8, 16], 3, batch_norm=False)
    assert model.output_names == NetworkSpec("unet", {"depth": 2}).output_names == ["head"]
    x = np.random.default_rng(1).normal(size=(2, 32, 48, 3)).astype(np.float32)
    out = model.predict(x, verbose=0)
    assert out.shape == (2, 32, 48, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert (out > 0).all()


def test_unet_head_stays_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_unet(filters=(4, 8), depth=1)
        assert model.get_layer("enc0_conv1").compute_dtype == "bfloat16"
        assert model.get_layer("logits").compute_dtype == "float32"
        assert model.outputs[0].dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


def test_divisor_is_the_smallest_size_the_unet_accepts():
    spec = NetworkSpec("unet", {"filters": [2, 2, 2, 2], "depth": 3, "batch_norm": False})
    d = spec.divisor
    assert d == 8
    for size in range(1, d):
        with pytest.raises(ValueError, match=rf"height {size} is not a positive multiple of 2\*\*depth = 8"):
            spec.build(1, 2, input_shape_hw=(size, d))
    assert spec.build(1, 2, input_shape_hw=(d, d)).output_shape == (None, d, d, 2)
    # Any-size model: a multiple of the divisor runs, a size halving fewer than depth times does not.
    model = spec.build(1, 2)
    assert model.predict(np.zeros((1, 2 * d, d, 1), np.float32), verbose=0).shape == (1, 2 * d, d, 2)
    with pytest.raises(Exception):
        model.predict(np.zeros((1, d + d // 2, d, 1), np.float32), verbose=0)


def test_unet_round_trips_through_keras_files(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_unet(input_channels=2, filters=(4, 8, 8), depth=2, upsampling="bilinear", dropout=0.1, l2=1e-4)
    config = model.get_config()
    assert keras.Model.from_config(copy.deepcopy(config)).get_config() == config
    model.save(tmp_path / "unet.keras")
    loaded = keras.saving.load_model(tmp_path / "unet.keras")
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.output_names == ["head"]


# --- UNet++ after splitting build_unetpp -------------------------------------------------------------
def test_unetpp_is_the_same_network_as_before_the_split():
    # Measured on build_unetpp before it was split into helpers: parameters and layer counts.
    assert (build_unetpp().count_params(), len(build_unetpp().layers)) == (9_052_776, 123)
    other = build_unetpp(upsampling="bilinear", batch_norm=False, deep_supervision=False)
    assert (other.count_params(), len(other.layers)) == (9_155_490, 87)
    tiny = build_unetpp(filters=(4, 8, 16), depth=2, dropout=0.1, l2=1e-4, input_channels=3, num_classes=3)
    assert (tiny.count_params(), len(tiny.layers)) == (8_474, 61)


def test_no_function_of_the_nets_is_longer_than_80_lines():
    import medseg.nets.blocks
    import medseg.nets.unet
    import medseg.nets.unetpp

    long = []
    for module in (registry, medseg.nets.blocks, medseg.nets.unet, medseg.nets.unetpp):
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                if len(inspect.getsourcelines(obj)[0]) > 80:
                    long.append(f"{module.__name__}.{name}")
    assert long == []


def test_legacy_recognition_reads_the_unetpp_arguments_back():
    for args in ({"filters": [4, 8, 16], "depth": 2},
                 {"filters": [2, 4], "depth": 1, "deep_supervision": False, "batch_norm": False, "l2": 0.5},
                 {"filters": [2, 2, 4, 4], "depth": 3, "upsampling": "bilinear", "dropout": 0.25}):
        spec = NetworkSpec("unetpp", args)
        assert recognize_network(spec.build(2, 2)) == spec
    # No network recognizes a U-Net (it never had bundles without a network key) or a user's model.
    assert recognize_network(build_unet(filters=(2, 2), depth=1)) is None
    inp = keras.Input((8, 8, 1))
    assert recognize_network(keras.Model(inp, keras.layers.Conv2D(2, 1, name="out")(inp))) is None


# --- bundles and inference ----------------------------------------------------------------------------
def test_old_bundle_without_network_key_loads_and_predicts_the_same(tmp_path):
    from medseg.io import read_volume

    spec = NetworkSpec("unetpp", {"filters": [4, 8, 16], "depth": 2, "batch_norm": False})
    keras.utils.set_random_seed(4)
    model = spec.build(3, 2)
    image = read_volume(BREAST)
    for head_level in (None, 1):
        run = tmp_path / f"head{head_level}"
        save_bundle(run, model, mr_plan(divisor=2), network=spec, head_level=head_level)
        new = load_bundle(run)
        assert new.network == spec and new.divisor == 4
        expected = np.asarray(Predictor(new).predict_proba(image).array)
        info = json.loads((run / BUNDLE_FILE).read_text())
        assert info["network"] == spec.to_dict()
        del info["network"]  # as written before the key existed; model.keras and its SHA-256 untouched
        (run / BUNDLE_FILE).write_text(json.dumps(info, indent=2))
        old = load_bundle(run)
        assert old.network == spec and old.divisor == 4 and old.head_level == head_level
        predictor = Predictor(old)
        assert predictor.model.output_names == [f"head_{head_level or 2}"]
        np.testing.assert_array_equal(np.asarray(predictor.predict_proba(image).array), expected)


def test_bundle_network_errors(tmp_path):
    spec = NetworkSpec("unet", {"filters": [2, 4], "depth": 1})
    model = spec.build(3, 2)
    with pytest.raises(ValueError, match=r"has outputs \['head'\], but network 'unetpp'"):
        save_bundle(tmp_path / "a", model, mr_plan(), network=NetworkSpec("unetpp", {"filters": [2, 4], "depth": 1}))
    save_bundle(tmp_path / "b", model, mr_plan(), network=spec, head_level=2)
    with pytest.raises(InputError, match=r"expected a U-Net with head 2 \(bundle head_level\), found a U-Net has no "
                                         r"deep-supervision heads"):
        Predictor(load_bundle(tmp_path / "b"))
    info = json.loads((tmp_path / "b" / BUNDLE_FILE).read_text())
    info["network"] = {"name": "resnet", "args": {}}
    (tmp_path / "b" / BUNDLE_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"bundle.json: expected valid bundle settings, found unknown network "
                                         r"'resnet'; registered networks: unet, unetpp"):
        load_bundle(tmp_path / "b")
    info["network"] = {"name": "unetpp", "args": {"filters": [2, 4], "depth": 1}}  # not the model saved
    (tmp_path / "b" / BUNDLE_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"expected the model of network 'unetpp' \(bundle.json\), found model "
                                         r"'unet' has outputs \['head'\]"):
        load_bundle(tmp_path / "b")
    # A hand-edited divisor cannot make the slices too small for the declared network (2**depth).
    info.update(network=spec.to_dict(), divisor=1)
    (tmp_path / "b" / BUNDLE_FILE).write_text(json.dumps(info))
    assert load_bundle(tmp_path / "b").divisor == 2


def test_infer_has_no_architecture_specific_code():
    """medseg/infer/ reaches networks only through the registry: no network name, no builder
    module, no layer-name parsing and no private Keras attributes in its code (docstrings and
    comments may name them)."""
    words = {"unet"} | set(network_names()) | {registry.get_network(n).title.lower() for n in network_names()}
    problems = []
    for path in sorted((REPO / "medseg" / "infer").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            texts = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                texts.append(node.value)
            elif isinstance(node, ast.Name):
                texts.append(node.id)
            elif isinstance(node, ast.Attribute):
                texts.append(node.attr)
                if node.attr.startswith("_keras") or node.attr in ("layers", "get_layer"):
                    problems.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                texts += [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            elif isinstance(node, (ast.FunctionDef, ast.arg)):
                texts.append(getattr(node, "name", None) or node.arg)
            problems += [f"{path.name}:{node.lineno}: {t!r}" for t in texts
                         if any(w in t.lower() for w in words)]
    assert problems == []


@pytest.mark.slow
def test_medseg_train_network_unet_bundle_segments_on_the_input_grid(tmp_path):
    """The real entry point trains a tiny U-Net; its bundle names it and medseg-infer uses it."""
    from medseg.cli.infer import main as infer_main
    from medseg.cli.train import main as train_main
    from medseg.io import read_volume

    images, labels = lesion_folders(tmp_path / "data")
    run = tmp_path / "run"
    assert train_main(["--images", str(images), "--labels", str(labels), "--run-dir", str(run), "--network", "unet",
                       "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--filters", "4", "8", "16",
                       "--depth", "2", "--patch-size", "32", "32", "--precision", "float32", "--verbose", "0",
                       "--run-eagerly"]) == 0
    info = json.loads((run / BUNDLE_FILE).read_text())
    assert info["network"] == {"name": "unet", "args": {"filters": [4, 8, 16], "depth": 2, "batch_norm": True,
                                                        "dropout": 0.0, "upsampling": "transpose", "l2": 0.0}}
    assert json.loads((run / "config.json").read_text())["network"] == "unet"
    bundle = load_bundle(run)
    assert bundle.network.name == "unet" and bundle.model.output_names == ["head"] and bundle.divisor % 4 == 0
    assert Predictor(bundle).model is bundle.model  # one output: run as saved

    out = tmp_path / "seg.nii.gz"
    source = images / "brain1.nrrd"
    assert infer_main([str(source), "--model", str(run), "-o", str(out)]) == 0
    image, mask = read_volume(source), read_volume(out)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    assert set(np.unique(mask.array)) <= {0, 1}


def test_config_and_command_line_name_the_network(tmp_path):
    from medseg.cli.train import build_parser, config_from_args
    from medseg.train.config import TrainConfig

    cfg = config_from_args(build_parser().parse_args(["--images", "i", "--labels", "l", "--network", "unet"]))
    assert cfg.network == "unet" and TrainConfig().network == "unetpp"
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())).network == "unet"
    with pytest.raises(InputError, match=r"expected network to be one of unet, unetpp \(registered networks\), "
                                         r"found 'resnet'"):
        TrainConfig(network="resnet").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--network", "resnet"])


def test_cpu_sizing_times_the_configured_network(monkeypatch):
    import medseg.nets.unet as unet_module
    from medseg.train.config import TrainConfig
    from medseg.train.sizing import time_steps

    built = []

    @functools.wraps(build_unet)
    def spy(*args, **kwargs):
        model = build_unet(*args, **kwargs)
        built.append((model.name, kwargs["filters"], kwargs["depth"]))
        return model

    monkeypatch.setattr(unet_module.UNet, "builder", staticmethod(spy))
    cfg = TrainConfig(network="unet", batch_size=2, run_eagerly=True, precision="float32")
    import keras

    before = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_bfloat16")  # the caller's own setting
    try:
        step_s = time_steps(cfg, mr_plan(divisor=4), (4, 8, 16), 2, precision="float32", steps=1)
        # The probe left the caller's Keras settings alone (keras.backend.clear_session would not).
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy(before)
    assert step_s > 0
    assert built == [("unet", (4, 8, 16), 2)]
