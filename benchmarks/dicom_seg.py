"""Issue 22: DICOM SEG / RTSTRUCT written and read by medseg, checked by independent tools.

Three real series: patient B's CT (given the UIDs its anonymizer removed), the same stored in reverse
slice order (columns mirrored, so the slice normal and order reverse), and the oblique MR series (given
legal UIDs: its own start with the illegal root 0.0.0.0, which dciodvfy reports in anything that
references them). Label maps: B's reference label map with the four organs of the project's
multi-class task (liver 5, spleen 1, stomach 6, aorta 52), on each B copy; a two-class map on the MR.

For each series: the label map is written as NIfTI (``write_volume``: atomic, gzip, what
``medseg-infer`` writes) and as DICOM SEG (``write_dicom_seg``), both timed (median of 7, the two
writers in turn in each round so both see the same machine load; after ``read_volume`` of the series,
as in ``medseg-infer``); the SEG is read back by highdicom frame by source image and compared with
the NIfTI read back, voxel for voxel; dciodvfy counts its errors; an RTSTRUCT made from the label map is
rasterized again and scored (DSC per class) against it.

Prints progress on stderr and ends with one JSON line: ``seg_written``, ``seg_dciodvfy_errors``,
``seg_roundtrip_equal``, ``rtstruct_read_dsc_min``, ``seg_write_s_over_nifti_write_s`` (total SEG write
time over total NIfTI write time), and per-series details.

    python benchmarks/dicom_seg.py
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

ORGANS = {5: "liver", 1: "spleen", 6: "stomach", 52: "aorta"}
REPEATS = 7


def _median_times(*fns) -> tuple[list[float], list[float]]:
    """Median wall time and median CPU time (this process) of each of ``fns``, run in turn in each of
    :data:`REPEATS` rounds: the writers compared see the same load of the machine (not one a quiet
    minute, the other a busy one). The CPU times say what a loaded machine does to the wall times."""
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(REPEATS):
        for fn, w, c in zip(fns, wall, cpu):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            w.append(time.perf_counter() - start)
            c.append(time.process_time() - start_cpu)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def _one_series(name: str, folder: Path, label_of, names: dict, out: Path) -> dict:
    from _dicom_labels import dciodvfy_errors, highdicom_frames
    from medseg.io import read_volume, write_volume
    from medseg.io.dicomlabels import write_dicom_seg, write_rtstruct

    image = read_volume(folder)  # what medseg-infer does first; the SEG writer reuses its headers
    labels = label_of(image)
    nifti, seg, rt = out / f"{name}.nii.gz", out / f"{name}_seg.dcm", out / f"{name}_rt.dcm"
    # The NIfTI writing medseg-infer does for its label output: write_volume (atomic, .nii.gz).
    (nifti_s, seg_s), (nifti_cpu, seg_cpu) = _median_times(
        lambda: write_volume(labels, nifti, overwrite=True),
        lambda: write_dicom_seg(labels, folder, seg, class_names=names, overwrite=True, model_sha256="0" * 64))
    values = sorted(int(v) for v in np.unique(labels.array) if v)
    written = np.asarray(read_volume(nifti).array)
    expected = np.zeros(written.shape, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        expected[written == value] = number
    equal = bool(np.array_equal(highdicom_frames(seg, folder), expected))
    errors = dciodvfy_errors(seg) if shutil.which("dciodvfy") else None
    write_rtstruct(labels, folder, rt, class_names=names, overwrite=True)
    back = np.asarray(read_volume(rt, reference=folder).array)
    dsc = {}
    for number, value in enumerate(values, start=1):
        a, b = back == number, np.asarray(labels.array) == value
        dsc[names.get(value, str(value))] = round(2 * np.count_nonzero(a & b) / (a.sum() + b.sum()), 6)
    row = {"series": name, "shape": list(image.shape), "orientation": image.orientation, "segments": len(values),
           "seg_frames": int(__import__("pydicom").dcmread(seg, stop_before_pixels=True).NumberOfFrames),
           "nifti_write_s": round(nifti_s, 4), "seg_write_s": round(seg_s, 4),
           "nifti_write_cpu_s": round(nifti_cpu, 4), "seg_write_cpu_s": round(seg_cpu, 4), "roundtrip_equal": equal,
           "dciodvfy_errors": None if errors is None else len(errors), "rtstruct_dsc": dsc}
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> int:
    import logging

    logging.disable(logging.WARNING)  # the per-file notes of the readers would drown the figures
    from _dicom_labels import (B_LABELS, OBLIQUE_SERIES, oblique_labels, organ_labels, reversed_series,
                               series_with_uids, with_new_uids)
    import highdicom  # noqa: F401  (imported before timing: a first import is not a write)
    from medseg.io import read_volume

    if not shutil.which("dciodvfy"):
        print("dicom_seg: dciodvfy not found (apt-get install dicom3tools): seg_dciodvfy_errors is null",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="medseg-dicomseg-") as tmp:
        tmp = Path(tmp)
        b = series_with_uids(tmp / "b")
        series = {"b_axial": b, "b_reversed": reversed_series(tmp / "b_reversed", b),
                  "oblique_mr": with_new_uids(tmp / "oblique", OBLIQUE_SERIES)}
        (tmp / "out").mkdir()
        organs = lambda image: organ_labels(image, ids=tuple(ORGANS))  # noqa: E731
        rows = [_one_series(name, folder, oblique_labels if name == "oblique_mr" else organs,
                            {1: "tissue", 2: "block"} if name == "oblique_mr" else ORGANS, tmp / "out")
                for name, folder in series.items()]
        assert read_volume(B_LABELS).shape == (512, 512, 20)
    errors = [r["dciodvfy_errors"] for r in rows]
    out = {
        "seg_written": len(rows),
        "seg_dciodvfy_errors": None if None in errors else sum(errors),
        "seg_roundtrip_equal": sum(r["roundtrip_equal"] for r in rows),
        "rtstruct_read_dsc_min": min(min(r["rtstruct_dsc"].values()) for r in rows),
        "seg_write_s_over_nifti_write_s": round(sum(r["seg_write_s"] for r in rows)
                                                / sum(r["nifti_write_s"] for r in rows), 3),
        "seg_write_cpu_s_over_nifti_write_cpu_s": round(sum(r["seg_write_cpu_s"] for r in rows)
                                                        / sum(r["nifti_write_cpu_s"] for r in rows), 3),
        "series": rows,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
