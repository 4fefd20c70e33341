"""Dataset discovery: pair image and label files (or DICOM folders) into cases.

Rules, applied in this order (see ``docs/io.md``):

1. A ``dataset.json`` with a ``"training"`` list (Medical Segmentation Decathlon, nnU-Net v1) in
   ``images_dir`` or its parent, whose entries point into ``images_dir``, gives the pairs.
2. Otherwise each image pairs with the label of the same name (``case.nii.gz`` <-> ``case.nii.gz``),
   or, nnU-Net style, ``case_0000.nii.gz`` <-> ``case.nii.gz``. A label whose name matches
   several channel files (``case_0000``, ``case_0001``) is a multichannel case: refused.
3. A labels folder of DICOM SEG / RTSTRUCT files pairs each with the image series (a DICOM
   subfolder of ``images_dir``) whose SeriesInstanceUID it references, whatever the names; the
   case id is the image folder's name.
4. A subfolder of ``images_dir`` that directly holds DICOM files (:func:`medseg.io.dicom.is_dicom_folder`)
   is one patient's series; its id is the folder name, paired with a label file or folder of the
   same id. A DICOM file directly in the folder is a case only when it is a series on its own
   (enhanced multi-frame); loose slices of a series are refused.

Hidden entries (leading ``.``, e.g. macOS ``._case.nii.gz``) and non-volume files (README,
CSV, JSON, ``.raw`` data files of ``.mhd`` headers) are ignored. Cases are sorted by id.
Every unpaired file on either side is listed in ONE :class:`~medseg.errors.DatasetError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import DatasetError, InputError
from medseg.io.dicom import DICOM_SUFFIXES, is_dicom_file, is_dicom_folder, looks_like_dicom  # noqa: F401

from medseg.io.suffixes import (  # noqa: F401  (importable from here as before)
    ITK_SUFFIXES, ITK_WRITE_SUFFIXES, NIFTI_SUFFIXES, READ_SUFFIXES, WRITE_SUFFIXES, case_id_from_path, volume_suffix,
)

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One training/evaluation case.

    Attributes:
        case_id: patient/case id, e.g. ``"brain1"``.
        image_path: image file or DICOM folder.
        label_path: label file or folder; None when the dataset has no labels.
        label_map: ``--map-labels`` mapping applied whenever the label is read
            (:func:`medseg.io.labels.apply_label_map`); None: values as stored.
    """

    case_id: str
    image_path: Path
    label_path: Path | None = None
    label_map: dict | None = field(default=None, compare=False)


