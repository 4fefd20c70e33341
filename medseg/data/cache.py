"""Preprocessed training cases, in memory when they fit, else as on-disk ``.npy`` memory maps.

Each case goes once through the deterministic steps of the model's pipeline
(:meth:`medseg.transforms.pipeline.Pipeline.preprocess`, the objects inference runs, so training
sees exactly what inference will), its lesions and body are
indexed (:func:`medseg.transforms.sampling.build_index`), and the arrays are kept:

- ``mode="memory"``: as numpy arrays;
- ``mode="disk"``: as ``.npy`` files in ``cache_dir``, opened as read-only memory maps. Only the
  pages patches touch are read; :meth:`VolumeCache.release_pages` drops them from the process
  (``madvise(MADV_DONTNEED)``, the kernel's page cache keeps them), so resident memory stays
  flat however large the dataset (the batch maker releases the cases of each batch once it is
  built: the kernel maps file pages in folios of up to 2 MB, so a 256x256 patch can map whole
  slices). Files are named by case id and a key of the preprocessing
  fields of the Plan and the source file's size and time, so a later run with the same Plan
  reuses them and a changed Plan or file never reads a stale one. Writes are atomic.
- ``mode="auto"`` (default): memory while the cache stays under ``memory_limit_mb`` (default
  half of the available RAM), disk for the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.classes import BINARY, LabelKind
from medseg.transforms.sampling import LesionIndex, SampleSource, build_index

__all__ = ["VolumeCache", "available_memory_mb", "open_npy_mmap", "CACHE_MODES"]

log = logging.getLogger(__name__)
CACHE_MODES = ("auto", "memory", "disk")
_FORMAT = 1


def available_memory_mb() -> float:
    """MemAvailable from ``/proc/meminfo`` (Linux), else free physical pages, in MB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        return 4096.0


