#!/usr/bin/env python3
"""Lay out the demo's sample datasets from real scans (nothing is converted by hand).

``--task liver`` (the default demo): two CT patients of the TotalSegmentator 2.18.0 source
archive (Apache-2.0), fetched once with ``pip download --no-deps --no-binary :all:
totalsegmentator==2.18.0`` into ``.cache/sdist`` (the package registry is the only host) and
checked by SHA-256, archive and files::

    OUT/imagesTr/patientA.nii.gz   non-contrast abdomen CT, 3 mm (NIfTI)
    OUT/labelsTr/patientA.nii.gz   its TotalSegmentator label map (117 classes; liver = 5)
    OUT/imagesTs/patientB/         contrast-enhanced CT, the 20-file DICOM series as shipped
    OUT/labelsTs/patientB.nii.gz   its label map, stored LAS while the DICOM is LPS

The label maps stay multi-class: the commands select the liver with ``--map-labels 5:1,*:0``.
``--from DIR`` takes the files from a folder holding them instead of the archive (the tests use
the copies in ``tests/data/totalsegmentator``).

``--task lesions`` (``MEDSEG_DEMO=lesions``): real MR/CT images with real lesion masks
(pyradiomics, BSD). The three small cases (brain1, brain2, breast1) ship in ``tests/data/nrrd``. The two chest CT
cases (lung1, lung2; 12 and 17 MB) are taken from the pyradiomics 3.0.1 source archive on PyPI,
fetched once with pip into ``.cache/`` (the only network access, to the package registry).
Every file is checked against its known SHA-256 before use.

Output (nnU-Net-like folders, identical names for image and label)::

    OUT/imagesTr/<case>.nrrd  OUT/labelsTr/<case>.nrrd   # training (and validation) cases
    OUT/imagesTs/<case>.nrrd  OUT/labelsTs/<case>.nrrd   # held-out test cases

Usage: ``python scripts/prepare_sample_data.py [--task liver|lesions] [--out DIR] [--no-download] [--from DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
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

TOTALSEG = "totalsegmentator==2.18.0"
TOTALSEG_ARCHIVE = "totalsegmentator-2.18.0.tar.gz"
TOTALSEG_ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
#: Files of ``tests/reference_files/`` in that archive, with their SHA-256.
TOTALSEG_SHA256 = {
    "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573": "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016574": "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016575": "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016576": "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016577": "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016578": "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016579": "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016580": "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016581": "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016582": "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016583": "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016584": "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016585": "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016586": "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016587": "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016588": "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016589": "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016590": "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016591": "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
    "example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016592": "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
    "example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
    "example_seg_fast_force_split.nii.gz": "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
}
#: (file in the archive, file or folder in the demo layout).
LIVER_LAYOUT = (
    ("example_ct.nii.gz", "imagesTr/patientA.nii.gz"),
    ("example_seg_fast_force_split.nii.gz", "labelsTr/patientA.nii.gz"),
    ("example_ct_dicom", "imagesTs/patientB"),
    ("example_seg_dicom.nii.gz", "labelsTs/patientB.nii.gz"),
)
#: TotalSegmentator's label of the liver, in both patients' maps.
LIVER_LABEL = 5

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_totalseg_files(folder: Path) -> None:
    """Every expected file of the liver task present in ``folder`` with its SHA-256."""
    for name, digest in TOTALSEG_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"sample data: {path} is missing (expected the {TOTALSEG} reference files)")
        if _sha256(path) != digest:
            raise SystemExit(f"sample data: {path} has an unexpected SHA-256 (expected {digest[:16]}..., "
                             f"found {_sha256(path)[:16]}...)")
    dicom = folder / "example_ct_dicom"
    extra = sorted(p.name for p in dicom.iterdir() if f"example_ct_dicom/{p.name}" not in TOTALSEG_SHA256)
    if extra:
        raise SystemExit(f"sample data: {dicom} holds files the {TOTALSEG} series does not: {', '.join(extra[:5])}")


@contextlib.contextmanager
def _staged_folder(target: Path):
    """A temporary sibling folder that replaces ``target`` when the block succeeds and is removed
    when it fails: ``target`` is never half made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_totalseg(download: bool) -> Path:
    """A folder holding the liver task's reference files, extracted once from the checked archive."""
    target = CACHE / "totalsegmentator_reference_files"
    try:
        _check_totalseg_files(target)
        return target
    except SystemExit:
        pass
    archive = CACHE / "sdist" / TOTALSEG_ARCHIVE
    if not archive.is_file():
        if not download:
            raise SystemExit(f"sample data: {archive} missing and --no-download given")
        (CACHE / "sdist").mkdir(parents=True, exist_ok=True)
        print(f"[data] fetching the {TOTALSEG} source archive from PyPI (38 MB, once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(CACHE / "sdist"), TOTALSEG], check=True)
    if _sha256(archive) != TOTALSEG_ARCHIVE_SHA256:
        raise SystemExit(f"sample data: {archive} has an unexpected SHA-256 (expected {TOTALSEG_ARCHIVE_SHA256[:16]}...)")
    with _staged_folder(target) as tmp:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) > 3 and parts[1:3] == ("tests", "reference_files") and member.isfile():
                    rel = "/".join(parts[3:])
                    if rel in TOTALSEG_SHA256:
                        dst = tmp / rel
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(dst, "wb") as out:
                            shutil.copyfileobj(src, out)
        _check_totalseg_files(tmp)
    return target


def prepare_liver(out: Path, source: Path) -> Path:
    """Lay out the liver task in ``out`` from ``source`` (a folder of the checked reference files).

    The files are copied byte for byte (the DICOM series stays the folder it is); the layout is
    made in a temporary sibling folder and renamed into place, so ``out`` is never half made.
    """
    _check_totalseg_files(source)
    out = Path(out)
    if out.is_dir() and all((out / dst).exists() for _, dst in LIVER_LAYOUT):
        return out  # laid out by an earlier run (idempotent)
    with _staged_folder(out) as tmp:
        for src, dst in LIVER_LAYOUT:
            (tmp / dst).parent.mkdir(parents=True, exist_ok=True)
            if (source / src).is_dir():
                shutil.copytree(source / src, tmp / dst)
            else:
                shutil.copyfile(source / src, tmp / dst)
    return out


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
    parser.add_argument("--task", choices=("liver", "lesions"), default="liver")
    parser.add_argument("--out", type=Path, help="default .cache/sample_data (lesions) or .cache/liver_data (liver)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of fetching the sdist")
    parser.add_argument("--from", dest="source", type=Path,
                        help="liver: take the reference files from this folder instead of the archive")
    args = parser.parse_args(argv)
    if args.task == "liver":
        source = args.source or _fetch_totalseg(not args.no_download)
        out = prepare_liver(args.out or CACHE / "liver_data", source)
        print(f"[data] liver task ready in {out} (train: patientA, non-contrast CT NIfTI; held out: patientB, "
              f"contrast-enhanced CT DICOM series; liver = label {LIVER_LABEL})")
        return 0
    out = prepare(args.out or CACHE / "sample_data", download=not args.no_download)
    print(f"[data] sample dataset ready in {out} (train: {', '.join(TRAIN_CASES)}; held out: {', '.join(TEST_CASES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
