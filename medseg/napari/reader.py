"""The plugin's reader contribution: DICOM series, NIfTI, NRRD and MHA through :mod:`medseg.io`.

napari calls :func:`get_reader` with a path; it answers a function (or None: not ours) that
returns layer data tuples. Every file goes through :func:`medseg.io.read_volume`, so the sorting,
rescaling and refusals of the command lines apply; a refusal is shown as a napari notification
with the command lines' one-line text (``medseg: error: ...``), and nothing half-read is added.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from medseg.errors import MedsegError

__all__ = ["get_reader", "read_layers", "error_text"]


def error_text(exc: BaseException) -> str:
    """``medseg: error: <the command lines' one line>``."""
    from medseg.cli._common import error_line

    return f"medseg: error: {error_line(exc)}"


def _ours(path: Path) -> bool:
    from medseg.io.dataset import READ_SUFFIXES, is_dicom_file, volume_suffix
    from medseg.io.dicom import is_dicom_folder

    if path.is_dir():
        return is_dicom_folder(path)
    if volume_suffix(path) in READ_SUFFIXES:
        return True
    return path.is_file() and is_dicom_file(path)


def get_reader(path: str | list[str]) -> Callable | None:
    """napari's reader hook: a reader for a DICOM folder or file, NIfTI, NRRD or MHA; None else."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_ours(Path(p)) for p in paths):
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list:
    """Layers of every path (several series of a folder: one each); failures are notifications.

    Returns napari's "nothing to add" sentinel ``[(None,)]`` when every path failed, so napari
    does not go on to try other readers on a file medseg refused for a reason.
    """
    from napari.utils.notifications import show_error, show_warning

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        found, errors, notes = read_layers(Path(p))
        layers.extend(found)
        for line in errors:
            show_error(line)
        for line in notes:
            show_warning(line)
    return layers or [(None,)]


def read_layers(path: Path) -> tuple[list, list[str], list[str]]:
    """``(layer tuples, error lines, warning lines)`` of ``path`` (no napari import: Qt-free tests).

    A folder of several series gives one layer per series; a failing series is an error line
    and the others still open. One file of a series opens the whole series.
    """
    try:
        if path.is_dir():
            return _read_series_folder(path)
        return _read_file(path)
    except (MedsegError, OSError, ValueError) as exc:
        return [], [error_text(exc)], []


def _read_series_folder(folder: Path) -> tuple[list, list[str], list[str]]:
    from medseg.io.dicom import list_dicom_series

    series = list_dicom_series(folder)
    if len(series) <= 1:
        return [_read_dicom(folder, None, series[0].paths[0] if series else folder)], [], []
    layers, errors = [], []
    for info in series:
        try:
            layers.append(_read_dicom(folder, info.uid, info.paths[0]))
        except (MedsegError, OSError, ValueError) as exc:
            errors.append(error_text(exc))
    return layers, errors, []


def _series_number(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesNumber"])
        return str(ds.get("SeriesNumber", "") or "")
    except Exception:  # the number only names the layer: a header without it is no error
        return ""


def _read_dicom(folder: Path, series_uid: str | None, first_file: Path):
    """An Image layer of one series, named by its description and number (``"CT abdomen #3"``)."""
    from medseg.io import read_volume
    from medseg.napari.layers import image_layer

    volume = read_volume(folder, series_uid=series_uid)
    description = volume.meta.get("series_description") or folder.name
    number = _series_number(first_file)
    return image_layer(volume, f"{description} #{number}" if number else str(description))


def _read_file(path: Path) -> tuple[list, list[str], list[str]]:
    from medseg.io import read_volume
    from medseg.io.dataset import is_dicom_file
    from medseg.io.dicomlabels import label_object_kind
    from medseg.napari.layers import classes_near, image_layer, is_label_map, label_layer

    if is_dicom_file(path) and label_object_kind(path) is None:
        return _read_dicom_file(path)
    volume = read_volume(path)
    if not is_label_map(volume, path):
        return [image_layer(volume, _name(path))], [], []
    classes = {int(k): str(v) for k, v in (volume.meta.get("class_names") or {}).items()}
    source = str(path) if classes else None
    if not classes:
        classes, source = classes_near(path)
    return [label_layer(volume, _name(path), classes, classes_from=source)], [], []


def _read_dicom_file(path: Path) -> tuple[list, list[str], list[str]]:
    """One file of a series: the whole series it belongs to, from its folder."""
    import pydicom

    try:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                  .get("SeriesInstanceUID", "") or "")
    except Exception as exc:  # medseg.io names the file and the problem: let it read and refuse
        from medseg.io import read_volume

        read_volume(path)
        raise MedsegError(f"{path}: {exc}") from exc
    if not uid:
        from medseg.io import read_volume
        from medseg.napari.layers import image_layer

        return [image_layer(read_volume(path), _name(path))], [], []
    return [_read_dicom(path.parent, uid, path)], [], []


def _name(path: Path) -> str:
    from medseg.napari.layers import _stem

    return _stem(path)