def open_npy_mmap(path: str | os.PathLike) -> tuple[np.ndarray, mmap.mmap | None, int]:
    """Open a ``.npy`` file as a read-only array backed by a memory map we own (so pages can be
    released with ``madvise``).

    Returns:
        ``(array, mmap or None for an empty array, byte offset of the data in the file)``.

    Raises:
        InputError: if the file is not a C-ordered ``.npy`` file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(fh)
        except ValueError as e:
            raise InputError(path, "a .npy cache file", f"an invalid header ({e})") from None
        if fortran:
            raise InputError(path, "a C-ordered .npy cache file", "a Fortran-ordered array")
        offset = fh.tell()
        count = int(np.prod(shape))
        if count == 0:
            return np.zeros(shape, dtype), None, offset
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array, mm, offset


def _atomic_save(path: Path, save) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            save(fh)


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)[:80] or "case"


def _source_identity(item: Any) -> str | None:
    """Stable identity of a file-backed case (paths + size + mtime), or None for in-memory Volumes."""
    paths = []
    if hasattr(item, "image_path"):
        paths = [item.image_path, getattr(item, "label_path", None)]
    elif isinstance(item, dict):
        paths = [item.get("image"), item.get("label")]
    elif isinstance(item, (tuple, list)):
        paths = list(item)
    elif isinstance(item, (str, os.PathLike)):
        paths = [item]
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths if p is not None):
        return None
    parts = []
    for p in paths:
        if p is None:
            parts.append("-")
            continue
        p = Path(p)
        try:
            st = p.stat()
        except OSError:
            return None
        # A DICOM folder's mtime changes when files are added or removed.
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


class VolumeCache:
    """Plan-space training cases for the patch sampler.

    Args:
        cases: ``Case`` objects, ``{"image", "label"}`` dicts or ``(image, label)`` pairs of Volumes
            or paths (see :func:`medseg.data.plan.make_plan`). Every case needs a label.
        plan: the :class:`medseg.data.plan.Plan`.
        pipeline: the model's :class:`~medseg.transforms.pipeline.Pipeline` (default
            ``Pipeline.from_plan(plan)``); its deterministic steps make the cached arrays.
        mode: ``"auto"``, ``"memory"`` or ``"disk"`` (see module docstring).
        cache_dir: folder for disk mode (created if missing; kept and reused). Default: a
            temporary folder removed when the cache is garbage-collected.
        memory_limit_mb: budget of ``"auto"`` mode (default half of the available RAM).
        seed: seeds the subsampling of lesion and body voxels in the index.

    Attributes:
        sources: one :class:`SampleSource` per case, in input order.

    Raises:
        ValueError: unknown mode, no cases, or a case without label.
        InputError: a label not on its image's grid (names the file).
    """

    def __init__(self, cases: Iterable[Any], plan: Any, *, mode: str = "auto", cache_dir: str | os.PathLike | None = None,
                 memory_limit_mb: float | None = None, seed: int = 0, pipeline: Any = None):
        from medseg.data.plan import load_pair
        from medseg.transforms.pipeline import Pipeline

        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, found {mode!r}")
        self.plan = plan
        self.pipeline = pipeline if pipeline is not None else Pipeline.from_plan(plan)
        self.mode = mode
        self.memory_limit_mb = float(memory_limit_mb) if memory_limit_mb is not None else available_memory_mb() / 2
        # Per case: (map, data offset, bytes per slice) of its image and label files.
        self._case_maps: list[list[tuple[mmap.mmap, int, int]]] = []
        self._dir: Path | None = Path(cache_dir) if cache_dir is not None else None
        # Cached files are named by the deterministic steps that made them: a changed step (or
        # argument) never reads a stale file.
        steps = self.pipeline.without_random().to_config()
        self._plan_key = hashlib.sha1(json.dumps(steps, sort_keys=True).encode()).hexdigest()
        self.sources: list[SampleSource] = []
        self.on_disk: list[bool] = []
        self._memory_bytes = 0
        for n, item in enumerate(cases):
            image, label = load_pair(item)
            if label is None:
                raise ValueError(f"{image.case_id}: training cases need a label, found none")
            if not image.same_grid(label):
                raise InputError(label.meta.get("source_path") or label.case_id,
                                 f"a label on the image's grid {image!r}", repr(label))
            identity = _source_identity(item)
            self._add(image, label, identity, seed + n)
        if not self.sources:
            raise ValueError("VolumeCache needs at least one case, found none")
        log.info("cache: %d cases, %.0f MB in memory, %d on disk%s", len(self.sources), self._memory_bytes / 2 ** 20,
                 sum(self.on_disk), f" ({self._dir})" if self._dir else "")

    # --- building ------------------------------------------------------------------------------
    def _ensure_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="medseg-cache-"))
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def _paths(self, case_id: str, identity: str) -> dict[str, Path]:
        key = hashlib.sha1(f"{_FORMAT}|{self._plan_key}|{identity}".encode()).hexdigest()[:16]
        stem = f"{_safe_name(case_id)}-{key}"
        d = self._ensure_dir()
        return {k: d / f"{stem}.{k}.{ext}" for k, ext in (("image", "npy"), ("label", "npy"), ("index", "npz"))}

    def _add(self, image, label, identity: str | None, seed: int) -> None:
        to_disk = self.mode == "disk"
        if self.mode == "auto":
            # Estimate from the raw volume (float32 image + uint8 label ~ 5 bytes a voxel).
            to_disk = self._memory_bytes + image.array.size * 5 > self.memory_limit_mb * 2 ** 20
        paths = None
        if to_disk and identity is not None:
            paths = self._paths(image.case_id, identity)
            if all(p.exists() for p in paths.values()):
                self._open(image.case_id, paths)
                return
        sample = self.pipeline.preprocess({"image": image, "label": label}, training=True)
        prepared, lab = sample["image"], np.ascontiguousarray(sample["label"], dtype=np.uint8)
        del sample
        index = build_index(lab, prepared.body, seed=seed, label_kind=self.pipeline.label_kind)
        pad = float(prepared.array.min()) if prepared.array.size else 0.0
        if not to_disk:
            self.sources.append(SampleSource(prepared.array, lab, index, pad, image.case_id))
            self.on_disk.append(False)
            self._case_maps.append([])
            self._memory_bytes += prepared.array.nbytes + lab.nbytes
            return
        if paths is None:  # in-memory Volume: a fresh entry per run
            paths = self._paths(image.case_id, f"volume|{os.getpid()}|{id(self)}|{len(self.sources)}")
        _atomic_save(paths["image"], lambda fh: np.save(fh, prepared.array))
        _atomic_save(paths["label"], lambda fh: np.save(fh, lab))
        _atomic_save(paths["index"], lambda fh: np.savez(fh, pad_value=np.float32(pad), **index.to_arrays()))
        del prepared, lab
        self._open(image.case_id, paths)

    def _open(self, case_id: str, paths: dict[str, Path]) -> None:
        image, mm_i, off_i = open_npy_mmap(paths["image"])
        label, mm_l, off_l = open_npy_mmap(paths["label"])
        with np.load(paths["index"]) as z:
            index = LesionIndex.from_arrays(z)
            pad = float(z["pad_value"])
        self._case_maps.append([(m, off, arr.strides[0]) for m, off, arr in ((mm_i, off_i, image), (mm_l, off_l, label))
                                if m is not None])
        self.sources.append(SampleSource(image, label, index, pad, case_id))
        self.on_disk.append(True)

    @classmethod
    def from_arrays(cls, arrays: Sequence[tuple[str, np.ndarray, np.ndarray]], plan: Any, *, mode: str = "memory",
                    cache_dir: str | os.PathLike | None = None, body_threshold: float | None = None,
                    seed: int = 0, label_kind: LabelKind | str = BINARY) -> "VolumeCache":
        """A cache of already preprocessed ``(case_id, image (n, H, W) float32, label (n, H, W))``.

        ``body_threshold``: image values above it count as body (None: no body sample).
        ``label_kind``: the labels' :class:`~medseg.io.classes.LabelKind` (or its saved name).

        Raises:
            ValueError: unknown mode, shapes that differ, or no arrays.
        """
        if mode not in ("memory", "disk"):
            raise ValueError(f"from_arrays mode must be 'memory' or 'disk', found {mode!r}")
        self = cls.__new__(cls)
        self.plan, self.mode, self.memory_limit_mb = plan, mode, float("inf")
        self._case_maps, self._dir, self._memory_bytes = [], Path(cache_dir) if cache_dir else None, 0
        self._plan_key = "arrays"
        self.sources, self.on_disk = [], []
        for n, (case_id, image, label) in enumerate(arrays):
            image = np.ascontiguousarray(image, dtype=np.float32)
            label = np.ascontiguousarray(label, dtype=np.uint8)
            if image.shape != label.shape or image.ndim != 3:
                raise ValueError(f"{case_id}: image {image.shape} and label {label.shape} must be equal 3D shapes")
            body = image > body_threshold if body_threshold is not None else None
            index = build_index(label, body, seed=seed + n, label_kind=label_kind)
            pad = float(image.min())
            if mode == "memory":
                self.sources.append(SampleSource(image, label, index, pad, case_id))
                self.on_disk.append(False)
                self._case_maps.append([])
                self._memory_bytes += image.nbytes + label.nbytes
                continue
            paths = self._paths(case_id, f"arrays|{os.getpid()}|{id(self)}|{n}")
            _atomic_save(paths["image"], lambda fh: np.save(fh, image))
            _atomic_save(paths["label"], lambda fh: np.save(fh, label))
            _atomic_save(paths["index"], lambda fh: np.savez(fh, pad_value=np.float32(pad), **index.to_arrays()))
            self._open(case_id, paths)
        if not self.sources:
            raise ValueError("VolumeCache needs at least one case, found none")
        return self

    # --- use -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> SampleSource:
        return self.sources[i]

    @property
    def case_ids(self) -> list[str]:
        return [s.case_id for s in self.sources]

    @property
    def memory_mb(self) -> float:
        """Size of the arrays held in RAM (memory-mode cases), MB."""
        return self._memory_bytes / 2 ** 20

    @property
    def cache_dir(self) -> Path | None:
        return self._dir

    def release_pages(self, cases: Iterable[int] | None = None) -> None:
        """Drop the memory-mapped pages of ``cases`` (default all) from this process.

        The data stay in the kernel's page cache and are mapped again on the next touch.
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        indices = range(len(self._case_maps)) if cases is None else cases
        for mm, _, _ in (m for i in indices for m in self._case_maps[int(i)]):
            try:
                mm.madvise(advice)
            except (OSError, ValueError):  # closed map or platform without madvise
                pass

    def release_slices(self, case: int, first: int, last: int) -> None:
        """Drop the mapped pages of slices ``first..last`` (inclusive) of ``case``, plus 2 MB on
        each side (the kernel maps file pages in folios of up to 2 MB). No-op for memory cases."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        page, margin = mmap.PAGESIZE, 2 << 20
        for mm, offset, slice_bytes in self._case_maps[int(case)]:
            size = len(mm)
            start = max(0, offset + int(first) * slice_bytes - margin) // page * page
            stop = min(size, offset + (int(last) + 1) * slice_bytes + margin)
            if stop > start:
                try:
                    mm.madvise(advice, start, stop - start)
                except (OSError, ValueError):
                    pass

    def __repr__(self) -> str:
        return (f"VolumeCache({len(self)} cases, {self.memory_mb:.0f} MB in memory, {sum(self.on_disk)} on disk"
                f"{', ' + str(self._dir) if self._dir else ''})")
