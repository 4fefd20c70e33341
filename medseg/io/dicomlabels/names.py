"""Classes by segment / ROI name: ``--labels-map liver=Liver`` as well as ``liver=5``.

A DICOM SEG numbers its segments (and an RTSTRUCT its ROIs) per file: the liver may be segment 1 in
one file and segment 3 in the next, so a number does not name a class across a dataset; the name
does. A ``--labels-map`` entry whose right side is not integers is a list of names (comma-separated,
matched case-insensitively, surrounding spaces ignored; each of two characters or more, the first a letter:
``liver=x`` stays a malformed entry); each name gets a label id of its own from
:data:`NAMED_ID_BASE` up (the same name, the same id, within the process), and SEG / RTSTRUCT readers
then write that id for a segment or ROI of that name, and the segment number for any other.

Ids are given in the order names are first met, so the same ``--labels-map`` gives the same ids in
every command. Label maps read from NIfTI are unaffected (their values are whatever is stored).
"""

from __future__ import annotations

import re

__all__ = ["NAMED_ID_BASE", "named_ids", "named_id", "registered_names"]

#: The first label id given to a named class; far above segment numbers of real SEG files.
NAMED_ID_BASE = 1000
_IDS: dict[str, int] = {}
_NUMBERS = re.compile(r"^[\s\d,]*$")


def _key(name: str) -> str:
    return " ".join(str(name).split()).lower()


def named_ids(text: str) -> tuple[int, ...] | None:
    """The label ids of ``text`` when it lists segment/ROI names (``"Liver"``, ``"Liver,Liver Tumor"``),
    registering new names; None when ``text`` is integers (or empty): ``ClassSpec.parse`` reads those.

    Example:
        >>> named_ids("5") is None, named_ids("Liver") == named_ids(" liver ")
        (True, True)
    """
    if _NUMBERS.match(str(text)):
        return None
    names = [_key(part) for part in str(text).split(",")]
    if any(len(name) < 2 or not name[0].isalpha() for name in names):
        return None  # "liver=x", "liver=5x": a mistyped id more likely than a segment named so
    for name in names:
        _IDS.setdefault(name, NAMED_ID_BASE + len(_IDS))
    return tuple(dict.fromkeys(_IDS[name] for name in names))


def named_id(name: str) -> int | None:
    """The label id registered for segment / ROI ``name`` (case-insensitive), or None."""
    return _IDS.get(_key(name))


def registered_names() -> dict[str, int]:
    """Registered names (normalised: lower case, single spaces) -> label ids."""
    return dict(_IDS)
