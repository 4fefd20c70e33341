"""The Plan: every preprocessing decision, fitted once on the training set (the fingerprint).

Training writes the Plan into the bundle and inference reads it back, so both apply the same
orientation, slice axis, in-plane spacing and normalization. :func:`make_plan` derives it from
the data the way nnU-Net's "dataset fingerprint" does:

- ``orientation``: ``"RAS"`` (every volume is reoriented, exactly, by axis permutation/flip).
- ``slice_axis``: the array axis (after reorientation) with the largest median spacing, so 2D
  slices are the high-resolution planes; ties go to axis 2 (axial).
- ``target_spacing_mm``: median in-plane spacing over the cases (nnU-Net's choice: most cases
  need little resampling, none is badly down-sampled).
- ``normalization``: CT -> a fixed HU window ``[-1000, 400]`` widened, if needed, to the lesions'
  0.5/99.5 percentiles (so no lesion intensity is clipped while lung and soft tissue keep their
  contrast); CT with several named classes -> the classes' window: their pooled 5/95 HU
  percentiles widened by ``CLASS_WINDOW_MARGIN_HU`` each side (organs that differ by tens of HU
  must be told apart from each other, not only from the background; the margin keeps a
  contrast-enhanced patient's brighter organs inside the window); MR and others -> per-volume
  z-score over the body after clipping to the volume's 0.5/99.5 body percentiles (MR intensities
  have no absolute scale, so dataset statistics would not transfer between scanners).
- ``enhancement``: CT with several named classes (not nested regions) in a CT window and no
  ``contrast_phases`` (switched off) -> issue 13's simulated contrast enhancement
  (:mod:`medseg.transforms.enhance`, relative shifts): a patient whose organs a contrast agent
  brightened must not look like a new kind of tissue; None otherwise (the phases replace it).
- ``contrast_phases``: CT with one class or several named classes (not nested regions: a voxel of
  several regions has no one phase intensity), at least one a structure the phase table knows by
  name (an unnamed ``lesion`` alone only with ``"on"``: measured to cost the liver task), in a CT
  window -> the simulated
  contrast phases (:mod:`medseg.transforms.phase`, each class's targets by its name): a model
  trained on non-contrast scans must segment contrast-enhanced ones and the reverse. The CT window's
  top is then raised to the classes' brightest phase target (550 HU for an unnamed class, which may
  be an arterial vessel) + ``PHASE_WINDOW_MARGIN_HU``, so a 350-550 HU arterial aorta is neither
  clipped to the look of bone nor of the window's top.
- ``keep_orientation``: True when named classes (several classes, not nested regions) lie on
  opposite sides of the body, each in every training case (``LATERAL_SHARE`` of its voxels on
  its side of the body's centre; liver right, spleen left): training patches are then never
  mirrored or turned by quarter turns. A mirrored patch puts each such class where the other
  belongs, so the network could tell them apart by look only; every volume is reoriented to the
  plan's orientation, so a mirrored or upside-down body never reaches it outside training
  (TotalSegmentator trains without mirroring for this reason). False otherwise: classes on one
  side only (liver and its tumours) or on both (kidneys) keep the full augmentation, as binary
  plans always do.
- ``patch_size``: the median resampled in-plane size rounded up to ``divisor``, at most 256.
- ``lesion_fraction``: 0.5 (see ``docs/pipeline.md`` for the reasoning).
"""


from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from medseg.data.fingerprint import (
    CLASS_WINDOW_MARGIN_HU,
    DEFAULT_CT_WINDOW_HU,
    DEFAULT_PATCH,
    LATERAL_SHARE,
    MIXED,
    _class_ct_window,
    _kind,
    _modality_for,
    _normalization_for,
    _patch_for,
    _stats,
    fingerprint_cases,
    load_pair,
    summary,
)
from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.classes import BINARY, BITS, CLASSES, ClassSpec, LabelKind
from medseg.transforms.intensity import check_normalization
from medseg.transforms.slicing import largest_spacing_axis
from medseg.transforms.spatial import reorientation

__all__ = ["Plan", "make_plan", "load_pair", "CLASS_WINDOW_MARGIN_HU", "DEFAULT_CT_WINDOW_HU", "DEFAULT_LESION_FRACTION",
           "LATERAL_SHARE", "PLAN_VERSION"]

