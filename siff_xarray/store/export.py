"""Writing files back: a store as a ``.siff`` (:func:`to_siff`), a ``.siff`` as a TIFF.

:func:`to_tiff` writes the intensity of a ``.siff`` as a ScanImage TIFF.

:func:`to_siff` gives every frame its original description bytes and encoding, so
reading the result gives the same frames, histograms, photons, timestamps and
events as the source. :func:`to_tiff` writes every frame (flyback frames
included) as a 16-bit TIFF page with the frame's description after the source's
ScanImage header: what ScanImage writes without FLIM. Both write to
``path + ".partial"`` and rename when complete, in batches (bounded memory).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionError, SiffWarning, user_stacklevel
from ..format.constants import ENC_COMPRESSED, ENC_TIFF
from ..format.writer import SiffWriter
from .layout import Target, frames_per_batch
from .read import count_images, frame_positions, open_converted

__all__ = ["to_siff", "to_tiff"]


def to_siff(store: str | os.PathLike[str], path: str | os.PathLike[str], *,
            storage_options: dict[str, Any] | None = None, overwrite: bool = False,
            batch_frames: int = 512) -> None:
    """Write a converted store back as a ``.siff`` file that reads like its source.

    Every frame gets its original description bytes and encoding (raw or compressed);
    the header texts are the source's. Reading the result gives the same frames,
    histograms, photons (as multisets within each pixel), timestamps and events.
    """
    import zarr

    out = Path(os.fspath(path))
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: exists; pass overwrite=True to replace it")
    target = Target(os.fspath(store), storage_options)
    # not Dask-backed: each batch's count images are one zarr read (see verify)
    ds = open_converted(store, storage_options=storage_options, partial_volume="keep",
                        chunks=None)
    try:
        zstore = target.reader()  # a missing chunk is an error, not zeros in the file
        grp = zarr.open_group(zstore, path="photons", mode="r")
        n = grp["photon_count"].shape[0]
        counts = np.asarray(grp["photon_count"][...]).astype(np.int64)
        starts_z = np.asarray(grp["photon_start"][...]).astype(np.int64)
        enc = np.asarray(grp["encoding"][...])
        desc = np.asarray(grp["description"][...])
        dstart = np.asarray(grp["description_start"][...]).astype(np.int64)
        dlen = np.asarray(grp["description_length"][...]).astype(np.int64)
        fly = np.asarray(grp["flyback_frame"][...]).astype(np.int64)
        signed = np.asarray(grp["signed"][...]) if "signed" in grp else np.zeros(n, np.int8)
        pos = frame_positions(ds.frame_index.values, n)
        h, w = ds.sizes["y"], ds.sizes["x"]
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as fh:
            writer = SiffWriter(fh, ds.attrs["scanimage_header"], ds.attrs["roi_json"],
                                bigtiff=bool(ds.attrs.get("bigtiff", 1)))
            writer.set_shape(h, w)
            batch_frames = frames_per_batch(batch_frames, h * w)
            for a in range(0, n, batch_frames):
                fr = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
                imgs = count_images(ds, grp, fr, pos, fly, (h, w))
                c = counts[fr]
                lo, hi = int(starts_z[fr].min()), int((starts_z[fr] + c).max())
                block = np.asarray(grp["arrival_time"][lo:hi]) if hi > lo else np.zeros(0)
                for j, frame in enumerate(fr.tolist()):  # one IFD per frame must be written
                    s0 = int(starts_z[frame] - lo)
                    tau = block[s0 : s0 + int(c[j])]
                    d = desc[dstart[frame] : dstart[frame] + dlen[frame]].tobytes()
                    img = imgs[j]
                    if enc[frame] == ENC_TIFF:
                        writer.write_frame(d, image=img, signed=bool(signed[frame]))
                    elif enc[frame] == ENC_COMPRESSED:
                        writer.write_frame(d, counts=img, arrivals=tau.astype(np.uint16))
                    else:
                        pix = np.repeat(np.arange(h * w, dtype=np.uint64), img.ravel())
                        rec = ((pix // w) << np.uint64(48)) | ((pix % w) << np.uint64(32)) | \
                            tau.astype(np.uint64)
                        writer.write_frame(d, photons=rec)
        os.replace(tmp, out)
    finally:
        ds.close()


def to_tiff(source: str | os.PathLike[str], path: str | os.PathLike[str], *,
            storage_options: dict[str, Any] | None = None, overwrite: bool = False,
            bigtiff: bool | None = None, batch_frames: int = 512,
            pin_version: bool = True) -> int:
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
    pin_version
        For a URL source: as for :class:`~siff_xarray.SiffFile`.

    Returns
    -------
    int
        Frames written. Counts above 65535 saturate (with a warning).

    """
    from ..reader.siff_file import SiffFile

    out = Path(os.fspath(path))
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out.with_name(out.name + ".partial")
    with SiffFile(source, storage_options=storage_options, pin_version=pin_version) as f:
        n = f.num_frames
        big = f.header.bigtiff if bigtiff is None else bigtiff
        desc, dlen = f.description_bytes()
        dstart = np.concatenate([[0], np.cumsum(dlen)[:-1]]).astype(np.int64)
        try:
            with open(tmp, "wb") as fh:
                writer = SiffWriter(fh, f.header.nvfd_text, f.header.roi_text, bigtiff=big)
                writer.set_shape(*f.frame_shape)
                batch_frames = frames_per_batch(batch_frames, f.frame_shape[0] * f.frame_shape[1])
                for a in range(0, n, batch_frames):
                    frames = np.arange(a, min(a + batch_frames, n), dtype=np.int64)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", SiffWarning)
                        imgs = f.read_frames(frames)
                    for w in caught:
                        warnings.warn(str(w.message), SiffWarning, stacklevel=user_stacklevel())
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
