"""Classes by segment / ROI name: ``--labels-map liver=Liver`` as well as ``liver=5``.

A DICOM SEG numbers its segments (and an RTSTRUCT its ROIs) per file: the liver may be segment 1 in
one file and segment 3 in the next, so a number does not name a class across a dataset; the name
does. A ``--labels-map`` entry whose right side is not integers is a list of names (comma-separated,
matched case-insensitively, surrounding spaces ignored; each of two characters or more, the first a letter:
``liver=x`` stays a malformed entry); each name gets a label id of its own in
``[NAMED_ID_BASE, NAMED_ID_BASE + NAMED_ID_SPAN)``, and SEG / RTSTRUCT readers then write that id for
a segment or ROI of that name, and the segment number for any other.

A name's id is a pure function of the name (CRC-32 of its normal form), never of the order names
were met: a bundle trained with ``liver=Liver`` in one process and scored with ``--labels-map
spleen=Spleen liver=Liver`` in another agree on every id. Two names of one entry that would share
an id are refused. What the process remembers is only which names were asked for (so a reader
translates those and leaves other segments at their numbers). Label maps read from NIfTI are
unaffected (their values are whatever is stored).
"""

from __future__ import annotations

import re
import zlib

__all__ = ["NAMED_ID_BASE", "NAMED_ID_SPAN", "id_of_name", "named_ids", "named_id", "registered_names"]

#: The first label id given to a named class; far above segment numbers of real SEG files.
NAMED_ID_BASE = 1000
#: How many ids names draw from: ``NAMED_ID_BASE + NAMED_ID_SPAN`` stays within uint16 label maps.
NAMED_ID_SPAN = 64000
_IDS: dict[str, int] = {}
_NUMBERS = re.compile(r"^[\s\d,]*$")


def _key(name: str) -> str:
    return " ".join(str(name).split()).lower()


def id_of_name(name: str) -> int:
    """The label id of segment / ROI ``name`` (case and spacing ignored): a pure function of it."""
    return NAMED_ID_BASE + zlib.crc32(_key(name).encode("utf-8")) % NAMED_ID_SPAN


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
    ids = {name: id_of_name(name) for name in names}
    clash = [(a, b) for i, a in enumerate(ids) for b in list(ids)[i + 1:] if ids[a] == ids[b]]
    if clash:
        raise ValueError(f"segment names {clash[0][0]!r} and {clash[0][1]!r} share the label id {ids[clash[0][0]]}; "
                         "name one of them by its segment number instead")
    _IDS.update(ids)
    return tuple(dict.fromkeys(ids.values()))


def named_id(name: str) -> int | None:
    """The label id registered for segment / ROI ``name`` (case-insensitive), or None."""
    return _IDS.get(_key(name))


def registered_names() -> dict[str, int]:
    """Registered names (normalised: lower case, single spaces) -> label ids."""
    return dict(_IDS)
