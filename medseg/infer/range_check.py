"""Is a scan like the ones the model was trained on? Compare it with the plan's training range.

The plan's fingerprint records what the training scans held (``fingerprint["training_range"]``,
written by :mod:`medseg.data.fingerprint`): slice and in-plane spacing, in-plane field of view,
the body's median intensity and each class's intensity percentiles. :func:`check_scan` measures
the same on one scan (each class inside the *predicted* mask, the only place the scan says where
the class is, and inside the body: predicted voxels in the air are the model's error) and returns
a :class:`RangeCheck`: structured findings a viewer can show, and one line a command prints. A bundle saved before the range was recorded gives a check with
``compared`` False and a ``reason``.

The tolerances (why it stays quiet on the scans of a training distribution):

- **Class intensities (CT)**: the class's 95th percentile (inside the predicted mask) above the
  highest 95th percentile of the training cases plus :data:`CLASS_MARGIN_HU`, or its 5th below the
  lowest 5th minus it. 100 HU covers what varies within one contrast phase (patients, scanners,
  kVp: the liver's 95th percentile is 67 HU in the liver task's non-contrast patient A and 117 HU
  in its contrast patient B, both read as liver), while a change of phase moves a vessel by more
  (aorta about 40 HU without contrast, 150-200 portal-venous, 300-550 arterial). Percentiles 5/95,
  not the extremes: a calcified vessel wall (the training aorta's 99.5th percentile reaches
  1000 HU) or a few wrongly predicted bone voxels do not move them.
- **Body median (CT)**: outside the training cases' range by more than :data:`BODY_MARGIN_HU`
  (150 HU: the median moves with the field of view and habitus, from fat to enhanced organs; a
  missing rescale intercept moves it by 1024).
- **Slice spacing**: more than :data:`SLICE_RATIO` (1.6) times beyond the training range. The
  2.5D network sees neighbouring slices at the scan's own spacing (slices are not resampled), so
  the spacing changes what the context holds; 2 mm slices on a 3 mm model (ratio 1.5) is the
  liver task's A to B, which scores well; 5 mm on 2-3 mm (1.67 or more) is not.
- **In-plane spacing**: coarser than :data:`INPLANE_RATIO` (4) times the training's coarsest. It is
  resampled to the plan's, so finer pixels lose nothing and coarser ones only detail: patient B's
  0.98 mm pixels on a model of A's 3 mm ones (and the reverse, 3.1x) segment well.
- **Field of view** (in-plane extent, mm): below half the smallest or above twice the largest.

Intensity rules apply to CT plans only (MR is z-scored per scan: no absolute scale to compare).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["RangeFinding", "RangeCheck", "check_scan", "report_range", "range_note", "training_range_of",
           "CLASS_MARGIN_HU", "BODY_MARGIN_HU", "SLICE_RATIO", "INPLANE_RATIO", "FOV_RATIO", "NO_RANGE_REASON"]

CLASS_MARGIN_HU = 100.0
BODY_MARGIN_HU = 150.0
SLICE_RATIO = 1.6
INPLANE_RATIO = 4.0
FOV_RATIO = 2.0
#: Predicted voxels a class needs before its intensities are compared.
MIN_CLASS_VOXELS = 50
NO_RANGE_REASON = ("the model bundle records no training range (saved before medseg recorded one): "
                   "scans are not compared with the training data")


@dataclass(frozen=True)
class RangeFinding:
    """One measure of the scan outside the training range.

    Attributes:
        what: ``"intensity"``, ``"slice_spacing"``, ``"inplane_spacing"`` or ``"field_of_view"``.
        subject: the class name, ``"body"``, or the measure's name.
        value: the scan's value (HU or mm).
        low, high: the training range (the same unit); one side may be None.
        unit: ``"HU"``, ``"mm"`` (or the modality's intensity unit).
        text: the finding as a person reads it.
    """

    what: str
    subject: str
    value: float
    low: float | None
    high: float | None
    unit: str
    text: str


@dataclass(frozen=True)
class RangeCheck:
    """The result of :func:`check_scan`: ``findings`` (empty: within range), ``compared`` (False
    when the plan records no training range; ``reason`` says why) and the scan's ``measured``
    values (for reports)."""

    source: str
    compared: bool
    findings: tuple[RangeFinding, ...] = ()
    reason: str = ""
    measured: Mapping[str, Any] = field(default_factory=dict)

    @property
    def out_of_range(self) -> bool:
        return bool(self.findings)

    def warning(self) -> str | None:
        """One line naming everything out of range, or None."""
        if not self.findings:
            return None
        return (f"{self.source}: warning: out of the training range: "
                + "; ".join(f.text for f in self.findings) + " (the segmentation may be unreliable)")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "compared": self.compared, "reason": self.reason,
                "out_of_range": self.out_of_range, "warning": self.warning(),
                "findings": [asdict(f) for f in self.findings], "measured": dict(self.measured)}


def range_note(plan: Any) -> str | None:
    """:data:`NO_RANGE_REASON` for a plan without a training range (say it once per run), else None."""
    return NO_RANGE_REASON if training_range_of(plan) is None else None


def training_range_of(plan: Any) -> dict | None:
    """The plan's recorded training range, or None (an older plan or bundle)."""
    fingerprint = getattr(plan, "fingerprint", None) or {}
    found = fingerprint.get("training_range")
    return found if isinstance(found, Mapping) and found.get("version") == 1 else None


def _mm(v: float) -> str:
    return f"{v:.3g} mm"


def _spacing_findings(spacing: np.ndarray, slice_axis: int, fov: np.ndarray, seen: Mapping) -> list[RangeFinding]:
    out = []
    inplane = [a for a in range(3) if a != slice_axis]
    lo, hi = seen["slice_spacing_mm"]
    s = float(spacing[slice_axis])
    if s > hi * SLICE_RATIO or s < lo / SLICE_RATIO:
        out.append(RangeFinding("slice_spacing", "slice spacing", s, lo, hi, "mm",
                                f"slices {_mm(s)} apart; the model saw {_range_text(lo, hi, 'mm')}"))
    lo, hi = seen["inplane_spacing_mm"]
    coarse = float(max(spacing[inplane]))
    if coarse > hi * INPLANE_RATIO:  # finer pixels are resampled to the plan's: nothing lost
        out.append(RangeFinding("inplane_spacing", "in-plane spacing", coarse, lo, hi, "mm",
                                f"in-plane pixels of {_mm(coarse)}; the model saw {_range_text(lo, hi, 'mm')}"))
    lo, hi = seen["inplane_fov_mm"]
    small, large = float(min(fov[inplane])), float(max(fov[inplane]))
    if small < lo / FOV_RATIO or large > hi * FOV_RATIO:
        value = small if small < lo / FOV_RATIO else large
        shown = " x ".join(f"{fov[a]:.0f}" for a in inplane)
        out.append(RangeFinding("field_of_view", "field of view", value, lo, hi, "mm",
                                f"an in-plane field of view of {shown} mm; the training scans covered "
                                f"{lo:.0f}-{hi:.0f} mm"))
    return out


def _range_text(lo: float, hi: float, unit: str) -> str:
    return f"{lo:.3g} {unit}" if abs(hi - lo) < 1e-6 else f"{lo:.3g}-{hi:.3g} {unit}"


def _class_finding(name: str, values: np.ndarray, seen: Mapping[str, float]) -> RangeFinding | None:
    """Like for like: the class's 95th (5th) percentile in the scan against the highest 95th
    (lowest 5th) of the training cases, so a training aorta's calcified wall (its 99.5th
    percentile reaches 1000 HU) does not hide a vessel enhanced by 300 HU."""
    p5, p95 = (float(v) for v in np.percentile(values, [5, 95]))
    if p95 > seen["p95"] + CLASS_MARGIN_HU:
        return RangeFinding("intensity", name, p95, seen["p5"], seen["p95"], "HU",
                            f"{name} intensities up to {p95:.0f} HU; the model saw up to {seen['p95']:.0f} HU "
                            "(95th percentiles)")
    if p5 < seen["p5"] - CLASS_MARGIN_HU:
        return RangeFinding("intensity", name, p5, seen["p5"], seen["p95"], "HU",
                            f"{name} intensities down to {p5:.0f} HU; the model saw down to {seen['p5']:.0f} HU "
                            "(5th percentiles)")
    return None


def check_scan(plan: Any, volume: Any, labels: Any = None, *, class_names: Sequence[str] | None = None,
               source: str | None = None) -> RangeCheck:
    """Compare ``volume`` with the training range of ``plan``.

    Args:
        plan: a :class:`medseg.data.plan.Plan` (a bundle's ``plan``).
        volume: the scan (:class:`medseg.io.Volume`).
        labels: its predicted label map (dataset label ids, as ``Predictor.segment`` writes them)
            on the scan's grid, or None: then classes are not compared.
        class_names: display names of the classes in plan order (a one-class plan without named
            classes records its class as ``"foreground"``; give the bundle's name for it).
        source: how the scan is named in the warning (default: its source path or case id).

    Returns:
        A :class:`RangeCheck`; ``compared`` False (no findings) when the plan records no range.
    """
    from medseg.data.fingerprint import FOREGROUND
    from medseg.transforms.intensity import CT_BODY_HU, body_mask
    from medseg.transforms.spatial import reorientation

    source = source or str(volume.meta.get("source_path") or volume.case_id or "<volume>")
    seen = training_range_of(plan)
    if seen is None:
        return RangeCheck(source, False, reason=NO_RANGE_REASON)
    reo = reorientation(volume.affine, volume.shape, plan.orientation)
    spacing = np.linalg.norm(reo.output_affine[:3, :3], axis=0)
    fov = np.asarray(reo.output_shape, dtype=np.float64) * spacing
    findings = _spacing_findings(spacing, plan.slice_axis, fov, seen)
    measured: dict[str, Any] = {"spacing_mm": [float(v) for v in spacing], "fov_mm": [float(v) for v in fov]}
    ct = str(plan.modality).upper() == "CT"
    array = np.asarray(volume.array)
    if ct and seen.get("body_median"):
        # Every k-th voxel along each axis (about 1M, not a copy of the scan): enough for a median.
        k = max(1, int(round((array.size / 1e6) ** (1 / 3))))
        sample = np.asarray(array[::k, ::k, ::k]).ravel()
        body = sample[body_mask(sample, "CT")]
        if body.size:
            median = float(np.median(body))
            measured["body_median"] = median
            lo, hi = seen["body_median"]
            if median > hi + BODY_MARGIN_HU or median < lo - BODY_MARGIN_HU:
                findings.append(RangeFinding("intensity", "body", median, lo, hi, "HU",
                                             f"a body median of {median:.0f} HU; the training scans' were "
                                             f"{lo:.0f} to {hi:.0f} HU"))
    if ct and labels is not None:
        findings += _class_findings(plan, array, np.asarray(labels.array), seen, class_names, measured, FOREGROUND,
                                    CT_BODY_HU)
    return RangeCheck(source, True, tuple(findings), measured=measured)


def _class_findings(plan, array: np.ndarray, labels: np.ndarray, seen: Mapping, class_names, measured: dict,
                    foreground: str, body_hu: float) -> list[RangeFinding]:
    """Each class's intensities inside its predicted mask and the body (above ``body_hu``; the
    training percentiles include every labelled voxel, but a label in the air is no organ)
    against its training percentiles."""
    spec = plan.class_spec if plan.classes else None  # binary plans: every nonzero label value
    if spec is None:
        keys, masks = [foreground], [lambda: labels > 0]
        shown = list(class_names or [foreground])[:1]
    else:
        keys = list(spec.names)
        masks = [lambda ids=ids: np.isin(labels, ids) for ids in spec.ids]
        shown = list(class_names or keys)
    out = []
    for key, name, mask_of in zip(keys, shown, masks):
        range_seen = (seen.get("classes") or {}).get(key)
        values = array[mask_of()]
        # Predicted voxels in the air around the body are the model's error, not the scan's intensities.
        values = values[values > body_hu]
        if range_seen is None or values.size < MIN_CLASS_VOXELS:
            continue
        measured.setdefault("class_percentiles", {})[name] = [float(v) for v in np.percentile(values, [5, 50, 95])]
        found = _class_finding(name, values, range_seen)
        if found is not None:
            out.append(found)
    return out


def report_range(predictor: Any, volume: Any, labels: Any, events: Any = None) -> RangeCheck | None:
    """:func:`check_scan` of ``volume`` and its predicted ``labels`` for ``predictor``'s bundle,
    told as an :class:`~medseg.events.OutOfRange` event (level ``warning``, on stderr) when out of
    range. Without a subscriber (``events`` None) nothing is checked and None is returned: training's
    validation segments its own cases that way each epoch; call :func:`check_scan` directly instead.
    Nothing is told for a bundle without a training range: say that once per run (:func:`range_note`)."""
    from medseg.events import OutOfRange, emit

    if events is None:
        return None
    check = check_scan(predictor.bundle.plan, volume, labels, class_names=predictor.class_names)
    if check.out_of_range:
        emit(events, OutOfRange(check.warning(), level="warning", stream="stderr", check=check.to_dict()))
    return check
