"""Writing ``.siff`` and ScanImage TIFF files, frame by frame (:class:`SiffWriter`).

Used by the synthetic-data generator, by :func:`siff_xarray.store.to_siff` (a
converted store written back) and by :func:`siff_xarray.store.to_tiff`. The
layout written is the one ``docs/format.md`` describes: the ScanImage header
block after the TIFF preamble, then per frame its IFD, description and data.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np

from . import constants as C

__all__ = ["SiffWriter"]

# tags every frame carries besides those the reader needs (ScanImage writes them too);
# ScanImage keeps its header texts in Software (NVFD) and Artist (ROI JSON)
_TAG_PHOTOMETRIC, _TAG_ORIENTATION, _TAG_SAMPLES_PER_PIXEL, _TAG_ROWS_PER_STRIP = 262, 274, 277, 278
_TAG_X_RESOLUTION, _TAG_Y_RESOLUTION, _TAG_PLANAR_CONFIG, _TAG_RESOLUTION_UNIT = 282, 283, 284, 296
_TAG_SOFTWARE, _TAG_ARTIST = 305, 315
_N_TAGS = 19  # with SiffCompress (907); TIFF pages have one fewer


class SiffWriter:
    """Stream frames into a ``.siff`` (or ScanImage intensity ``.tif``) file.

    Parameters
    ----------
    f
        Binary file opened for writing.
    nvfd, roi
        Header texts (ASCII).
    bigtiff
        BigTIFF (default; what ScanImage-FLIM writes) or classic TIFF.

    """

    def __init__(self, f: BinaryIO, nvfd: str | bytes, roi: str | bytes,
                 bigtiff: bool = True) -> None:
        self.f = f
        self.bigtiff = bigtiff
        # header texts are read back as Latin-1, so Latin-1 writes them back byte for byte
        self._nvfd = nvfd if isinstance(nvfd, bytes) else nvfd.encode("latin-1")
        self._roi = roi if isinstance(roi, bytes) else roi.encode("latin-1")
        n, r = len(self._nvfd), len(self._roi)
        if bigtiff:
            head = b"II" + struct.pack("<HHHQ", 43, 8, 0, 32 + n + r)
        else:
            head = b"II" + struct.pack("<HI", 42, 24 + n + r)
        head += struct.pack("<IIII", C.SCANIMAGE_MAGIC, 4, n, r)
        self._nvfd_at = len(head)
        f.write(head + self._nvfd + self._roi)
        self._pos = len(head) + n + r
        self._last_next_at: int | None = None  # where the previous IFD's next pointer sits

    def _entries(self, tags: Mapping[int, tuple[int, int, int]]) -> bytes:
        out = []
        for tag in sorted(tags):
            typ, count, value = tags[tag]
            if self.bigtiff:
                out.append(struct.pack("<HHQQ", tag, typ, count, value))
            else:
                if typ == 16:  # LONG8 does not exist in classic TIFF
                    typ = 4
                out.append(struct.pack("<HHII", tag, typ, count, value & 0xFFFFFFFF))
        return b"".join(out)

    def write_frame(self, description: str | bytes, *, photons: np.ndarray | None = None,
                    counts: np.ndarray | None = None, arrivals: np.ndarray | None = None,
                    image: np.ndarray | None = None, signed: bool = False) -> None:
        """Append one frame.

        Exactly one of: ``photons`` (raw u64 records), ``counts`` + ``arrivals``
        (compressed: u16 count image and u16 arrival times in pixel order), or
        ``image`` (a 16-bit TIFF page without tag 907).
        """
        desc = description if isinstance(description, bytes) else description.encode("ascii")
        if photons is not None:
            h, w = self._shape
            pre, data = b"", np.ascontiguousarray(photons, dtype="<u8").tobytes()
            siff, bps = 0, 64
        elif counts is not None:
            h, w = counts.shape
            pre = np.ascontiguousarray(counts, dtype="<u2").tobytes()
            data = np.ascontiguousarray(arrivals, dtype="<u2").tobytes()
            siff, bps = 1, 16
        elif image is not None:
            h, w = image.shape
            pre, data = b"", np.ascontiguousarray(image, dtype="<i2" if signed else "<u2"
                                                  ).tobytes()
            siff, bps = None, 16
        else:
            raise ValueError("write_frame needs photons, counts+arrivals or image")
        n_tags = _N_TAGS - (siff is None)
        ifd_size = (16 + 20 * n_tags) if self.bigtiff else (6 + 12 * n_tags)
        desc_off = self._pos + ifd_size
        strip_off = desc_off + len(desc) + len(pre)
        tags = {
            C.TAG_IMAGE_WIDTH: (4, 1, w), C.TAG_IMAGE_LENGTH: (4, 1, h),
            C.TAG_BITS_PER_SAMPLE: (3, 1, bps), C.TAG_COMPRESSION: (3, 1, 1),
            _TAG_PHOTOMETRIC: (3, 1, 1),
            C.TAG_IMAGE_DESCRIPTION: (2, len(desc), desc_off),
            C.TAG_STRIP_OFFSETS: (16, 1, strip_off), _TAG_ORIENTATION: (3, 1, 1),
            _TAG_SAMPLES_PER_PIXEL: (3, 1, 1), _TAG_ROWS_PER_STRIP: (4, 1, h),
            C.TAG_STRIP_BYTE_COUNTS: (16, 1, len(data)), _TAG_X_RESOLUTION: (5, 1, 0),
            _TAG_Y_RESOLUTION: (5, 1, 0), _TAG_PLANAR_CONFIG: (3, 1, 1),
            _TAG_RESOLUTION_UNIT: (3, 1, 3),
            _TAG_SOFTWARE: (2, len(self._nvfd), self._nvfd_at),
            _TAG_ARTIST: (2, len(self._roi), self._nvfd_at + len(self._nvfd)),
            C.TAG_SAMPLE_FORMAT: (3, 1, 2 if signed else 1),
        }
        if siff is not None:
            tags[C.TAG_SIFF_COMPRESS] = (1, 1, siff)
        # link the previous IFD to this one
        if self._last_next_at is not None:
            self.f.seek(self._last_next_at)
            self.f.write(struct.pack("<Q" if self.bigtiff else "<I", self._pos))
            self.f.seek(self._pos)
        if self.bigtiff:
            ifd = struct.pack("<Q", n_tags) + self._entries(tags) + struct.pack("<Q", 0)
        else:
            ifd = struct.pack("<H", n_tags) + self._entries(tags) + struct.pack("<I", 0)
        assert len(ifd) == ifd_size
        self._last_next_at = self._pos + ifd_size - (8 if self.bigtiff else 4)
        self.f.write(ifd + desc + pre + data)
        self._pos = strip_off + len(data)
        if not self.bigtiff and self._pos >= 2**32:
            raise ValueError("classic TIFF files cannot exceed 4 GiB; use bigtiff=True")

    def set_shape(self, height: int, width: int) -> None:
        """Frame shape used for raw-photon frames."""
        self._shape = (height, width)