def _check_dir(folder: Path, what: str) -> list[str]:
    if not folder.exists():
        raise InputError(folder, f"a folder of {what}", "no such folder")
    if not folder.is_dir():
        raise InputError(folder, f"a folder of {what}", "a file")
    try:
        if not os.access(folder, os.R_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
        return sorted(os.listdir(folder))
    except PermissionError as exc:
        raise InputError(folder, f"a readable folder of {what}", "a folder without read permission") from exc


def _scan(folder: Path, what: str) -> dict[str, Path]:
    """Raw ids (no channel stripping) -> paths of the volumes in ``folder``; duplicates refused."""
    entries = _check_dir(folder, what)
    found: dict[str, list[Path]] = {}
    loose_dicom: list[str] = []
    for name in entries:
        if name.startswith("."):
            continue
        path = folder / name
        if path.is_dir():
            if is_dicom_folder(path):
                found.setdefault(name, []).append(path)
            else:
                log.debug("ignoring folder without DICOM files: %s", path)
            continue
        suffix = volume_suffix(path)
        if suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
            found.setdefault(case_id_from_path(path), []).append(path)
        elif looks_like_dicom(path):
            loose_dicom.append(name)
        else:
            log.debug("ignoring non-volume file: %s", path)
    if loose_dicom:  # a SEG / RTSTRUCT file is a case of its own, named by its file
        from medseg.io.dicomlabels import label_object_kind

        objects = [name for name in loose_dicom if label_object_kind(folder / name) is not None]
        for name in objects:
            found.setdefault(case_id_from_path(folder / name), []).append(folder / name)
        loose_dicom = [name for name in loose_dicom if name not in objects]
    if loose_dicom:
        # Single-file volumes (enhanced multi-frame: one file per patient) are cases; slices of a
        # series lying loose in the folder are not.
        from medseg.io.dicom import list_dicom_series

        series = [s for s in list_dicom_series(folder) if s.paths[0].name not in objects]
        if len(series) != len(loose_dicom) or any(s.n_files != 1 for s in series):
            raise InputError(
                folder, f"one subfolder per patient holding its DICOM series, or one file per case ({what})",
                f"{len(loose_dicom)} DICOM files of {len(series)} series directly in the folder (e.g. {loose_dicom[0]})",
                "move each series into its own folder named after the case, or read the folder as one volume",
            )
        for s in series:
            found.setdefault(case_id_from_path(s.paths[0]), []).append(s.paths[0])
    duplicates = [f"{cid}: " + ", ".join(p.name for p in paths) for cid, paths in found.items() if len(paths) > 1]
    if duplicates:
        raise DatasetError(f"{folder}: several files share one case id; keep one per case", duplicates)
    if not found:
        raise InputError(
            folder, f"{what}: volume files ({', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}) or DICOM subfolders",
            f"none ({len([e for e in entries if not e.startswith('.')])} other entries ignored)",
        )
    return {cid: paths[0] for cid, paths in found.items()}


def _strip_channels(raw: dict[str, Path], folder: Path) -> dict[str, Path]:
    """nnU-Net channel suffixes of an image folder: strip ``_0000``; refuse real multichannel."""
    parsed = {cid: _CHANNEL.match(cid) for cid in raw}
    if raw and all(m is not None for m in parsed.values()):
        groups: dict[str, set[str]] = {}
        for m in parsed.values():
            groups.setdefault(m["base"], set()).add(m["channel"])
        channel_sets = {frozenset(ch) for ch in groups.values()}
        if len(groups) > 1 and len(channel_sets) == 1:
            channels = sorted(next(iter(channel_sets)))
            if len(channels) > 1 and channels[0] == "0000":
                raise DatasetError(
                    f"{folder}: multichannel nnU-Net images (channels {', '.join(channels)} per case) "
                    "are not supported; medseg trains on one channel per case",
                    [f"{base}: " + ", ".join(f"{base}_{c}" for c in channels) for base in sorted(groups)[:10]],
                )
        if all(m["channel"] == "0000" for m in parsed.values()):
            return {m["base"]: raw[cid] for cid, m in parsed.items()}
    return raw


def list_volume_files(folder: str | os.PathLike, *, images: bool = False) -> dict[str, Path]:
    """Case id -> volume file (or DICOM subfolder) in ``folder``, sorted by id (not recursive).

    Args:
        folder: a folder of ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` files
            and/or DICOM subfolders (one per patient).
        images: the folder holds images: when every name ends in the nnU-Net channel suffix
            ``_0000`` it is dropped from the ids.

    Raises:
        InputError: missing/unreadable folder, no volume in it, loose DICOM files.
        DatasetError: two files with one id (``a.nii.gz`` and ``a.nrrd``), multichannel images.
    """
    folder = Path(folder)
    raw = _scan(folder, "images" if images else "volumes")
    if images:
        raw = _strip_channels(raw, folder)
    return dict(sorted(raw.items()))


def find_dataset_json(images_dir: str | os.PathLike) -> Path | None:
    """The ``dataset.json`` of an images folder: in it, or one level up (MSD / nnU-Net layout);
    None when there is none. The one rule pairing, ``medseg-check`` and training use."""
    images_dir = Path(images_dir)
    for candidate in (images_dir / "dataset.json", images_dir.parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_json_image(path: Path) -> Path | None:
    """An image path of dataset.json; nnU-Net v1 lists ``x.nii.gz`` for the file ``x_0000.nii.gz``."""
    if path.exists():
        return path
    suffix = volume_suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.name
    channel0 = path.with_name(f"{stem}_0000{suffix}")
    if channel0.exists():
        if path.with_name(f"{stem}_0001{suffix}").exists():
            raise DatasetError(
                f"{path.parent}: multichannel case {stem} ({stem}_0000, {stem}_0001, ...) is not supported; "
                "medseg trains on one channel per case"
            )
        return channel0
    return None


def _cases_from_json(json_path: Path, images_dir: Path, labels_dir: Path | None) -> list[Case] | None:
    try:
        spec = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(json_path, "a valid dataset.json", f"unreadable JSON ({exc})") from exc
    training = spec.get("training") if isinstance(spec, dict) else None
    if not isinstance(training, list) or not training:
        return None  # nnU-Net v2 style: no pair list; names decide
    root = json_path.parent
    images_real = os.path.realpath(images_dir)
    cases: list[Case] = []
    problems: list[str] = []
    for n, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(f"training[{n}]: expected {{'image': ..., 'label': ...}}, found {entry!r}")
            continue
        listed = (root / entry["image"]).resolve()
        if os.path.realpath(listed.parent) != images_real:
            continue  # an entry for another images folder
        image = _resolve_json_image(listed)
        label = None
        if entry.get("label") is not None:
            label_listed = Path(entry["label"])
            label = (labels_dir / label_listed.name) if labels_dir is not None else (root / label_listed).resolve()
        if image is None:
            problems.append(f"{listed}: listed in dataset.json, file not found")
            continue
        if labels_dir is not None and (label is None or not label.exists()):
            problems.append(f"{image}: label {label if label is not None else '(none listed)'} not found")
            continue
        # The listed name (nnU-Net v1 lists x.nii.gz for the file x_0000.nii.gz) is the case id.
        case_id = case_id_from_path(listed, images=True)
        cases.append(Case(case_id, image, label))
    if not cases and not problems:
        log.info("%s lists no image in %s; pairing by file names", json_path, images_dir)
        return None
    if problems:
        raise DatasetError(f"{json_path}: {len(problems)} entries of 'training' cannot be used", problems)
    return cases


def pair_cases(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None
) -> tuple[list[Case], list[str]]:
    """Like :func:`discover_cases`, but unpaired files are returned instead of raised.

    ``medseg-check`` uses it to report unpaired files together with the problems of the cases
    that do pair.

    Returns:
        ``(cases, problems)``: the paired cases sorted by id, and one line per unpaired file
        (``"image without label: PATH"`` / ``"label without image: PATH"``).

    Raises:
        InputError, DatasetError: as :func:`discover_cases`, except for unpaired files.
    """
    images_dir = Path(images_dir)
    labels_dir = None if labels_dir is None else Path(labels_dir)
    _check_dir(images_dir, "images")
    if labels_dir is not None and os.path.realpath(labels_dir) == os.path.realpath(images_dir):
        raise InputError(labels_dir, "a labels folder different from the images folder", "the images folder itself")
    json_path = find_dataset_json(images_dir)
    if json_path is not None:
        cases = _cases_from_json(json_path, images_dir, labels_dir)
        if cases is not None:
            log.info("pairing %d cases from %s", len(cases), json_path)
            return _sorted_unique(cases, json_path), []
    if labels_dir is None:
        return [Case(cid, path, None) for cid, path in list_volume_files(images_dir, images=True).items()], []

    images = _scan(images_dir, "images")
    # DICOM SEG / RTSTRUCT labels pair with their series by UID, not by name
    from medseg.io.dicomlabels import label_objects_in, pair_by_reference

    objects = label_objects_in(labels_dir)
    if objects:
        pairs, problems = pair_by_reference(images, objects)
        return [Case(cid, image, label) for cid, image, label in pairs], problems
    labels = _scan(labels_dir, "labels")
    by_label: dict[str, list[str]] = {}
    for image_id in images:
        if image_id in labels:
            by_label.setdefault(image_id, []).append(image_id)
            continue
        m = _CHANNEL.match(image_id)
        if m and m["base"] in labels:
            by_label.setdefault(m["base"], []).append(image_id)
    multichannel = {lid: ids for lid, ids in by_label.items() if len(ids) > 1}
    if multichannel:
        raise DatasetError(
            f"{images_dir}: multichannel cases are not supported (medseg trains on one channel per case)",
            [f"{lid}: " + ", ".join(images[i].name for i in sorted(ids)) for lid, ids in sorted(multichannel.items())],
        )
    paired_images = {ids[0] for ids in by_label.values()}
    problems = [f"image without label: {images[i]}" for i in sorted(set(images) - paired_images)]
    problems += [f"label without image: {labels[i]}" for i in sorted(set(labels) - set(by_label))]
    return [Case(lid, images[ids[0]], labels[lid]) for lid, ids in sorted(by_label.items())], problems


def discover_cases(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None) -> list[Case]:
    """Pair images with labels (rules in the module docstring); sorted by case id.

    Args:
        images_dir: folder of image files and/or DICOM subfolders.
        labels_dir: folder of label files/folders; None -> image-only cases (``label_path`` None).

    Returns:
        One :class:`Case` per patient.

    Raises:
        InputError: a folder is missing, unreadable or holds no volume.
        DatasetError: unpaired images and/or labels (all listed), duplicate ids, multichannel.

    Example:
        >>> discover_cases("Task01/imagesTr", "Task01/labelsTr")  # doctest: +SKIP
        [Case(case_id='la_003', image_path=..., label_path=...), ...]
    """
    cases, problems = pair_cases(images_dir, labels_dir)
    if problems:
        raise DatasetError(
            f"{len(problems)} unpaired files between {images_dir} and {labels_dir} "
            "(expected identical names or nnU-Net case_0000 <-> case)",
            problems,
        )
    return cases


def _sorted_unique(cases: list[Case], source: Path) -> list[Case]:
    seen: dict[str, Case] = {}
    duplicates = []
    for case in cases:
        if case.case_id in seen:
            duplicates.append(f"{case.case_id}: {seen[case.case_id].image_path.name}, {case.image_path.name}")
        seen[case.case_id] = case
    if duplicates:
        raise DatasetError(f"{source}: several entries share one case id", duplicates)
    return sorted(cases, key=lambda c: c.case_id)
