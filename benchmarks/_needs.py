"""The modules a benchmark needs, checked before any work (not after minutes of it).

    from _needs import require   # benchmarks/ is on sys.path when a benchmark runs as a script
    require("psutil", "medpy")   # exits 2 with one line naming the missing ones and the fix
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def missing_modules(*modules: str) -> list[str]:
    """The names among ``modules`` that cannot be imported (found without importing them)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            missing.append(name)
    return missing


def install_command() -> str:
    """The one command that installs the benchmark dependencies (the ``bench`` extra) into the
    interpreter running now: the README's ``.venv/bin/pip`` when it is the repository's .venv."""
    here = Path.cwd().resolve() == REPO
    target = "." if here else str(REPO)
    venv = REPO / ".venv"
    if Path(sys.prefix).resolve() == venv.resolve():
        pip = ".venv/bin/pip" if here else str(venv / "bin" / "pip")
    else:
        pip = f"{sys.executable} -m pip"
    return f"{pip} install -e '{target}[bench]'"


def require(*modules: str) -> None:
    """Exit with status 2 and one line on stderr when any of ``modules`` is not installed."""
    missing = missing_modules(*modules)
    if missing:
        s = "s" if len(missing) > 1 else ""
        print(f"{Path(sys.argv[0]).name}: missing module{s} {', '.join(missing)}; install with: {install_command()}",
              file=sys.stderr)
        raise SystemExit(2)
