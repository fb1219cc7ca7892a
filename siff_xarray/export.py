"""Export the intensity of a ``.siff`` to a ScanImage-style TIFF (no photons).

:func:`to_tiff` writes every frame (flyback frames included) as a 16-bit TIFF page
with the frame's original description, after the source's ScanImage header and ROI
JSON, so the result is what ScanImage writes without FLIM: ScanImage tools, tifffile
and siff-xarray itself (``xr.open_dataset(out, engine="siff")``) read it with the
same frame lists, timestamps and events. Frames stream in batches (bounded memory).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError, SiffWarning

__all__ = ["to_tiff"]


def to_tiff(source: str | os.PathLike[str], path: str | os.PathLike[str], *,
            storage_options: dict[str, Any] | None = None, overwrite: bool = False,
            bigtiff: bool | None = None, batch_frames: int = 512) -> int:
    """Write the photon counts of every frame of ``source`` as a ScanImage TIFF.

    Parameters
    ----------
    source
        ``.siff`` (or ScanImage TIFF) path or URL.
    path
        Output ``.tif``; written to ``path + ".partial"`` and renamed when complete.
    storage_options
        fsspec options for a URL source.
    overwrite
        Replace an existing output.
    bigtiff
        BigTIFF container (default: as the source; classic TIFFs cannot exceed 4 GiB).
    batch_frames
        Frames decoded at a time.

    Returns
    -------
    int
        Frames written. Counts above 65535 saturate (with a warning).

    """
    from .reader.siff_file import SiffFile
    from .synthetic import SiffWriter

    out = Path(os.fspath(path))
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out.with_name(out.name + ".partial")
    with SiffFile(source, storage_options=storage_options) as f:
        n = f.num_frames
        big = f.header.bigtiff if bigtiff is None else bigtiff
        desc, dlen = f.description_bytes()
        dstart = np.concatenate([[0], np.cumsum(dlen)[:-1]]).astype(np.int64)
        try:
            with open(tmp, "wb") as fh:
                writer = SiffWriter(fh, f.header.nvfd_text, f.header.roi_text, bigtiff=big)
                writer.set_shape(*f.frame_shape)
                for a in range(0, n, batch_frames):
                    frames = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", SiffWarning)
                        imgs = f.read_frames(frames)
                    for w in caught:
                        warnings.warn(str(w.message), SiffWarning, stacklevel=2)
                    signed = imgs.dtype == np.int16
                    for j, fr in enumerate(frames.tolist()):  # one IFD per frame
                        d = desc[dstart[fr] : dstart[fr] + dlen[fr]].tobytes()
                        writer.write_frame(d, image=imgs[j], signed=signed)
                    f.release()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return n
