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
    from medseg.io.dicom import series_headers

    p = Path(series)
    try:
        pairs = series_headers(p, series_uid)
    except InputError:
        if series_uid is None:
            raise
        pairs = series_headers(p)  # the label map's series UID may be blank, or the folder's only series
    paths, headers = [q for q, _ in pairs], [ds for _, ds in pairs]
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
