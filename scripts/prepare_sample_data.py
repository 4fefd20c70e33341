#!/usr/bin/env python3
"""Lay out the demo's sample dataset: real MR/CT images with real lesion masks (pyradiomics, BSD).

The three small cases (brain1, brain2, breast1) ship in ``tests/data/nrrd``. The two chest CT
cases (lung1, lung2; 12 and 17 MB) are taken from the pyradiomics 3.0.1 source archive on PyPI,
fetched once with pip into ``.cache/`` (the only network access, to the package registry).
Every file is checked against its known SHA-256 before use.

Output (nnU-Net-like folders, identical names for image and label)::

    OUT/imagesTr/<case>.nrrd  OUT/labelsTr/<case>.nrrd   # training (and validation) cases
    OUT/imagesTs/<case>.nrrd  OUT/labelsTs/<case>.nrrd   # held-out test cases

Usage: ``python scripts/prepare_sample_data.py [--out .cache/sample_data] [--no-download]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "tests" / "data" / "nrrd"
CACHE = ROOT / ".cache"
SDIST = "pyradiomics==3.0.1"

# sha256 prefixes from shared/data/MANIFEST.md (first 16 hex digits).
SHA256_PREFIX = {
    "brain1_image.nrrd": "fffdb111ee8b428e",
    "brain1_label.nrrd": "ae6d8e6b84f7e99d",
    "brain2_image.nrrd": "d35a1c6a3e1eb72b",
    "brain2_label.nrrd": "15189c024936ecc3",
    "breast1_image.nrrd": "0e8b668f3ce9b9aa",
    "breast1_label.nrrd": "07085bb0e36a956d",
    "lung1_image.nrrd": "379fa48bf34cfa96",
    "lung1_label.nrrd": "e9d9a88054d7bc1d",
    "lung2_image.nrrd": "aa2b94eec79127ed",
    "lung2_label.nrrd": "cef52738dc51aab6",
}
# Held-out cases: never seen in training. One MR brain lesion and one CT lung nodule.
TEST_CASES = ("brain2", "lung1")
TRAIN_CASES = ("brain1", "breast1", "lung2")


def _sha_ok(path: Path) -> bool:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest.startswith(SHA256_PREFIX[path.name])


def _fetch_lung_cases(download: bool) -> Path:
    """Return a folder holding lung{1,2}_{image,label}.nrrd, extracting them from the sdist once."""
    target = CACHE / "pyradiomics_data"
    names = [f"lung{i}_{kind}.nrrd" for i in (1, 2) for kind in ("image", "label")]
    if all((target / n).is_file() and _sha_ok(target / n) for n in names):
        return target
    archives = sorted((CACHE / "sdist").glob("pyradiomics-3.0.1.tar.gz"))
    if not archives:
        if not download:
            raise SystemExit("sample data: lung cases missing and --no-download given")
        (CACHE / "sdist").mkdir(parents=True, exist_ok=True)
        # The 3.0.1 sdist needs numpy to build its metadata, hence --no-build-isolation; plain
        # `pip download pyradiomics` fails because the 3.1.0 archive's metadata says 3.0.1a1.
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-d", str(CACHE / "sdist"), SDIST]
        print("[data] fetching the pyradiomics 3.0.1 source archive from PyPI (34 MB, once)", flush=True)
        subprocess.run(cmd, check=True)
        archives = sorted((CACHE / "sdist").glob("pyradiomics-3.0.1.tar.gz"))
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
    try:
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in names and member.name.endswith(f"data/{name}"):
                    with tar.extractfile(member) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for n in names:
            if not (tmp / n).is_file() or not _sha_ok(tmp / n):
                raise SystemExit(f"sample data: {n} missing or with an unexpected checksum in {archives[0]}")
        target.mkdir(parents=True, exist_ok=True)
        for n in names:
            os.replace(tmp / n, target / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare(out: Path, download: bool = True) -> Path:
    lung_dir = _fetch_lung_cases(download)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case in TRAIN_CASES + TEST_CASES:
        src_dir = lung_dir if case.startswith("lung") else SHIPPED
        split = "Ts" if case in TEST_CASES else "Tr"
        for kind, folder in (("image", f"images{split}"), ("label", f"labels{split}")):
            src = src_dir / f"{case}_{kind}.nrrd"
            if not _sha_ok(src):
                raise SystemExit(f"sample data: {src} has an unexpected checksum")
            dst = out / folder / f"{case}.nrrd"
            if not dst.exists():
                shutil.copyfile(src, dst)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CACHE / "sample_data")
    parser.add_argument("--no-download", action="store_true", help="fail instead of fetching the sdist")
    args = parser.parse_args(argv)
    out = prepare(args.out, download=not args.no_download)
    print(f"[data] sample dataset ready in {out} (train: {', '.join(TRAIN_CASES)}; held out: {', '.join(TEST_CASES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
