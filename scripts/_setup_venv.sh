# Sourced by scripts/demo and scripts/test: create or update .venv in the repo root.
# Re-installs only when pyproject.toml (or the extras asked for) changed, so a second run is fast.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then echo "medseg: need python3 (>= 3.10) on PATH" >&2; exit 1; fi
"$PY" - <<'PYEOF' || { echo "medseg: Python >= 3.10 is required" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.medseg-installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing medseg${EXTRAS:+[$EXTRAS]} into $VENV (first time: a few minutes, TensorFlow is ~2 GB)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# dciodvfy (Debian package dicom3tools) checks the DICOM SEG / RTSTRUCT that medseg writes against
# their IODs in tests/test_dicom_seg.py. Installed here when we are root with apt (CI, containers);
# that test fails if apt exists but dciodvfy does not, and skips only where apt-get is absent.
if [[ "$EXTRAS" == *test* ]] && ! command -v dciodvfy >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing dicom3tools (dciodvfy) from Debian"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q dicom3tools >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q dicom3tools >/dev/null; } \
            || echo "[setup] warning: could not install dicom3tools; the dciodvfy test will fail" >&2
    else
        echo "[setup] note: dciodvfy is missing: 'sudo apt-get install dicom3tools' (the DICOM SEG test needs it)" >&2
    fi
fi
# The napari plugin's GUI tests (tests/napari) need a virtual X display and the libraries Qt's xcb
# platform loads: Xvfb (started by pytest-xvfb) and the libxcb/xkb/GL packages below. Installed here
# when we are root with apt (CI, containers); without them those tests fail saying what is missing.
NAPARI_APT="xvfb libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libdbus-1-3 libfontconfig1"
if [[ "$EXTRAS" == *test* ]] && { ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libxcb-cursor; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Xvfb and Qt's xcb libraries from Debian (napari GUI tests)"
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        apt-get install -y -q $NAPARI_APT >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q $NAPARI_APT >/dev/null; } \
            || echo "[setup] warning: could not install Xvfb and the xcb libraries; the napari GUI tests will fail" >&2
    else
        echo "[setup] note: the napari GUI tests need: sudo apt-get install $NAPARI_APT" >&2
    fi
fi
