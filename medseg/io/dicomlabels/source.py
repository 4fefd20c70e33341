"""The DICOM image series a SEG or RTSTRUCT is written for: its headers, checked for the UIDs a
reference needs."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError

_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def source_headers(series: str | Path, series_uid: str | None = None) -> list:
    """Headers (no pixel data) of the image series at ``series`` (a folder of one series, or one
    multi-frame file), in file-name order.

    Raises:
        InputError: no DICOM image there, several series without ``series_uid``, or images whose
            SOP Class / SOP Instance / Study / Series / Frame of Reference UIDs are blank (an
            anonymizer removed them): nothing could reference them, so no SEG is written.
    """
    import pydicom

    from medseg.io.dicom import list_dicom_series

    p = Path(series)
    if p.is_dir():
        found = list_dicom_series(p)
        if series_uid is not None and len(found) > 1:
            found = [s for s in found if s.uid == series_uid] or found
        if len(found) != 1:
            raise InputError(p, "a folder holding one DICOM image series",
                             f"{len(found)} series" + (": " + "; ".join(s.summary() for s in found) if found else ""))
        paths = list(found[0].paths)
    else:
        paths = [p]
    headers = [pydicom.dcmread(q, stop_before_pixels=True) for q in paths]
    blank = {key: [q for q, ds in zip(paths, headers) if not str(ds.get(key, "") or "").strip()] for key in _NEEDED}
    blank = {key: files for key, files in blank.items() if files}
    if blank:
        keys = ", ".join(blank)
        n = max(len(files) for files in blank.values())
        raise InputError(
            p, "a DICOM series whose images have SOP Class, SOP Instance, Study, Series and Frame of Reference UIDs "
            "(a DICOM SEG/RTSTRUCT references its images by them)",
            f"blank {keys} in {n} of {len(paths)} files (e.g. {next(iter(blank.values()))[0].name}; an anonymizer "
            "removed them)",
            "give the images their UIDs first (e.g. with pydicom: SOPClassUID and SOPInstanceUID from the file "
            "meta's MediaStorage UIDs, one new StudyInstanceUID and SeriesInstanceUID for the whole series), "
            "or write NIfTI (--format nifti)",
        )
    return headers