PLAN_VERSION = 1
#: Fraction of patches centred on a lesion (nnU-Net forces 1/3 foreground, MONAI's pos:neg=1:1 is 1/2).
DEFAULT_LESION_FRACTION = 0.5


@dataclass
class Plan:
    """Preprocessing decisions shared by training and inference (see module docstring).

    Attributes:
        modality: ``"CT"``, ``"MR"``, ... (CT enables HU-based body masks); ``"MIXED"`` when the
            training cases mix modalities (per-volume z-score, Otsu body masks).
        orientation: canonical axis codes every volume is reoriented to.
        slice_axis: array axis (after reorientation) along which 2D slices are taken.
        target_spacing_mm: in-plane spacing (mm) for the two non-slice axes, in array order, or
            ``None`` to keep each volume's own spacing.
        normalization: see :mod:`medseg.transforms.intensity`.
        context_slices: odd number of neighbouring slices given as channels (1 = plain 2D).
        patch_size: training patch (H, W) in plan space; multiples of ``divisor``.
        lesion_fraction: fraction of training patches centred on a lesion.
        num_classes: network outputs: 2 (background, lesion), or background + each class of
            ``classes``.
        divisor: the network's size multiple, ``2 ** depth``.
        fingerprint: dataset statistics the decisions came from (informative only).
        version: Plan format version.
        classes: the named classes (:meth:`medseg.io.classes.ClassSpec.to_dict`) when there are
            several; None for binary lesion segmentation (every nonzero value is the lesion).
            Left out of :meth:`to_dict` when None, so binary plans read as before.
        enhancement: the training augmentation that simulates contrast enhancement
            (:meth:`medseg.transforms.enhance.EnhancementConfig.to_dict`), or None. Needs a CT
            window and named classes (not regions); left out of :meth:`to_dict` when None.
        ignore_label: the label value of unlabelled voxels (``--ignore-label``, dataset.json's
            ``"ignore"``): the fingerprint counts labelled voxels only and the label step marks
            them (:data:`medseg.io.classes.IGNORE_INDEX`). Left out of :meth:`to_dict` when None.
        contrast_phases: the training step that simulates contrast phases
            (:meth:`medseg.transforms.phase.PhaseConfig.to_dict`), or None. Needs a CT window and
            one class or named classes (not regions); left out of :meth:`to_dict` when None.
        keep_orientation: training patches keep the plan's orientation: the default
            augmentation has no flips and no quarter turns (see the module docstring; fitted
            True when classes lie on opposite sides of the body). Left out of :meth:`to_dict`
            when False.

    Raises:
        ValueError: on inconsistent fields (message names the field and the value found).
    """

    modality: str = "CT"
    orientation: str = "RAS"
    slice_axis: int = 2
    target_spacing_mm: tuple[float, float] | None = None
    normalization: dict = field(default_factory=lambda: {
        "kind": "ct_window", "low_hu": DEFAULT_CT_WINDOW_HU[0], "high_hu": DEFAULT_CT_WINDOW_HU[1]})
    context_slices: int = 1
    patch_size: tuple[int, int] = (DEFAULT_PATCH, DEFAULT_PATCH)
    lesion_fraction: float = DEFAULT_LESION_FRACTION
    num_classes: int = 2
    divisor: int = 16
    fingerprint: dict = field(default_factory=dict)
    version: int = PLAN_VERSION
    classes: dict | None = None
    enhancement: dict | None = None
    keep_orientation: bool = False
    ignore_label: int | None = None
    contrast_phases: dict | None = None

    def __post_init__(self) -> None:
        self.modality = str(self.modality)
        reorientation(np.eye(4), (1, 1, 1), self.orientation)  # validates the axis codes
        self.orientation = str(self.orientation).upper()
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"Plan.slice_axis must be 0, 1 or 2, found {self.slice_axis!r}")
        self.slice_axis = int(self.slice_axis)
        if self.target_spacing_mm is not None:
            ts = tuple(float(v) for v in self.target_spacing_mm)
            if len(ts) != 2 or min(ts) <= 0 or not all(math.isfinite(v) for v in ts):
                raise ValueError(f"Plan.target_spacing_mm must be None or two positive numbers, "
                                 f"found {self.target_spacing_mm!r}")
            self.target_spacing_mm = ts
        self.normalization = check_normalization(self.normalization)
        if int(self.context_slices) != self.context_slices or self.context_slices < 1 or self.context_slices % 2 == 0:
            raise ValueError(f"Plan.context_slices must be a positive odd integer, found {self.context_slices!r}")
        self.context_slices = int(self.context_slices)
        if int(self.divisor) != self.divisor or self.divisor < 1:
            raise ValueError(f"Plan.divisor must be a positive integer, found {self.divisor!r}")
        self.divisor = int(self.divisor)
        ps = tuple(int(v) for v in self.patch_size)
        if len(ps) != 2 or min(ps) < 1 or any(v % self.divisor for v in ps):
            raise ValueError(f"Plan.patch_size must be two positive multiples of divisor={self.divisor}, "
                             f"found {self.patch_size!r}")
        self.patch_size = ps
        if not 0.0 <= float(self.lesion_fraction) <= 1.0:
            raise ValueError(f"Plan.lesion_fraction must lie in [0, 1], found {self.lesion_fraction!r}")
        self.lesion_fraction = float(self.lesion_fraction)
        if int(self.num_classes) != self.num_classes or self.num_classes < 2:
            raise ValueError(f"Plan.num_classes must be an integer >= 2, found {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if self.classes is not None:
            spec = ClassSpec.from_dict(self.classes)
            if spec.num_classes != self.num_classes:
                raise ValueError(f"Plan.num_classes {self.num_classes} does not fit its classes {list(spec.names)} "
                                 f"({spec.num_classes} outputs)")
            self.classes = spec.to_dict()
        if self.enhancement is not None:
            self.enhancement = self._checked_enhancement(self.enhancement)
        if self.contrast_phases is not None:
            self.contrast_phases = self._checked_phases(self.contrast_phases)
        if not isinstance(self.keep_orientation, (bool, np.bool_)):
            raise ValueError(f"Plan.keep_orientation must be true or false, found {self.keep_orientation!r}")
        self.keep_orientation = bool(self.keep_orientation)
        if self.ignore_label is not None:
            if isinstance(self.ignore_label, bool) or int(self.ignore_label) != self.ignore_label:
                raise ValueError(f"Plan.ignore_label must be an integer label value or None, found {self.ignore_label!r}")
            self.ignore_label = int(self.ignore_label)

    def _checked_enhancement(self, value: Any) -> dict:
        from medseg.transforms.enhance import EnhancementConfig

        if not isinstance(value, Mapping):
            raise ValueError(f"Plan.enhancement must be None or a mapping of enhancement settings, found {value!r}")
        config = EnhancementConfig.from_dict(value)
        if self.normalization.get("kind") != "ct_window":
            raise ValueError(f"Plan.enhancement shifts HU and needs a ct_window normalization, found "
                             f"{self.normalization.get('kind')!r}")
        spec = self.class_spec
        if LabelKind.of(self.classes) is not CLASSES:  # binary, or region bits
            raise ValueError("Plan.enhancement needs named classes (not the binary lesion class, not nested "
                             "regions): it shifts each class on its own")
        unknown = sorted(set(config.classes or ()) - set(spec.names))
        if unknown:
            raise ValueError(f"Plan.enhancement classes {unknown} are not among the classes {list(spec.names)}")
        return config.to_dict()

    def _checked_phases(self, value: Any) -> dict:
        from medseg.transforms.phase import PhaseConfig

        if not isinstance(value, Mapping):
            raise ValueError(f"Plan.contrast_phases must be None or a mapping of phase settings, found {value!r}")
        config = PhaseConfig.from_dict(value)
        if self.normalization.get("kind") != "ct_window":
            raise ValueError(f"Plan.contrast_phases shifts HU and needs a ct_window normalization, found "
                             f"{self.normalization.get('kind')!r}")
        if LabelKind.of(self.classes) is BITS:
            raise ValueError("Plan.contrast_phases needs one class or named classes, not nested regions (a voxel "
                             "of several regions has no one phase intensity)")
        names = list(self.class_spec.names)
        if list(config.targets) != names[: len(config.targets)] or not config.targets:
            raise ValueError(f"Plan.contrast_phases targets {list(config.targets)} must name the classes "
                             f"{names} in order")
        return config.to_dict()

    def enhanced_class_indices(self) -> list[int]:
        """Class indices (1..K) the enhancement shifts on their own (its ``classes``, else all)."""
        names = list(self.class_spec.names)
        chosen = (self.enhancement or {}).get("classes")
        return [i + 1 for i, n in enumerate(names) if chosen is None or n in chosen]

    @property
    def class_spec(self):
        """The :class:`medseg.io.classes.ClassSpec` of the plan (binary when ``classes`` is None)."""
        return ClassSpec.binary() if self.classes is None else ClassSpec.from_dict(self.classes)

    def class_body_fractions(self) -> list[float] | None:
        """Each named class's share of the training patients' body voxels, in class order.

        None for a binary plan, or one fitted before these counts were recorded."""
        fractions = (self.fingerprint or {}).get("class_body_fractions")
        if self.classes is None or not fractions:
            return None
        return [float(fractions[name]) for name in self.class_spec.names]

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dictionary (tuples become lists)."""
        d = dataclasses.asdict(self)
        for key in ("classes", "enhancement", "ignore_label", "contrast_phases"):  # plans read as before these existed
            if d[key] is None:
                del d[key]
        if not d["keep_orientation"]:
            del d["keep_orientation"]
        d["patch_size"] = list(self.patch_size)
        d["target_spacing_mm"] = None if self.target_spacing_mm is None else list(self.target_spacing_mm)
        return json.loads(json.dumps(d, default=_json_default))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys or a newer Plan version.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Plan fields {unknown}; known fields: {sorted(names)}")
        if int(data.get("version", PLAN_VERSION)) > PLAN_VERSION:
            raise ValueError(f"Plan version {data['version']} is newer than this medseg understands ({PLAN_VERSION})")
        kwargs = dict(data)
        if kwargs.get("patch_size") is not None:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "Plan":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the Plan as JSON, atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a Plan written by :meth:`save`.

        Raises:
            InputError: if the file is missing, not JSON, or not a valid Plan.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "a Plan JSON file", "no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(path, "a Plan JSON file", f"unreadable JSON ({e})") from None
        if not isinstance(data, dict):
            raise InputError(path, "a Plan JSON object", f"a JSON {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise InputError(path, "a valid Plan", str(e)) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def make_plan(cases_or_volumes: Iterable[Any], *, overrides: Mapping[str, Any] | None = None,
              seed: int = 0) -> Plan:
    """Fit a :class:`Plan` to a training set (the dataset fingerprint).

    Args:
        cases_or_volumes: ``medseg.io.dataset.Case`` objects (files are read with
            ``medseg.io.read_volume``), ``{"image": ..., "label": ...}`` dicts or ``(image, label)``
            pairs of Volumes or paths, or image Volumes alone (no lesion statistics).
        overrides: Plan fields to set instead of the fitted value (e.g. ``{"context_slices": 3}``).
            A given ``slice_axis`` is used when choosing in-plane spacing and patch size.
        seed: seeds the voxel subsampling of the intensity statistics (results are reproducible).

    Returns:
        The Plan, with ``fingerprint`` holding per-case and pooled statistics.

    Raises:
        ValueError: if there are no cases, an override names an unknown field, or modalities mix.
        InputError: if a label's shape differs from its image's.
    """
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown Plan fields in overrides: {unknown}; known fields: {sorted(names)}")
    rng = np.random.default_rng(seed)
    orientation = str(overrides.get("orientation", "RAS"))
    classes = _class_spec(overrides.get("classes"))
    ignore = overrides.get("ignore_label")
    entries, body_values, fg_values = fingerprint_cases(cases_or_volumes, orientation, rng, classes, ignore)

    modalities = sorted({e["modality"] for e in entries})
    modality = _modality_for(modalities, overrides)

    spacings = np.array([e["spacing_mm"] for e in entries])
    median_spacing = np.median(spacings, axis=0)
    slice_axis = int(overrides.get("slice_axis", largest_spacing_axis(median_spacing)))
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"Plan.slice_axis must be 0, 1 or 2, found {slice_axis!r}")
    inplane = [a for a in range(3) if a != slice_axis]
    # When every case already has the median spacing, resampling is skipped (identity grid).
    target_spacing = overrides.get("target_spacing_mm", tuple(float(v) for v in median_spacing[inplane]))

    normalization, phases = _intensity_for(modality, classes, fg_values, overrides)
    divisor = int(overrides.get("divisor", 16))
    spacing_for_size = np.asarray(target_spacing if target_spacing is not None else median_spacing[inplane])
    patch = overrides.get("patch_size", _patch_for(entries, inplane, spacing_for_size, divisor))
    fingerprint, sides = summary(entries, median_spacing, body_values, fg_values, slice_axis, classes, orientation)
    fields = {
        "modality": modality,
        "orientation": orientation,
        "slice_axis": slice_axis,
        "target_spacing_mm": target_spacing,
        "normalization": normalization,
        "context_slices": overrides.get("context_slices", 1),
        "patch_size": patch,
        "lesion_fraction": overrides.get("lesion_fraction", DEFAULT_LESION_FRACTION),
        "num_classes": overrides.get("num_classes", 2),
        "divisor": divisor,
        "fingerprint": overrides.get("fingerprint", fingerprint),
        "classes": overrides.get("classes"),
        # The phases move each class to a phase's intensity: issue 13's relative shifts on top of
        # them would double the change, so a plan has one or the other by default.
        "enhancement": overrides.get("enhancement", None if phases is not None
                                     else _enhancement_for(modality, normalization, classes)),
        # Classes on both sides: a mirrored patch would swap their places.
        "keep_orientation": overrides.get("keep_orientation", len(set(sides.values())) == 2),
        "ignore_label": ignore,
        "contrast_phases": phases if normalization.get("kind") == "ct_window" else None,
    }
    return Plan(**fields)


def _intensity_for(modality: str, classes, fg_values: np.ndarray, overrides: Mapping[str, Any]):
    """``(normalization, contrast_phases)``: the fitted ones, or the overrides'."""
    if _kind(classes) is not BINARY and modality == "CT" and fg_values.size:
        # Several classes (or regions) get their own window; one named class gets the binary
        # run's (``--labels-map liver=5`` as ``--map-labels 5:1,*:0``), whose top only its
        # contrast phases, chosen by its name, may raise.
        fitted = _class_ct_window(fg_values)
    else:
        fitted = _normalization_for(modality, _stats(fg_values))
    phases = overrides.get("contrast_phases", _phases_for(modality, fitted, classes))
    if isinstance(phases, str) and phases == "on":  # asked for, whatever the classes' names
        phases = _phases_for(modality, fitted, classes, asked=True)
    if phases is not None and "normalization" not in overrides:
        fitted = _window_for_phases(fitted, phases)
    return overrides.get("normalization", fitted), phases


def _enhancement_for(modality: str, normalization: Mapping[str, Any], classes) -> dict | None:
    """The default simulated contrast enhancement for CT classes in a CT window, else None."""
    if _kind(classes) is not CLASSES or modality != "CT" or normalization.get("kind") != "ct_window":
        return None
    from medseg.transforms.enhance import EnhancementConfig

    return EnhancementConfig().to_dict()


def _phases_for(modality: str, normalization: Mapping[str, Any], classes, asked: bool = False) -> dict | None:
    """The default simulated contrast phases: CT in a CT window, one class or named classes (not
    regions), at least one of them a structure the phase table knows by name (``aorta``,
    ``liver``...), each class's targets from its row (``enhancing`` for the others, e.g. the
    stomach beside the liver); else None. Classes of no known structure only (the binary
    ``lesion`` of ``--map-labels``) get them only when ``asked`` (``contrast_phases: "on"``,
    ``--contrast-phases``): nothing says what their phases are, and the generic row cost the
    demo's liver task (docs/train.md)."""
    if modality != "CT" or normalization.get("kind") != "ct_window" or _kind(classes) is BITS:
        return None
    from medseg.transforms.phase import PhaseConfig, phase_row

    names = ClassSpec.binary().names if classes is None else classes.names
    if not asked and all(phase_row(name) == "enhancing" for name in names):
        return None
    return PhaseConfig.for_classes(names).to_dict()


def _window_for_phases(normalization: Mapping[str, Any], phases: Mapping[str, Any]) -> dict:
    """The CT window with its top raised, if needed, to the brightest phase target (or an unnamed
    class's real top) plus ``PHASE_WINDOW_MARGIN_HU``: a structure at its brightest simulated (or
    real) intensity stays inside the window, distinct from clipped bone and from the window's top."""
    from medseg.transforms.phase import PhaseConfig, window_top_hu

    top = window_top_hu(PhaseConfig.from_dict(phases).targets)
    if normalization.get("kind") != "ct_window" or normalization["high_hu"] >= top:
        return dict(normalization)
    return {**normalization, "high_hu": float(top)}


def _class_spec(classes: Mapping[str, Any] | None):
    """The :class:`medseg.io.classes.ClassSpec` of a ``classes`` override (None: binary)."""
    if classes is None:
        return None
    return ClassSpec.from_dict(classes)
