#!/usr/bin/env python3
"""The README's napari screenshot, made from a viewer on the virtual display (not by hand).

    python scripts/napari_screenshot.py [--bundle RUN_DIR] [--budget-s 60] [--out docs/images/napari_patientB.png]

Opens patient B (File > Open Sample > medseg, the DICOM series and its liver reference),
segments it with the segment widget and a bundle (without ``--bundle``: one trained here on
patient A's liver with ``medseg-train --labels-map liver=5 --max-time-s BUDGET``), shows the
segmentation over the scan (filled, the class colour) on a slice through the liver with the
reference as a gold outline, and
saves ``viewer.screenshot`` of the whole window (the widget's per-class volume included),
palette-quantized to stay small. Re-executes itself under ``xvfb-run -a`` when there is no DISPLAY.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(run: Path, budget_s: float, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import liver_task

    data = liver_task.lay_out(work)
    subprocess.run([sys.executable, "-m", "medseg.cli.train", "--images", str(data / "imagesTr"), "--labels",
                    str(data / "labelsTr"), "--labels-map", "liver=5", "--run-dir", str(run), "--max-time-s",
                    str(budget_s), "--quiet"], check=True)


def shoot(bundle: Path, out: Path) -> None:
    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from medseg.napari.segment import SegmentWidget

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1100, 640)
    viewer.open_sample("medseg", "patient_b")
    reference = viewer.layers[1]
    reference.contour = 2
    reference.opacity = 1.0
    reference.colormap = {None: "transparent", 0: "transparent", 5: "#ffd700"}  # the outline: gold
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medseg: segment")
    widget.set_bundle(bundle)
    widget.image_layer = viewer.layers[0]
    widget.segment()
    app = QApplication.instance()
    while widget.running:
        app.processEvents()
        time.sleep(0.01)
    if widget.last_result.error:
        raise SystemExit(widget.last_result.error)
    widget.result_layer.opacity = 0.6
    data = np.asarray(reference.data)
    z = int(np.argmax(np.count_nonzero(data, axis=(1, 2))))  # the slice with the most liver
    viewer.dims.set_current_step(0, z)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(rgba[..., :3]).quantize(colors=128, dither=Image.Dither.NONE).save(out, optimize=True)
    viewer.close()
    print(f"{out} ({out.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", help="run folder to segment with (default: train one)")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "napari_patientB.png"))
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", sys.executable, *sys.argv])
    from npe2 import PluginManager

    PluginManager.instance().discover()
    with tempfile.TemporaryDirectory(prefix="medseg-shot-") as tmp:
        bundle = Path(args.bundle) if args.bundle else Path(tmp) / "run"
        if not args.bundle:
            train(bundle, args.budget_s, Path(tmp))
        shoot(bundle, Path(args.out))


if __name__ == "__main__":
    main()
