"""Save a highdicom Segmentation: the bytes pydicom's ``save_as`` writes, in less time.

Nearly all of a many-frame SEG's elements lie in its sequences, whose items repeat: highdicom puts one
Source Image item per source image, one Plane Position per plane and one Derivation Code into every
frame of every segment (80 frames of 20 planes: each Source Image item 4 times, the code 80 times),
and the same UIDs again in the Referenced Series and Source Image Sequences. pydicom encodes each
occurrence again; here every sequence is encoded by :func:`_sequence_bytes`, each item object and each
scalar value once (pydicom's ``write_data_element`` for every non-sequence element; sequences and
items laid out as pydicom lays them out: explicit VR little endian, lengths defined unless the element
or item says undefined), and handed to ``save_as`` as raw elements, written as they stand.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = b"\xff\xff\xff\xff"
_CHARSET = 0x00080005  # (0008,0005) Specific Character Set
#: Value types whose value says all of an element's encoding (with its tag, VR and character sets).
_SCALARS = (str, int)


class _Unusual(Exception):
    """An element the encoder leaves to pydicom (an ambiguous VR): the whole save goes to pydicom."""


def save_seg(seg, path: Path) -> None:
    """``seg.save_as(path)``, the same bytes; ``seg`` is left as it was. Any transfer syntax but
    explicit VR little endian, or an ambiguous VR in a sequence, is saved by pydicom alone.

    The top level's own elements are still written by pydicom: its raw elements (copied from the
    source headers) decoded first and its ambiguous VRs corrected, as pydicom does for a dataset built
    in memory; then the dataset is marked as already in the file's encoding, so pydicom writes the
    encoded sequences as they are instead of decoding them again.
    """
    from pydicom.dataelem import RawDataElement

    syntax = seg.file_meta.TransferSyntaxUID
    sequences = {}
    if not syntax.is_implicit_VR and syntax.is_little_endian and hasattr(seg, "_character_set"):
        sequences = {tag: seg.get_item(tag) for tag in list(seg.keys()) if seg[tag].VR == "SQ"}
        try:
            with _values_checked_once():
                encodings, memo = _top_encodings(seg), {}
                encoded = {tag: _sequence_bytes(seg[tag].value, encodings, memo) for tag in sequences}
        except _Unusual:
            sequences = {}
    was = seg.original_encoding, seg.original_character_set
    for tag in sequences:
        del seg[tag]
    try:
        if sequences:
            _mark_encoded(seg)
        for tag in sequences:
            seg[tag] = RawDataElement(tag, "SQ", len(encoded[tag]), encoded[tag], 0, False, True)
        with _values_checked_once():
            seg.save_as(path)
    finally:
        seg.set_original_encoding(*was[0], was[1])
        for tag, element in sequences.items():
            seg[tag] = element


def _top_encodings(seg) -> list:
    """The character sets pydicom's writer passes to the top level's sequences."""
    from pydicom.charset import convert_encodings, default_encoding

    return convert_encodings(seg.get("SpecificCharacterSet", default_encoding) or [default_encoding])


def _sequence_bytes(items, encodings: list, memo: dict) -> bytes:
    """An SQ element's value: each item's tag, length (or undefined length and delimiter) and content;
    ``memo`` (one per save) holds what is encoded already."""
    return _Encoder(memo).sequence(items, encodings)


class _Encoder:
    """Encodes items and sequences, each item object and each scalar value once (``memo``)."""

    def __init__(self, memo: dict):
        from pydicom.charset import convert_encodings
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_data_element
        from pydicom.valuerep import AMBIGUOUS_VR

        self.memo, self.convert, self.buffer, self.write = memo, convert_encodings, DicomBytesIO, write_data_element
        self.ambiguous = AMBIGUOUS_VR

    def sequence(self, items, encodings: list) -> bytes:
        out, key = [], tuple(encodings)
        for item in items:
            body = self.memo.get((id(item), key))
            if body is None:
                body = self.item(item, encodings, key)
            if getattr(item, "is_undefined_length_sequence_item", False):
                out += [_ITEM, _UNDEFINED, body, _ITEM_END]
            else:
                out += [_ITEM, struct.pack("<I", len(body)), body]
        return b"".join(out)

    def item(self, item, encodings: list, key: tuple) -> bytes:
        """The encoded elements of one item, in tag order (group lengths left out, as pydicom does)."""
        elements = sorted(item.values(), key=_tag_of)
        if any(element.tag == _CHARSET for element in elements):
            encodings = self.convert(item.SpecificCharacterSet)
        own, parts = tuple(encodings), []
        for element in elements:
            tag = element.tag
            if not tag & 0xFFFF and tag >> 16 > 6:
                continue
            if element.is_raw:  # decoded, as pydicom's writer does for an item built in memory
                element = item[tag]
            vr, value = element.VR, element.value
            if vr in self.ambiguous:
                raise _Unusual(tag)
            if vr == "SQ":
                body = self.sequence(value, encodings)
                length = _UNDEFINED if element.is_undefined_length else struct.pack("<I", len(body))
                end = _SEQUENCE_END if element.is_undefined_length else b""
                parts += [struct.pack("<HH", tag >> 16, tag & 0xFFFF), b"SQ\x00\x00", length, body, end]
                continue
            scalar = (tag, vr, type(value), value, own) if type(value) in _SCALARS else None
            encoded = self.memo.get(scalar) if scalar is not None else None
            if encoded is None:
                fp = self.buffer()
                fp.is_little_endian, fp.is_implicit_VR = True, False
                self.write(fp, element, encodings)
                encoded = fp.getvalue()
                if scalar is not None:
                    self.memo[scalar] = encoded
            parts.append(encoded)
        self.memo[(id(item), key)] = body = b"".join(parts)
        return body


def _tag_of(element) -> int:
    return element.tag


def _mark_encoded(seg) -> None:
    """Decode ``seg``'s raw elements, correct its ambiguous VRs and mark it as already in the file's
    encoding (explicit VR little endian, its own character set), so pydicom writes it as it stands."""
    from pydicom.filewriter import correct_ambiguous_vr

    for _ in seg:  # iterating decodes raw elements
        pass
    correct_ambiguous_vr(seg, True)
    seg.set_original_encoding(False, True, seg._character_set)


@contextlib.contextmanager
def _values_checked_once():
    """pydicom re-validates every value while writing; highdicom validated them when it built the
    dataset, and the second pass is a tenth of the write time of a many-frame SEG."""
    from pydicom import config

    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = mode
