"""Numbers of the ``.siff`` / ScanImage TIFF format, named once.

Nothing here imports anything: the xarray entry point sniffs files with
:func:`looks_like_siff` without loading the reader (or Numba). Every value is
traced to ``docs/format.md``.
"""

from __future__ import annotations

__all__ = [
    "ENCODING_NAMES", "ENC_COMPRESSED", "ENC_RAW", "ENC_TIFF", "MULTIHARP_BASE_RESOLUTION_PS",
    "SCANIMAGE_MAGIC",
    "TAG_BITS_PER_SAMPLE", "TAG_COMPRESSION", "TAG_IMAGE_DESCRIPTION", "TAG_IMAGE_LENGTH",
    "TAG_IMAGE_WIDTH", "TAG_SAMPLE_FORMAT", "TAG_SIFF_COMPRESS", "TAG_STRIP_BYTE_COUNTS",
    "TAG_STRIP_OFFSETS", "TIFF_TYPE_SIZES", "looks_like_siff",
]

#: ScanImage's header magic number (u32 after the first-IFD offset)
SCANIMAGE_MAGIC = 117637889

# frame encodings (tag 907, SiffCompress)
ENC_RAW = 0  #: tag 907 = 0: list of u64 photon records
ENC_COMPRESSED = 1  #: tag 907 = 1: u16 count image + u16 arrival times in pixel order
ENC_TIFF = 2  #: no tag 907: an ordinary 16-bit TIFF page (ScanImage intensity .tif)
ENCODING_NAMES = {ENC_RAW: "raw", ENC_COMPRESSED: "compressed", ENC_TIFF: "tiff"}

# the TIFF tags a frame's IFD is read for
TAG_IMAGE_WIDTH = 256
TAG_IMAGE_LENGTH = 257
TAG_BITS_PER_SAMPLE = 258
TAG_COMPRESSION = 259
TAG_IMAGE_DESCRIPTION = 270
TAG_STRIP_OFFSETS = 273
TAG_STRIP_BYTE_COUNTS = 279
TAG_SAMPLE_FORMAT = 339
TAG_SIFF_COMPRESS = 907

#: byte size of each TIFF field type (types not listed are unknown)
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                   13: 4, 16: 8, 17: 8, 18: 8}

#: ScanImage-FLIM's MultiHarp TCSPC base resolution (ps) with MHLib >= 3 (20 ps before;
#: the file does not record which)
MULTIHARP_BASE_RESOLUTION_PS = 5.0

_MAGIC_BYTES = SCANIMAGE_MAGIC.to_bytes(4, "little")


def looks_like_siff(head: bytes) -> bool:
    """Tell whether ``head`` (the first 20 bytes of a file) starts a ScanImage (FLIM) TIFF.

    Little-endian BigTIFF (``II+``) or classic TIFF (``II*``) whose bytes after
    the first-IFD offset carry ScanImage's header magic number.
    """
    if head[:4] == b"II+\x00":
        return head[16:20] == _MAGIC_BYTES
    if head[:4] == b"II*\x00":
        return head[8:12] == _MAGIC_BYTES
    return False
