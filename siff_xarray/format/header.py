"""The file header: TIFF/BigTIFF preamble plus ScanImage's header block.

Layout (little-endian only; see ``docs/format.md``)::

    BigTIFF : "II" 43 8 0 | u64 first IFD | u32 magic u32 version u32 nvfd_len u32 roi_len | text
    classic : "II" 42     | u32 first IFD | u32 magic u32 version u32 nvfd_len u32 roi_len | text

The two texts are the non-varying frame data (NVFD, ScanImage's ``key = value``
settings dump) and the ROI-group JSON.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import SiffFormatError
from .constants import SCANIMAGE_MAGIC

__all__ = ["SCANIMAGE_MAGIC", "FileHeader", "read_header"]

SUPPORTED_VERSIONS = (3, 4)
#: Refuse header texts longer than this (ScanImage headers are tens of kB).
MAX_TEXT_BYTES = 256 * 2**20


class ByteReader(Protocol):
    """What reading the header needs of a byte source (the reader's sources are ones)."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset`` (fewer at the end of the file)."""
        ...


@dataclass(frozen=True)
class FileHeader:
    """What the fixed header of a ScanImage (FLIM) TIFF says.

    Attributes
    ----------
    bigtiff
        True for BigTIFF (magic 43, 8-byte offsets), False for classic TIFF (42).
    scanimage_version
        ScanImage TIFF-format version from the header (3 or 4).
    first_ifd
        Byte offset of the first IFD.
    nvfd_text
        Raw non-varying frame data (ScanImage settings dump), decoded as Latin-1.
    roi_text
        Raw ROI-group JSON text, decoded as Latin-1.
    header_end
        First byte after the header block (no IFD may start before it).
    file_size
        Size of the file in bytes.

    """

    bigtiff: bool
    scanimage_version: int
    first_ifd: int
    nvfd_text: str
    roi_text: str
    header_end: int
    file_size: int

    @property
    def offset_size(self) -> int:
        """Bytes per offset: 8 for BigTIFF, 4 for classic TIFF."""
        return 8 if self.bigtiff else 4


def read_header(source: ByteReader) -> FileHeader:
    """Parse and validate the header of ``source``.

    Raises
    ------
    SiffFormatError
        Not a little-endian TIFF, not a ScanImage file, unsupported version or
        a header block cut short.

    """
    name = source.name
    head = source.read(0, 32)
    if len(head) < 8:
        raise SiffFormatError(name, f"file is only {source.size} bytes long; not a TIFF file", 0)
    order = head[:2]
    if order == b"MM":
        raise SiffFormatError(
            name, "big-endian TIFF ('MM'); ScanImage writes little-endian files only", 0
        )
    if order != b"II":
        raise SiffFormatError(name, f"not a TIFF file (starts with {head[:4]!r})", 0)
    (magic,) = struct.unpack_from("<H", head, 2)
    if magic == 43:
        if len(head) < 32:
            raise SiffFormatError(name, "file ends inside the BigTIFF/ScanImage header", len(head))
        offsize, reserved, first_ifd = struct.unpack_from("<HHQ", head, 4)
        if offsize != 8 or reserved != 0:
            raise SiffFormatError(
                name, f"invalid BigTIFF header (offset size {offsize}, reserved {reserved})", 4
            )
        si_at = 16
    elif magic == 42:
        if len(head) < 24:
            raise SiffFormatError(name, "file ends inside the TIFF/ScanImage header", len(head))
        (first_ifd,) = struct.unpack_from("<I", head, 4)
        si_at = 8
    else:
        raise SiffFormatError(name, f"not a TIFF file (TIFF magic number {magic})", 2)
    si_magic, version, nvfd_len, roi_len = struct.unpack_from("<IIII", head, si_at)
    if si_magic != SCANIMAGE_MAGIC:
        raise SiffFormatError(
            name,
            f"not a ScanImage file (magic {si_magic} at byte {si_at}, expected {SCANIMAGE_MAGIC})",
            si_at,
        )
    if version not in SUPPORTED_VERSIONS:
        raise SiffFormatError(
            name, f"unsupported ScanImage TIFF version {version} (supported: 3, 4)", si_at + 4
        )
    text_at = si_at + 16
    if nvfd_len > MAX_TEXT_BYTES or roi_len > MAX_TEXT_BYTES:
        raise SiffFormatError(
            name, f"implausible header text lengths ({nvfd_len}, {roi_len} bytes)", si_at + 8
        )
    header_end = text_at + nvfd_len + roi_len
    if header_end > source.size:
        raise SiffFormatError(
            name,
            f"truncated header: the ScanImage header declares {nvfd_len + roi_len} bytes of "
            f"text but the file ends at byte {source.size}",
            text_at,
        )
    if first_ifd >= 2**63:  # not an offset any file can have (and no int64 holds it)
        raise SiffFormatError(name, f"first IFD offset {first_ifd} is not a valid file offset",
                              4)
    text = source.read(text_at, nvfd_len + roi_len)
    return FileHeader(
        bigtiff=magic == 43,
        scanimage_version=version,
        first_ifd=int(first_ifd),
        nvfd_text=text[:nvfd_len].decode("latin-1"),
        roi_text=text[nvfd_len:].decode("latin-1"),
        header_end=header_end,
        file_size=source.size,
    )
