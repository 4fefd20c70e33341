"""The fine-tune widget's GUI tests (gui_finetune.py), in a pytest process of their own on the
virtual display, as test_gui.py runs the other widgets' (no TensorFlow next to the viewer's OpenGL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_napari_finetune_gui(plugin):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-m", "pytest", str(HERE / "gui_finetune.py"), "-q", "-p", "xvfb",
                          "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
                         capture_output=True, text=True, cwd=HERE.parents[1], env=env, timeout=1800)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "skipped" not in out.stdout.split("\n")[-2], tail
