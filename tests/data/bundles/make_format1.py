"""How tests/data/bundles/format1 was made (run once, with the code of commit c396279, format 1).

Kept for the record: rerunning it with a newer medseg writes a newer format, which is not the point
of the fixture. ``PYTHONPATH=. python tests/data/bundles/make_format1.py``
"""
import json
from pathlib import Path

import keras
import numpy as np

from medseg.data.plan import Plan
from medseg.infer.bundle import load_bundle, save_bundle
from medseg.infer.postprocess import choose_largest_component
from medseg.infer.predictor import Predictor
from medseg.io import read_volume
from medseg.nets.unetpp import build_unetpp

HERE = Path(__file__).parent
out = HERE / "format1"
keras.utils.set_random_seed(21)
model = build_unetpp(input_channels=3, filters=(4, 8), depth=1, deep_supervision=False, batch_norm=False)
plan = Plan(modality="MR", context_slices=3, divisor=2, patch_size=(32, 32), normalization={"kind": "zscore"})
rows = [{"dsc": 0.50, "dsc_largest_component": 0.60}, {"dsc": 0.70, "dsc_largest_component": 0.72}]
# The extra medseg-train wrote with format 1 (medseg/train/loop.py _bundle_saver at c396279).
extra = {
    "epoch": 3, "val_dsc_3d": 0.6, "val_hd95_mm": 4.5, "train_cases": ["brain1"], "val_cases": ["brain2"],
    "validation": "held-out cases", "selection": "best mean 3D validation DSC on held-out cases",
    "map_labels": None, "postprocessing": choose_largest_component(rows, validation="held-out cases"),
}
save_bundle(out, model, plan, threshold=0.9, extra=extra)
image = read_volume(HERE.parent / "nrrd" / "breast1_image.nrrd")
seg = Predictor(load_bundle(out)).segment(image)  # the bundle's choice: largest component kept
np.savez_compressed(out / "expected_breast1.npz", labels=np.asarray(seg.array), affine=np.asarray(seg.affine))
raw = Predictor(load_bundle(out)).segment(image, largest_component=False)
print(json.dumps({"voxels": int(seg.array.sum()), "raw_voxels": int(raw.array.sum()), "dtype": str(seg.array.dtype)}))
