"""A fast path for the commonest DICOM file: uncompressed little endian, one frame.

Why this exists: parsing a CT header with ``pydicom.dcmread`` and reading the
values :mod:`medssl.dicom.reading` checks costs about 2.5 ms per file, and decoding the
pixels costs another full parse plus ``pixel_array``; that alone made the
conversion several times slower than ``dcm2niix`` (bench/README.md). Archives
are dominated by files that need none of pydicom's generality, so for those this
module walks the data elements with :mod:`struct` (about 0.15 ms), keeps only
the tags conversion uses, and remembers where the pixel data starts, so that
the pixel pass is one ``read`` into an array.

It is deliberately narrow: a file is taken only when it has the Part 10
preamble, Explicit or Implicit VR Little Endian, a single frame of 8- or 16-bit
MONOCHROME samples in a (7FE0,0010) element of defined length, and every tag of
interest decodes as plain ASCII. Anything else (compressed, deflated or big
endian syntaxes, Enhanced multi-frame, other character sets, odd encodings,
damaged files) returns ``None`` and goes through pydicom, which stays the
reference: tests check that both paths give the same headers and pixels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Transfer syntaxes whose pixel data is stored as plain little-endian samples.
NATIVE_LITTLE_ENDIAN = {
    "1.2.840.10008.1.2": True,  # Implicit VR Little Endian (value: is implicit)
    "1.2.840.10008.1.2.1": False,  # Explicit VR Little Endian
}
#: Explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
#: Bytes read first (CT headers are typically 1-10 kB); a header that does not
#: end inside them is read again with the whole file.
_FIRST_READ = 1 << 14

#: The tags conversion uses: keyword, and how the value is decoded ("text" is
#: one string, "texts" a backslash-separated list, as pydicom gives them).
_TAGS: dict[int, tuple[str, str]] = {
    0x00080005: ("SpecificCharacterSet", "texts"),
    0x00080008: ("ImageType", "texts"),
    0x00080016: ("SOPClassUID", "text"),
    0x00080018: ("SOPInstanceUID", "text"),
    0x00080060: ("Modality", "text"),
    0x00100020: ("PatientID", "text"),
    0x00180050: ("SliceThickness", "ds"),
    0x00180088: ("SpacingBetweenSlices", "ds"),
    0x00181164: ("ImagerPixelSpacing", "ds"),
    0x0020000D: ("StudyInstanceUID", "text"),
    0x0020000E: ("SeriesInstanceUID", "text"),
    0x00200013: ("InstanceNumber", "is"),
    0x00200032: ("ImagePositionPatient", "ds"),
    0x00200037: ("ImageOrientationPatient", "ds"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280004: ("PhotometricInterpretation", "text"),
    0x00280008: ("NumberOfFrames", "is"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280030: ("PixelSpacing", "ds"),
    0x00280100: ("BitsAllocated", "us"),
    0x00280101: ("BitsStored", "us"),
    0x00280103: ("PixelRepresentation", "us"),
    0x00280120: ("PixelPaddingValue", "xs"),
    0x00280121: ("PixelPaddingRangeLimit", "xs"),
    0x00281052: ("RescaleIntercept", "ds"),
    0x00281053: ("RescaleSlope", "ds"),
}


class _NotSimple(Exception):
    """The file needs pydicom: any reason, since pydicom then says what is wrong."""


@dataclass(frozen=True)
class PixelLayout:
    """Where one frame of native little-endian samples lies in its file, and how to read it."""

    offset: int  # byte offset of the first sample
    dtype: str  # numpy dtype of the samples as stored ("<u2", "<i2", "u1", "i1")
    bits_stored: int

    @property
    def nbytes_per_pixel(self) -> int:
        return np.dtype(self.dtype).itemsize


class RawHeader:
    """The decoded tags of one file, answering ``get``/attribute access like a pydicom
    Dataset does for them, so the same screening code serves both paths."""

    def __init__(self, values: dict[str, Any], pixels: PixelLayout) -> None:
        self._values = values
        self.pixels = pixels

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self.__dict__["_values"][keyword]
        except KeyError:
            raise AttributeError(keyword) from None


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, explicit VR or None, value length, header size) of the element at ``pos``."""
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE:  # item and delimiters carry no VR in any syntax
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], 8
    if implicit:
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], 8
    vr = buf[pos + 4 : pos + 6]
    if len(vr) != 2 or not vr.isalpha() or not vr.isupper():
        raise _NotSimple(f"bad VR {vr!r}")
    if vr in _LONG_VRS:
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], 12
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``."""
    while True:
        tag, _, length, size = _element(buf, pos, implicit)
        pos += size
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _NotSimple("sequence without items")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: elements up to the item delimiter
            tag, vr, length, size = _element(buf, pos, implicit)
            pos += size
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                if vr == b"UN":  # implicit VR sequence inside explicit VR: rare, use pydicom
                    raise _NotSimple("UN sequence")
                pos = _skip_sequence(buf, pos, implicit)
            else:
                pos += length


def _decode(kind: str, raw: bytes, vr: bytes | None) -> Any:
    """One value the way pydicom presents it; single values unwrapped, lists otherwise."""
    if vr is not None and (kind in ("us", "xs")) != (vr in (b"US", b"SS")):
        raise _NotSimple(f"unexpected VR {vr!r}")  # pydicom decodes by the VR given
    if kind in ("us", "xs"):
        if len(raw) != 2:
            raise _NotSimple("multi-valued or odd US")
        return raw  # decoded once PixelRepresentation is known (US or SS)
    text = raw.decode("ascii").rstrip("\x00 ")  # UnicodeDecodeError: pydicom decodes
    if text and min(text) < " ":
        raise _NotSimple("control characters")  # e.g. ISO 2022 escapes
    if not text.strip():
        return ""  # what pydicom gives for an empty string or number, and what convert checks
    parts = [p.strip() for p in text.split("\\")]
    if any(not p for p in parts):
        raise _NotSimple("empty value inside a list")
    if kind == "text":
        return text.strip()
    if kind == "texts":
        return parts[0] if len(parts) == 1 else parts
    try:
        numbers = [float(p) for p in parts] if kind == "ds" else [int(p) for p in parts]
    except ValueError as err:
        raise _NotSimple(str(err)) from err
    return numbers[0] if len(numbers) == 1 else numbers


_EXPLICIT = struct.Struct("<I2sH")  # tag (group, element as one LE word pair), VR, short length
_IMPLICIT = struct.Struct("<II")  # tag, length
_LONG = struct.Struct("<I")


def _parse(buf: bytes) -> tuple[dict[str, Any], dict[str, bytes | None], int, int] | None:
    """(values, explicit VRs, pixel offset, pixel length); None when more bytes are needed.

    The loop is written out (one ``unpack_from`` per element, no call per
    element) because it runs for every element of every file; sequences are
    rare and go through :func:`_skip_sequence`.
    """
    if buf[128:132] != b"DICM":
        raise _NotSimple("no preamble")
    pos, implicit, syntax = 132, False, None
    values: dict[str, Any] = {}
    raw_vrs: dict[str, bytes | None] = {}
    in_meta = True
    end = len(buf)
    try:
        while True:
            if pos + 8 > end:
                return None
            if implicit:
                word, length = _IMPLICIT.unpack_from(buf, pos)
                vr = None
                pos += 8
            else:
                word, vr, length = _EXPLICIT.unpack_from(buf, pos)
                if in_meta and word & 0xFFFF != 0x0002:
                    in_meta = False
                    if syntax not in NATIVE_LITTLE_ENDIAN:
                        raise _NotSimple(f"transfer syntax {syntax}")
                    if NATIVE_LITTLE_ENDIAN[syntax]:
                        implicit = True
                        continue  # re-read this element as implicit VR
                if vr in _LONG_VRS:
                    length = _LONG.unpack_from(buf, pos + 8)[0]
                    pos += 12
                elif vr.isalpha() and vr.isupper():
                    pos += 8
                else:
                    raise _NotSimple(f"bad VR {vr!r}")
            tag = ((word & 0xFFFF) << 16) | (word >> 16)
            if tag == _PIXEL_DATA:
                if length == _UNDEFINED:
                    raise _NotSimple("encapsulated pixel data")
                return values, raw_vrs, pos, length
            if tag >> 16 in (0x7FE0, 0xFFFE):
                raise _NotSimple("other pixel data element")
            if length == _UNDEFINED:
                if vr == b"UN":
                    raise _NotSimple("UN sequence")
                pos = _skip_sequence(buf, pos, implicit)
                continue
            if pos + length > end:
                return None
            if tag in _TAGS:
                keyword, kind = _TAGS[tag]
                values[keyword] = _decode(kind, buf[pos : pos + length], vr)
                raw_vrs[keyword] = vr
            elif tag == 0x00020010:
                syntax = buf[pos : pos + length].decode("ascii", "replace").rstrip("\x00 ")
            pos += length
    except struct.error as err:  # ran off the buffer inside a sequence
        if len(buf) < _FIRST_READ:
            raise _NotSimple("truncated header") from err
        return None


def _short(raw: bytes, signed: bool) -> int:
    return struct.unpack("<h" if signed else "<H", raw)[0]


def read_raw_header(path: str) -> RawHeader | None:
    """The fast header of a simple file (see the module docstring), or ``None``."""
    try:
        with open(path, "rb") as handle:
            buf = handle.read(_FIRST_READ)
            parsed = _parse(buf)
            if parsed is None and len(buf) == _FIRST_READ:
                buf += handle.read()
                parsed = _parse(buf)
            size = handle.seek(0, 2)
    except (_NotSimple, OSError, UnicodeDecodeError):
        return None
    if parsed is None:
        return None
    values, vrs, offset, length = parsed
    for keyword in ("SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored"):
        if keyword in values:
            values[keyword] = _short(values[keyword], signed=False)
    signed = _short(values.get("PixelRepresentation", b"\x00\x00"), False) == 1
    values["PixelRepresentation"] = int(signed)
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        if keyword in values:  # "US or SS": the explicit VR decides, else PixelRepresentation
            vr = vrs.get(keyword)
            values[keyword] = _short(values[keyword], vr == b"SS" if vr else signed)
    bits = values.get("BitsAllocated")
    stored = values.get("BitsStored", bits)
    frames = values.get("NumberOfFrames", 1)
    photometric = values.get("PhotometricInterpretation")
    if (
        bits not in (8, 16)
        or not isinstance(stored, int)
        or not 1 <= stored <= bits
        or frames != 1
        or values.get("SamplesPerPixel", 1) != 1
        or photometric not in ("MONOCHROME1", "MONOCHROME2")
        or not isinstance(values.get("Rows"), int)
        or not isinstance(values.get("Columns"), int)
    ):
        return None
    needed = values["Rows"] * values["Columns"] * bits // 8
    if length > size - offset or length < needed:
        # Cut short, or an element too short for its frame: pydicom's path
        # names the byte counts in the rejection.
        return None
    dtype = ("<i2" if signed else "<u2") if bits == 16 else ("i1" if signed else "u1")
    return RawHeader(values, PixelLayout(offset, dtype, stored))


def read_raw_pixels(path: str, layout: PixelLayout, rows: int, columns: int) -> np.ndarray:
    """One frame's stored values, masked to BitsStored as pydicom's ``pixel_array`` is.

    Raises ``ValueError("truncated pixel data ...")`` when the file ends early.
    """
    count = rows * columns
    expected = count * layout.nbytes_per_pixel
    stored = np.empty((rows, columns), dtype=layout.dtype)
    with open(path, "rb", buffering=0) as handle:  # unbuffered: straight into the array
        handle.seek(layout.offset)
        got = handle.readinto(memoryview(stored).cast("B"))
    if got < expected:
        raise ValueError(f"truncated pixel data ({got} of {expected} bytes)")
    bits = np.dtype(layout.dtype).itemsize * 8
    if layout.bits_stored < bits:
        shift = bits - layout.bits_stored
        if stored.dtype.kind == "i":  # sign-extend from the top stored bit
            stored = (stored << shift) >> shift
        else:
            stored = stored & ((1 << layout.bits_stored) - 1)
    return stored
