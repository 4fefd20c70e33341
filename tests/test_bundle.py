"""Model bundle: save/load round trip, atomic writes, clear errors naming the broken file."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.data.plan import Plan
from medseg.errors import InputError
from medseg.infer.bundle import BUNDLE_FILE, MODEL_FILE, load_bundle, read_bundle_info, save_bundle
from medseg.nets.registry import recognize_network
from medseg.nets.unetpp import build_unetpp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tiny_unetpp(channels: int = 3, deep_supervision: bool = True) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_unetpp(input_channels=channels, filters=(4, 8, 16), depth=2, deep_supervision=deep_supervision)


def mr_plan(**changes) -> Plan:
    fields = dict(modality="MR", context_slices=3, divisor=4, patch_size=(32, 32), normalization={"kind": "zscore"})
    fields.update(changes)
    return Plan(**fields)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return tiny_unetpp()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, model) -> Path:
    run = tmp_path_factory.mktemp("run")
    save_bundle(run, model, mr_plan(), threshold=0.4, head_level=2, extra={"val_dsc": 0.5, "epochs": 3})
    return run


def test_round_trip_records_everything(saved_run, model):
    info = json.loads((saved_run / BUNDLE_FILE).read_text())
    assert info["format"] == "medseg-bundle" and info["format_version"] == 2
    assert Plan.from_dict(info["plan"]).to_dict() == mr_plan().to_dict()
    assert info["classes"] == ["background", "lesion"]
    assert info["threshold"] == 0.4 and info["head_level"] == 2
    assert info["divisor"] == 4 and info["input_channels"] == 3
    assert info["versions"] == {
        "medseg": __import__("medseg").__version__, "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__,
    }
    created = dt.datetime.fromisoformat(info["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    assert info["extra"] == {"val_dsc": 0.5, "epochs": 3}
    # Format 2's typed fields: nothing chosen or recorded here, a complete run.
    assert (info["status"], info["postprocessing"], info["selection"], info["validation"], info["training"]) == (
        "complete", None, None, None, None)

    bundle = load_bundle(saved_run)
    assert bundle.run_dir == saved_run and bundle.model_path == saved_run / MODEL_FILE
    assert bundle.plan.to_dict() == mr_plan().to_dict()
    assert (bundle.threshold, bundle.head_level, bundle.divisor, bundle.input_channels) == (0.4, 2, 4, 3)
    assert bundle.classes == ("background", "lesion")
    x = np.random.default_rng(0).normal(size=(2, 16, 20, 3)).astype(np.float32)
    for before, after in zip(model.predict(x, verbose=0), bundle.model.predict(x, verbose=0)):
        np.testing.assert_allclose(after, before, atol=1e-6)
    # bundle.json itself is accepted too, and read_bundle_info needs no model
    assert load_bundle(saved_run / BUNDLE_FILE).run_dir == saved_run
    assert read_bundle_info(saved_run)["threshold"] == 0.4


def test_divisor_is_the_networks_multiple_even_if_the_plan_says_less(tmp_path, model):
    assert recognize_network(model).divisor == 4  # depth 2
    save_bundle(tmp_path, model, mr_plan(divisor=2, patch_size=(32, 32)))
    assert json.loads((tmp_path / BUNDLE_FILE).read_text())["divisor"] == 4


def test_save_replaces_old_bundle_and_leaves_no_temp_files(tmp_path, model):
    save_bundle(tmp_path, model, mr_plan(), threshold=0.5)
    save_bundle(tmp_path, model, mr_plan(), threshold=0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BUNDLE_FILE, MODEL_FILE]
    assert load_bundle(tmp_path).threshold == 0.7


def test_failed_save_keeps_the_previous_bundle(tmp_path, model, monkeypatch):
    save_bundle(tmp_path, model, mr_plan(), threshold=0.3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half a zip")  # a partial file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(tmp_path, model, mr_plan(), threshold=0.9)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": ("background",)}, "at least two non-empty names"),
        ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\]"),
        ({"head_level": 0}, "head_level must be None or an integer >= 1"),
        ({"extra": {"bad": object()}}, "extra must be JSON-serializable"),
        ({"classes": ("background", "lesion", "edema")}, "outputs 2 classes but 3 class names"),
    ],
)
def test_save_rejects_bad_settings(tmp_path, model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_bundle(tmp_path, model, mr_plan(), **kwargs)
    assert not (tmp_path / BUNDLE_FILE).exists()


def test_save_rejects_a_model_without_defined_channels(tmp_path):
    inputs = keras.Input((None, None, None))
    model = keras.Model(inputs, keras.layers.Activation("softmax")(inputs))
    with pytest.raises(ValueError, match="has an undefined channel dimension in its input shape"):
        save_bundle(tmp_path, model, mr_plan())


def test_save_rejects_model_plan_channel_mismatch(tmp_path, model):
    with pytest.raises(ValueError, match="takes 3 input channels but the plan has context_slices=5"):
        save_bundle(tmp_path, model, mr_plan(context_slices=5))


def _corrupt(run: Path, what: str) -> Path:
    info_path, model_path = run / BUNDLE_FILE, run / MODEL_FILE
    info = json.loads(info_path.read_text())
    if what == "no_json":
        info_path.unlink()
        return info_path
    if what == "no_model":
        model_path.unlink()
        return model_path
    if what == "bad_json":
        info_path.write_text('{"format": "medseg-bundle", "plan": {')
    elif what == "not_a_bundle":
        info_path.write_text('{"format": "something else"}')
    elif what == "missing_keys":
        del info["threshold"], info["divisor"]
        info_path.write_text(json.dumps(info))
    elif what == "newer_format":
        info["format_version"] = 99
        info_path.write_text(json.dumps(info))
    elif what == "bad_plan":
        info["plan"]["context_slices"] = 2
        info_path.write_text(json.dumps(info))
    elif what == "bad_threshold":
        info["threshold"] = "high"
        info_path.write_text(json.dumps(info))
    elif what == "bad_model":
        model_path.write_bytes(b"PK\x03\x04 truncated zip")
        return model_path
    elif what == "channels":
        info["input_channels"] = 5
        info_path.write_text(json.dumps(info))
        return model_path
    elif what == "classes":
        info["classes"] = ["background", "lesion", "edema"]
        info_path.write_text(json.dumps(info))
    elif what == "bad_divisor":
        info["divisor"] = 0
        info_path.write_text(json.dumps(info))
    elif what == "bad_channels":
        info["input_channels"] = "three"
        info_path.write_text(json.dumps(info))
    elif what == "plan_context":
        info["plan"]["context_slices"] = 5
        info_path.write_text(json.dumps(info))
    return info_path


@pytest.mark.parametrize(
    "what, match",
    [
        ("no_json", "expected the bundle description written by medseg-train.*found no such file"),
        ("no_model", "expected the Keras model of the bundle, found no such file"),
        ("bad_json", "expected a JSON bundle description, found unreadable content"),
        ("not_a_bundle", "expected a JSON object with format 'medseg-bundle', found format 'something else'"),
        ("missing_keys", "found threshold, divisor missing"),
        ("newer_format", "expected bundle format_version <= 2, found 99"),
        ("bad_plan", "expected a valid preprocessing plan.*context_slices must be a positive odd integer"),
        ("bad_threshold", r"threshold must be a number in \[0, 1\], found 'high'"),
        ("bad_model", r"expected a Keras 3 model file \(.keras zip\)"),
        ("channels", "expected a model taking 5 input channels .bundle.json., found 3 channels"),
        ("classes", "expected 2 class names .the model's output channels., found 3"),
        ("bad_divisor", "divisor must be a positive integer, found 0"),
        ("bad_channels", "input_channels must be a positive integer, found 'three'"),
        ("plan_context", "expected plan.context_slices equal to the model's 3 input channels, found context_slices=5"),
    ],
)
def test_load_errors_name_the_file(tmp_path, model, what, match):
    save_bundle(tmp_path, model, mr_plan())
    broken = _corrupt(tmp_path, what)
    with pytest.raises(InputError, match=match) as info:
        load_bundle(tmp_path)
    assert info.value.path == str(broken)


def test_load_errors_for_missing_or_non_folder(tmp_path):
    with pytest.raises(InputError, match="expected a run folder holding model.keras and bundle.json, found nothing"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="found a file"):
        load_bundle(tmp_path / "file.txt")


def test_changed_model_file_is_refused_unless_accepted(tmp_path, model, caplog):
    save_bundle(tmp_path, model, mr_plan())
    recorded = json.loads((tmp_path / BUNDLE_FILE).read_text())["model_sha256"]
    other = tiny_unetpp()
    other.set_weights([w + 1.0 for w in other.get_weights()])  # other weights: the file must differ
    other.save(tmp_path / MODEL_FILE)  # replaced behind bundle.json's back
    found = hashlib.sha256((tmp_path / MODEL_FILE).read_bytes()).hexdigest()
    with pytest.raises(InputError) as info:
        load_bundle(tmp_path)
    assert info.value.path == str(tmp_path / MODEL_FILE)
    message = str(info.value)
    assert f"expected the model recorded in {tmp_path / BUNDLE_FILE} (SHA-256 {recorded[:12]}...)" in message
    assert f"found another file (SHA-256 {found[:12]}...)" in message and "--accept-modified-model" in message
    with caplog.at_level("WARNING", logger="medseg"):
        bundle = load_bundle(tmp_path, accept_modified=True)
    assert f"SHA-256 {found[:12]}... instead of {recorded[:12]}..." in caplog.text and "used anyway" in caplog.text
    np.testing.assert_array_equal(bundle.model.get_weights()[0], other.get_weights()[0])


@pytest.mark.parametrize("damage", ["truncated", "random", "flipped_byte"])
def test_corrupt_model_file_is_named_corrupt_not_missing(tmp_path, model, damage):
    save_bundle(tmp_path, model, mr_plan())
    path = tmp_path / MODEL_FILE
    data = path.read_bytes()
    if damage == "truncated":  # an interrupted copy
        path.write_bytes(data[: len(data) // 2])
        found = f"a corrupt or truncated file (not a zip archive, {len(data) // 2} bytes)"
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        found = "a corrupt or truncated file (not a zip archive, 4096 bytes)"
    else:  # one bit of the weights flipped: the zip still opens, a member's CRC fails
        member = data.index(b"model.weights.h5")
        damaged = bytearray(data)
        damaged[member + 2000] ^= 0xFF
        path.write_bytes(bytes(damaged))
        found = "a corrupt zip archive (damaged member"
    for accept in (False, True):  # --accept-modified-model never makes a damaged file loadable
        with pytest.raises(InputError) as info:
            load_bundle(tmp_path, accept_modified=accept)
        assert info.value.path == str(path)
        assert f"expected a Keras 3 model file (.keras zip), found {found}" in str(info.value)
        assert "not found" not in str(info.value).lower()


def test_import_has_no_side_effects():
    code = (
        "import sys; import medseg.infer, medseg.infer.bundle, medseg.infer.predictor, medseg.infer.postprocess;"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
