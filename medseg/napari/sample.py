"""napari's File > Open Sample: the liver task's two patients, from the files medseg ships.

Patient A: a non-contrast abdomen CT (NIfTI, 3 mm) with its liver label; patient B: a
contrast-enhanced CT as its 20-file DICOM series with its liver reference (a NIfTI label map
stored LAS while the series is LPS: the two overlay voxel for voxel). Both from the
TotalSegmentator 2.18.0 source archive (Apache-2.0), kept in ``tests/data/totalsegmentator``;
liver = label 5 of TotalSegmentator's maps, the only class kept (the demo model's).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["sample_folder", "patient_a", "patient_b", "LIVER_LABEL"]

#: TotalSegmentator's label of the liver (the demo's ``--labels-map liver=5``).
LIVER_LABEL = 5
#: Environment variable naming another folder holding the same files (an installed medseg has no tests/).
SAMPLE_ENV = "MEDSEG_SAMPLE_DATA"


def sample_folder() -> Path:
    """The folder of the TotalSegmentator reference files.

    Raises:
        InputError: when neither ``$MEDSEG_SAMPLE_DATA`` nor the source tree's copy exists.
    """
    candidates = [Path(os.environ[SAMPLE_ENV])] if os.environ.get(SAMPLE_ENV) else []
    candidates.append(Path(__file__).resolve().parents[2] / "tests" / "data" / "totalsegmentator")
    for folder in candidates:
        if (folder / "example_ct.nii.gz").is_file() and (folder / "example_ct_dicom").is_dir():
            return folder
    raise InputError(candidates[0], "the sample scans (example_ct.nii.gz, example_ct_dicom/) of a medseg source "
                     "checkout", "no such files", f"set {SAMPLE_ENV} to a folder holding them")


def _liver(path: Path, name: str):
    from medseg.io import read_volume
    from medseg.napari.layers import label_layer

    volume = read_volume(path)
    liver = np.where(np.asarray(volume.array) == LIVER_LABEL, LIVER_LABEL, 0).astype(np.uint8)
    return label_layer(volume.with_array(liver), name, {LIVER_LABEL: "liver"})


def patient_a() -> list:
    """Patient A: the NIfTI CT and its liver label."""
    from medseg.io import read_volume
    from medseg.napari.layers import image_layer

    folder = sample_folder()
    return [image_layer(read_volume(folder / "example_ct.nii.gz", case_id="patientA"), "patientA CT"),
            _liver(folder / "example_seg_fast_force_split.nii.gz", "patientA liver")]


def patient_b() -> list:
    """Patient B: the DICOM series (through the reader: named by its description and number)
    and its liver reference."""
    from medseg.napari.reader import read_layers

    folder = sample_folder()
    layers, errors, _ = read_layers(folder / "example_ct_dicom")
    if errors:
        raise InputError(folder / "example_ct_dicom", "the sample DICOM series", errors[0])
    return [*layers, _liver(folder / "example_seg_dicom.nii.gz", "patientB liver reference")]
