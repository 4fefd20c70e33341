"""History table (``history.csv``) and training-curve figure (``curves.png``) of a run."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from medseg.io.atomic import atomic_path
from medseg.train.checkpoint import atomic_write_text

#: Columns shown first in history.csv, in this order (others follow alphabetically).
FIRST_COLUMNS = ("epoch", "case_id", "lr", "loss", "data_loss", "reg_loss", "dice", "val_dsc_3d", "val_hd95_mm", "time_s")


def write_history_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write one row per epoch; a metric missing from an epoch (no validation) is left empty.

    Args:
        rows: dicts of column -> number, in epoch order.
        path: output CSV path (written atomically).
    """
    columns = [c for c in FIRST_COLUMNS if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r} - set(columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def read_history_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """Read ``history.csv`` back into rows of floats (empty cells are left out)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    return value


def plot_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, dice_key: str = "dice",
                validation: str = "whole volumes", title: str = "Dice of the lesion class") -> Path:
    """Draw the training curves of a run into a PNG, atomically.

    Left panel: the training loss and its two parts, the data term (Dice + cross-entropy of the
    heads) and the regularization term (L2 penalty), which explains a loss above 1. Right panel:
    the training Dice (per patch, foreground) and the whole-volume 3D validation DSC, both on the
    same 0..1 axis, so it is visible that the metric moves while the loss falls.

    Args:
        rows: history rows (``epoch``, ``loss``, ``data_loss``, ``reg_loss``, ``dice``, ``val_dsc_3d``).
        path: output PNG path.
        dice_key: column of the training Dice.
        title: title of the Dice panel (a one-class run names its class).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            v = r.get(key)
            if v is not None and v != "" and math.isfinite(float(v)):
                xs.append(float(r["epoch"]))
                ys.append(float(v))
        return xs, ys

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    for key, label, style in (("loss", "total loss", "-"), ("data_loss", "data part (Dice + CE)", "--"),
                              ("reg_loss", "regularization part (L2)", ":"), ("val_loss", "validation loss", "-.")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, style, marker="." if len(xs) < 30 else None, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    for key, label in ((dice_key, "train Dice (patches)"), ("val_dsc_3d", f"validation 3D DSC ({validation})")):
        xs, ys = series(key)
        if xs:
            ax_dice.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax_dice.set_ylim(0.0, 1.0)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_title(title)
    ax_dice.grid(alpha=0.3)
    ax_dice.legend(fontsize=8)
    fig.tight_layout()

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
