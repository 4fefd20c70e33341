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
