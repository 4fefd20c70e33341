"""Fixtures of the napari plugin's tests: the plugin found through its entry point, patient data,
a tiny bundle trained here, and the virtual display the GUI tests need.

The plugin is found as napari finds it (npe2 discovery of the ``napari.manifest`` entry point):
a medseg installed without it (an editable install made before the entry point existed) fails
here with the command that fixes it. GUI tests need an X display: pytest-xvfb starts Xvfb; when
it cannot (``Xvfb`` missing), they fail saying so, never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
PATIENT = DATA / "totalsegmentator"


def _discover_plugin():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    if "medseg" not in {m.name for m in pm.iter_manifests()}:
        pytest.fail("npe2 finds no 'medseg' plugin: the installed medseg lacks the napari.manifest entry point; "
                    f"reinstall it: pip install -e '{REPO}[napari,test]'", pytrace=False)
    return pm


@pytest.fixture(scope="session")
def plugin():
    """npe2's plugin manager with medseg discovered through its entry point."""
    return _discover_plugin()


@pytest.fixture(scope="session")
def liver_data(tmp_path_factory) -> Path:
    """The liver task laid out as the benchmarks do (imagesTr/, labelsTr/, imagesTs/patientB/, labelsTs/)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import liver_task
    finally:
        sys.path.pop(0)
    return liver_task.lay_out(tmp_path_factory.mktemp("liver"))


def tf_job(*args, timeout_s: float = 900) -> None:
    """Run ``tests/napari/_tf_jobs.py`` in a child process (TensorFlow never loads in a process
    that holds a napari viewer's OpenGL context: medseg/napari/predict_process.py says why)."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_tf_jobs.py")), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_liver_bundle(liver_data, tmp_path_factory) -> Path:
    """A bundle trained on patient A's liver (``liver=5``) for a few steps, by the library in a
    child process: a real bundle, quick, not a good model (the tests check the plumbing)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    tf_job("train", liver_data, run)
    assert (run / "bundle.json").is_file()
    return run


@pytest.fixture()
def display():
    """Fail (never skip) when no X display is there for Qt (pytest-xvfb starts Xvfb)."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        xvfb = shutil.which("Xvfb")
        pytest.fail("no X display for the napari GUI tests: " + ("pytest-xvfb did not start Xvfb" if xvfb else
                    "Xvfb is not installed (apt-get install xvfb and the libxcb packages scripts/_setup_venv.sh "
                    "installs)"), pytrace=False)
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.fail("QT_QPA_PLATFORM=offscreen cannot create napari's OpenGL canvas; unset it (Xvfb is used)",
                    pytrace=False)
