"""The napari GUI tests (gui_widgets.py: segment and evaluate; gui_finetune.py: the fine-tune
loop), each run in a pytest process of its own.

The viewer's OpenGL context (Mesa's libLLVM) and TensorFlow's LLVM cannot share a process
(medseg/napari/predict_process.py), and this suite imports TensorFlow in most files: the GUI
tests run in a child pytest that imports none, on the virtual display (pytest-xvfb). Its output
is shown on failure; a missing display fails there, loudly (conftest's ``display`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("module, timeout_s", [("gui_widgets.py", 1500), ("gui_finetune.py", 1800)])
def test_napari_gui(plugin, module, timeout_s):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-m", "pytest", str(HERE / module), "-q", "-p", "xvfb",
                          "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
                         capture_output=True, text=True, cwd=HERE.parents[1], env=env, timeout=timeout_s)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "skipped" not in out.stdout.split("\n")[-2], tail
