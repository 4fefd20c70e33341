"""A model's pipeline: serializable dictionary transforms that train and infer, a user's own step.

Independent answers: the CT window and z-score written out in numpy on the resampled stack, the
input's own geometry for the inverse, and a user transform that counts its calls.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from medseg.data.plan import Plan
from medseg.io.volume import Volume
from medseg.transforms.base import Randomizable
from medseg.transforms.pipeline import Pipeline
from medseg.transforms.preprocess import plan_space_image
from medseg.transforms.registry import (register_transform, registered_transforms, transform_config,
                                       transform_from_config)

REPO = Path(__file__).resolve().parents[1]

USER_MODULE = '''
"""A user's own step, in one file (docs/pipeline.md)."""
import numpy as np

from medseg.transforms import MapTransform, register_transform

CALLS = {"n": 0}


@register_transform
class ClipStackd(MapTransform):
    """Clip normalized intensities to [low, high]."""

    slice_local = True

    def __init__(self, keys="image", low=-3.0, high=3.0, allow_missing_keys=True):
        super().__init__(keys, allow_missing_keys)
        self.low, self.high = float(low), float(high)

    def apply(self, value, key):
        CALLS["n"] += 1
        return value.with_array(np.clip(value.array, self.low, self.high).astype(np.float32))
