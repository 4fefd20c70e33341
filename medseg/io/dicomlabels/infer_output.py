"""``medseg-infer --format dicom-seg|rtstruct``: the segmentation of a DICOM series as a DICOM object.

All the command's DICOM logic lives here; ``medseg.cli.infer`` makes one call.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError

#: ``--format`` choices; ``nifti`` is the command's own volume writer (any of its volume formats).
FORMATS = ("nifti", "dicom-seg", "rtstruct")
DICOM_EXT = ".dcm"


def dicom_output_path(seg_path: str | Path) -> Path:
    """``x_seg.nii.gz`` -> ``x_seg.dcm`` (the label output's name with the DICOM extension)."""
    seg_path = Path(seg_path)
    name = seg_path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", DICOM_EXT):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return seg_path.with_name(name + DICOM_EXT)


def segment_names(spec) -> dict[int, str]:
    """Label value the model writes -> class name, for a :class:`~medseg.io.classes.ClassSpec`."""
    if spec.is_binary:
        return {1: spec.names[0]}
    return {int(spec.region_order[k] if spec.regions else ids[0]): name
            for k, (name, ids) in enumerate(zip(spec.names, spec.ids))}


def write_infer_output(fmt: str, labels, source: str | Path, seg_path: str | Path, predictor, extra=(), *,
                       overwrite: bool = False) -> str:
    """Write ``labels`` (on the grid of the DICOM series ``source``) as ``fmt`` next to ``seg_path``
    (extension ``.dcm``), and ``extra`` ``(volume, path)`` pairs (the probability map) as volumes.

    Returns:
        the written paths, as the command prints them.

    Raises:
        InputError: ``source`` is not DICOM (a SEG/RTSTRUCT references DICOM images), or as
            :func:`~medseg.io.dicomlabels.seg_write.write_dicom_seg`.
    """
    from medseg.io import write_volumes
    from medseg.io.dicom import is_dicom_file, is_dicom_folder
    from medseg.io.dicomlabels import write_dicom_seg, write_rtstruct

    source = Path(source)
    if not (is_dicom_folder(source) if source.is_dir() else is_dicom_file(source)):
        raise InputError(source, f"a DICOM series for --format {fmt} (the output references its images)",
                         "a volume that is not DICOM", "use --format nifti")
    info = getattr(predictor.bundle, "info", None) or {}
    writer = write_dicom_seg if fmt == "dicom-seg" else write_rtstruct
    out = writer(labels, source, dicom_output_path(seg_path), class_names=segment_names(predictor.classes),
                 model_sha256=info.get("model_sha256"), overwrite=overwrite)
    extra = list(extra)
    if extra:
        write_volumes(extra, overwrite=overwrite)
    return " and ".join([str(out)] + [str(path) for _, path in extra])