'''


def ct_plan(**kw) -> Plan:
    fields = dict(modality="CT", normalization={"kind": "ct_window", "low_hu": -200.0, "high_hu": 300.0},
                  target_spacing_mm=(1.0, 1.0), patch_size=(32, 32), divisor=16, context_slices=3)
    fields.update(kw)
    return Plan(**fields)


def ct_volume(shape=(40, 36, 12), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    affine = np.array([[0, -0.8, 0, 10.0], [0.7, 0, 0, -5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    return Volume(rng.normal(0, 400, shape).astype(np.int16), affine, "ct1")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usermods"
    folder.mkdir()
    (folder / "my_transforms.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("my_transforms", None)
    yield folder
    sys.modules.pop("my_transforms", None)


def test_every_builtin_transform_round_trips_through_its_config():
    plan = ct_plan()
    built = {type(t).__name__: t for t in Pipeline.from_plan(plan).transforms}
    from medseg.transforms import dictionary as d

    built.update(CTWindowd=d.CTWindowd("image", -100, 200), ZScored=d.ZScored("image", (1, 99)),
                 PercentileClipd=d.PercentileClipd("image", 2, 98),
                 RandEnhancementd=d.RandEnhancementd(window_hu=(-200, 300), classes=[1], num_classes=2))
    names = set(registered_transforms())
    assert names >= set(built), names ^ set(built)
    for name, t in built.items():
        entry = transform_config(t)
        assert entry["name"] == name and entry["module"] == "medseg.transforms.dictionary"
        again = transform_from_config(json.loads(json.dumps(entry)))
        assert type(again) is type(t) and transform_config(again) == entry


def test_pipeline_from_plan_is_the_documented_steps_and_json_round_trips():
    pipeline = Pipeline.from_plan(ct_plan())
    assert repr(pipeline) == ("Pipeline([LabelClassesd, PlanSpaced, BodyMaskd, NormalizeIntensityd, ContextSlicesd, "
                              "RandLesionPatchd, RandJointAugmentd])")
    assert [type(t).__name__ for t in pipeline.random] == ["RandLesionPatchd", "RandJointAugmentd"]
    config = json.loads(json.dumps(pipeline.to_config()))
    again = Pipeline.from_config(config)
    assert again.to_config() == config
    vol = ct_volume()
    a, b = pipeline.prepare(vol), again.prepare(vol)
    np.testing.assert_array_equal(a.array, b.array)
    assert Pipeline.from_plan(ct_plan(), augment=False).random[-1].__class__.__name__ == "RandLesionPatchd"


def test_prepare_equals_hand_written_window_and_restore_is_exact():
    plan = ct_plan()
    vol = ct_volume()
    prepared = Pipeline.from_plan(plan).prepare(vol)
    raw = plan_space_image(vol, plan.orientation, plan.slice_axis, plan.target_spacing_mm).array
    expected = (np.clip(raw, -200, 300) + 200) / 500  # the CT window by hand
    np.testing.assert_allclose(prepared.array, expected, atol=1e-6)
    assert prepared.context_slices == 3 and prepared.body is None
    back = Pipeline.from_plan(plan).restore(prepared, np.ones(prepared.array.shape, np.float32))
    assert back.shape == vol.shape and np.array_equal(back.affine, vol.affine) and back.case_id == "ct1"
    np.testing.assert_allclose(back.array, 1.0, atol=1e-6)


def test_mr_zscore_pipeline_is_not_chunkable_and_ct_is():
    assert Pipeline.from_plan(ct_plan()).chunkable
    mr = Pipeline.from_plan(ct_plan(modality="MR", normalization={"kind": "zscore"}))
    assert not mr.chunkable
    # background(): the raw minimum through the value steps = the window's low end -> 0.
    assert Pipeline.from_plan(ct_plan()).background(-1024.0) == 0.0
    assert Pipeline.from_plan(ct_plan()).background(50.0) == pytest.approx(0.5)


def test_order_and_serializability_errors_are_clear():
    from medseg.transforms.base import Lambdad
    from medseg.transforms.dictionary import ContextSlicesd, RandJointAugmentd, RandLesionPatchd

    with pytest.raises(ValueError, match="deterministic transforms must come before the random ones"):
        Pipeline([RandJointAugmentd(), ContextSlicesd()])
    with pytest.raises(TypeError, match="not a registered transform"):
        Pipeline([Lambdad("image", abs)]).to_config()
    with pytest.raises(ValueError, match=r"so it comes first; found \['RandJointAugmentd'\] before it"):
        Pipeline([RandJointAugmentd(), RandLesionPatchd()])
    with pytest.raises(ValueError, match="unknown transform 'Nope'"):
        transform_from_config({"name": "Nope", "args": {}})
    with pytest.raises(ValueError, match="module 'no_such_module_xyz', which cannot be imported"):
        transform_from_config({"name": "Nope2", "module": "no_such_module_xyz", "args": {}})
    with pytest.raises(ValueError, match="no step named 'Missing'"):
        Pipeline.from_plan(ct_plan(), extra=[{"name": "ContextSlicesd", "args": {}, "after": "Missing"}])


def test_user_transform_is_placed_saved_and_rebuilt_from_its_module(user_module):
    entry = {"name": "ClipStackd", "module": "my_transforms", "args": {"low": 0.1, "high": 0.9},
             "after": "NormalizeIntensityd"}
    pipeline = Pipeline.from_plan(ct_plan(), extra=[entry])
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names.index("ClipStackd") == names.index("NormalizeIntensityd") + 1
    prepared = pipeline.prepare(ct_volume())
    assert prepared.array.min() >= 0.1 and prepared.array.max() <= 0.9
    config = pipeline.to_config()
    assert {"name": "ClipStackd", "module": "my_transforms",
            "args": {"keys": ["image"], "low": 0.1, "high": 0.9, "allow_missing_keys": True}} in config["transforms"]
    assert pipeline.chunkable  # the user's step declares itself slice-local
    # A fresh interpreter imports the module named in the entry to rebuild the step.
    code = textwrap.dedent(f"""
        import json, sys
        from medseg.transforms.pipeline import Pipeline
        p = Pipeline.from_config(json.loads({json.dumps(json.dumps(config))}))
        print(type(p.transforms[4]).__module__, "my_transforms" in sys.modules)
    """)
    env_path = f"{user_module}:{REPO}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["my_transforms", "True"]


@pytest.mark.slow
def test_user_transform_trains_is_bundled_shown_and_runs_at_inference(tmp_path, user_module, capsys):
    """The config file adds the step; training runs it per case, the bundle keeps it, medseg-info
    shows it, and the Predictor (medseg-infer's engine) runs it on a new image."""
    from _helpers import lesion_folders

    import my_transforms
    from medseg.cli.info import main as info_main
    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor
    from medseg.io import read_volume
    from medseg.train import train

    images, labels = lesion_folders(tmp_path)
    entry = {"name": "ClipStackd", "module": "my_transforms", "args": {"low": -2.5, "high": 2.5},
             "after": "NormalizeIntensityd"}
    run = tmp_path / "run"
    train(dict(images=str(images), labels=str(labels), run_dir=str(run), filters=[4, 8], depth=1,
               patch_size=[32, 32], batch_size=2, steps_per_epoch=2, epochs=1, verbose=0, precision="float32",
               run_eagerly=True, val_fraction=0.5, transforms=[entry]))
    assert my_transforms.CALLS["n"] >= 2  # each training case went through it (plus validation)
    saved = json.loads((run / "bundle.json").read_text())["pipeline"]["transforms"]
    assert [e["name"] for e in saved].index("ClipStackd") == 4 and saved[4]["module"] == "my_transforms"
    assert info_main([str(run)]) == 0
    shown = capsys.readouterr().out
    assert "5. ClipStackd(keys=['image'], low=-2.5, high=2.5" in shown and "[training + inference]" in shown
    assert "RandLesionPatchd" in shown and "[random, training]" in shown
    before = my_transforms.CALLS["n"]
    bundle = load_bundle(run)
    assert [type(t).__name__ for t in bundle.pipeline.transforms][4] == "ClipStackd"
    vol = read_volume(images / "brain1.nrrd")
    prob = Predictor(bundle).predict_proba(vol)
    assert my_transforms.CALLS["n"] > before
    assert prob.shape == vol.shape and np.array_equal(prob.affine, vol.affine)


def test_old_bundle_without_pipeline_gets_the_plan_pipeline(tmp_path):
    """A bundle written before pipelines were saved predicts exactly as one with the saved pipeline."""
    from _helpers import tiny_bundle

    from medseg.infer.bundle import load_bundle
    from medseg.infer.predictor import Predictor

    run = tiny_bundle(tmp_path / "run")
    vol = ct_volume(shape=(20, 24, 6)).with_array(np.random.default_rng(1).normal(300, 50, (20, 24, 6)))
    with_pipeline = Predictor(load_bundle(run)).predict_proba(vol).array
    info = json.loads((run / "bundle.json").read_text())
    assert info["pipeline"]["transforms"][1]["name"] == "PlanSpaced"
    del info["pipeline"]
    (run / "bundle.json").write_text(json.dumps(info))
    old = load_bundle(run)
    assert old.pipeline is None
    np.testing.assert_array_equal(Predictor(old).predict_proba(vol).array, with_pipeline)


def test_show_pipeline_and_info_json(tmp_path, capsys):
    from _helpers import tiny_bundle

    from medseg.cli.info import main as info_main
    from medseg.cli.infer import main as infer_main

    run = tiny_bundle(tmp_path / "run")
    assert infer_main(["--show-pipeline", "--model", str(run)]) == 0
    text = capsys.readouterr().out
    assert "2. PlanSpaced(" in text and "inverted onto the input grid at inference" in text
    assert info_main([str(run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["classes"] == ["background", "lesion"] and d["pipeline"][0].startswith("1. LabelClassesd(")
    assert info_main([str(tmp_path / "nothing")]) == 2
    assert "medseg-info: error:" in capsys.readouterr().err


# --- a user's random step runs where its before/after puts it ---------------------------------
SEEN: list = []


@register_transform
class ChecksumStepd(Randomizable):
    """Records a digest of the patches it is given (and the batch generator's next draw)."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def get_config(self) -> dict:
        return {}

    def __call__(self, sample):
        SEEN.append((_digest(sample["image"], sample["label"]), float(self.rng.random())))
        return dict(sample)  # a new mapping, as a user's step usually returns


def _digest(images, masks) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes()
                          + np.ascontiguousarray(masks, np.uint8).tobytes()).hexdigest()


def _small_cache(plan):
    from medseg.data.cache import VolumeCache

    rng = np.random.default_rng(3)
    arrays = []
    for i in range(2):
        image = rng.random((6, 40, 40), dtype=np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[2:4, 10:18, 12:20] = 1
        arrays.append((f"c{i}", image, label))
    return VolumeCache.from_arrays(arrays, plan, body_threshold=0.2)


def test_a_users_random_step_placed_before_the_augmentation_sees_unaugmented_patches():
    from medseg.data.pipeline import BatchMaker

    plan = ct_plan(target_spacing_mm=None)
    cache = _small_cache(plan)
    entry = {"name": "ChecksumStepd", "module": __name__, "args": {}, "before": "RandJointAugmentd"}
    early = Pipeline.from_plan(plan, extra=[entry])
    assert [type(t).__name__ for t in early.random] == ["RandLesionPatchd", "ChecksumStepd", "RandJointAugmentd"]
    late = Pipeline.from_plan(plan, extra=[{k: v for k, v in entry.items() if k != "before"}])
    assert [type(t).__name__ for t in late.random] == ["RandLesionPatchd", "RandJointAugmentd", "ChecksumStepd"]
    plain = BatchMaker(cache, plan, batch_size=4, seed=8, augment=False)       # the patches, unaugmented
    augmented = BatchMaker(cache, plan, batch_size=4, seed=8)                  # the default pipeline
    for index in (0, 1):
        SEEN.clear()
        early_out = BatchMaker(cache, plan, batch_size=4, seed=8, pipeline=early).batch_uint8(index)
        late_out = BatchMaker(cache, plan, batch_size=4, seed=8, pipeline=late).batch_uint8(index)
        unaugmented = plain.batch_uint8(index)
        final = augmented.batch_uint8(index)
        assert SEEN[0][0] == _digest(*unaugmented)            # before: what the sampler cut, nothing else
        assert SEEN[1][0] == _digest(*final) == _digest(*late_out)  # after: the augmented batch, unchanged by it
        assert _digest(*early_out) != _digest(*unaugmented)    # the augmentation still ran, after it
        # the step draws from the batch's own generator: right after the centres, or after the augmentation
        rng = np.random.default_rng([8, index])
        plain.sampler.draw(4, rng)
        assert SEEN[0][1] == rng.random()
    # spatial augmentation of ready patches: joint (an image equal to its mask stays equal), shapes kept
    from medseg.transforms.augment import AugmentConfig

    SEEN.clear()
    equal = ct_plan(target_spacing_mm=None, context_slices=1)
    cache = _small_cache(equal)
    for source in cache.sources:
        source.image[...] = source.label
    images, masks = BatchMaker(cache, equal, batch_size=6, seed=2,
                               pipeline=Pipeline.from_plan(equal, augment=AugmentConfig().spatial_only(),
                                                           extra=[entry])).batch_uint8(0)
    assert images.shape == (6, 32, 32, 1) and masks.shape == (6, 32, 32)
    np.testing.assert_array_equal(images[..., 0] > 0.5, masks > 0)


def test_label_kind_is_an_object_and_saved_by_name():
    """Pipeline.label_kind answers with a LabelKind; the saved config keeps the name (old bundles load)."""
    from medseg.io.classes import BINARY, BITS, CLASSES, ClassSpec

    assert Pipeline.from_plan(ct_plan()).label_kind is BINARY
    organs = ClassSpec.parse(["liver=5", "aorta=52"])
    classes = Pipeline.from_plan(ct_plan(classes=organs.to_dict(), num_classes=3))
    regions = ClassSpec.from_dict({"names": ["whole", "core"], "ids": [[5, 52], [52]], "regions": True,
                                   "region_order": [5, 52]})
    bits = Pipeline.from_plan(ct_plan(classes=regions.to_dict(), num_classes=regions.num_classes))
    assert classes.label_kind is CLASSES and bits.label_kind is BITS
    for pipeline, name in ((classes, "classes"), (bits, "bits")):
        config = json.loads(json.dumps(pipeline.to_config()))
        args = {e["name"]: e["args"] for e in config["transforms"]}
        assert args["RandLesionPatchd"]["label_kind"] == name and args["RandJointAugmentd"]["label_kind"] == name
        again = Pipeline.from_config(config)
        assert again.patches.label_kind is pipeline.label_kind and again.to_config() == config
    assert "label_kind" not in transform_config(Pipeline.from_plan(ct_plan()).patches)["args"]
    with pytest.raises(ValueError, match="label_kind must be one of"):
        transform_from_config({"name": "RandLesionPatchd", "args": {"label_kind": "instances"}})
