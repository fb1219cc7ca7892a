"""Several files of one acquisition read as one frame sequence.

ScanImage splits long acquisitions into numbered files (``name_00001.siff``, ...)
of a fixed number of frames; a volume may start in one file and end in the next.
:class:`Acquisition` numbers the frames of all parts in order (``offsets[k]`` is
part ``k``'s first frame), checks that the parts belong together, and offers the
frame bookkeeping, timestamps and decoding of :class:`SiffFile` addressed by
acquisition frame. The xarray backend and the Zarr converter both build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from .._paths import any_remote
from .._remote import thread_pool
from ..errors import SiffFormatError
from ..format.imparams import ImParams
from .frame_meta import Event, FrameTimestamps
from .siff_file import SiffFile

__all__ = ["OPENING_AT_ONCE", "Acquisition", "open_all"]

#: files :func:`open_all` opens together at most
OPENING_AT_ONCE = 8


def open_all(openers: Sequence[Callable[[], SiffFile]], together: bool) -> list[SiffFile]:
    """Call each opener, in order; all at once (in a small pool) when ``together``.

    For remote files, whose every open waits a round trip or more: the parts of an
    acquisition then open in one part's time, at most :data:`OPENING_AT_ONCE`
    together. The first failure in order raises, and the files that did open are
    closed first.
    """
    jobs: list[Future[SiffFile]] = []
    files: list[SiffFile] = []
    try:
        if together and len(openers) > 1:
            with ThreadPoolExecutor(min(len(openers), OPENING_AT_ONCE)) as pool:
                jobs = [pool.submit(o) for o in openers]
            files = [job.result() for job in jobs]
        else:
            for o in openers:  # (appended one by one: a failure closes those before)
                files.append(o())
        return files
    except BaseException:
        # (in a pool ``files`` stays empty on failure: the jobs hold what opened)
        for f in files or [j.result() for j in jobs
                           if j.done() and not j.cancelled() and j.exception() is None]:
            f.close()
        raise


class Acquisition:
    """Open :class:`SiffFile` parts of one acquisition, in order.

    Parameters
    ----------
    files
        The parts, already open. They are closed by :meth:`close` only when
        ``owns`` is true (as with :meth:`open`).

    Raises
    ------
    ValueError
        If a part's ScanImage header or frame shape differs from the first's, or
        the parts hold no frame at all.

    """

    def __init__(self, files: Sequence[SiffFile], *, owns: bool = False) -> None:
        self.files = list(files)
        self._owns = owns
        first = self.files[0]
        for f in self.files[1:]:
            if f.header.nvfd_text != first.header.nvfd_text:
                raise ValueError(f"{f.name}: its ScanImage header differs from {first.name}; "
                                 "these files are not one acquisition")
        filled = [f for f in self.files if f.num_frames]
        for f in filled[1:]:
            if f.frame_shape != filled[0].frame_shape:
                raise ValueError(f"{f.name}: frame shape {f.frame_shape} differs from "
                                 f"{filled[0].frame_shape} in {filled[0].name}; these files "
                                 "are not one acquisition")
        counts = [f.num_frames for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_frames = int(self.offsets[-1])
        if self.num_frames == 0:
            raise SiffFormatError(first.name, "the acquisition holds no frames")
        self.header = first.header
        self.frame_shape = filled[0].frame_shape
        #: work using the parts in threads of its own (:meth:`aside`)
        self._aside: list[Future[Any]] = []

    @classmethod
    def open(cls, sources: Sequence[Any], storage_options: dict[str, Any] | None = None,
             pin_version: bool = True) -> Acquisition:
        """Open every part (paths or URLs) and own them.

        Remote parts are opened at once (:func:`open_all`); a part that fails to
        open raises its error (the first part's in order) and no part stays open.
        ``pin_version``: as for :class:`SiffFile`.
        """
        files = open_all([functools.partial(SiffFile, s, storage_options=storage_options,
                                            pin_version=pin_version)
                          for s in sources], any_remote(sources))
        try:
            return cls(files, owns=True)
        except BaseException:
            for f in files:
                f.close()
            raise

    # ------------------------------------------------------------------ bookkeeping

    def im_params(self, **overrides: Any) -> ImParams:
        """Frame bookkeeping over all parts (``tau_bins=`` etc. as for :class:`ImParams`)."""
        first = self.files[0]
        return ImParams(first.metadata, self.num_frames, self.frame_shape, first.roi_groups,
                        name=first.name, **overrides)

    @property
    def file_size(self) -> int:
        """Total bytes of all parts."""
        return sum(f.header.file_size for f in self.files)

    @property
    def has_photons(self) -> bool:
        """True when every part stores photons."""
        return all(f.has_photons for f in self.files)

    def _cat(self, name: str) -> np.ndarray:
        return np.concatenate([getattr(f.index, name) for f in self.files])

    @property
    def n_photons(self) -> np.ndarray:
        """Photons of each frame (from the IFDs)."""
        return self._cat("n_photons")

    @property
    def encoding(self) -> np.ndarray:
        """Encoding of each frame (``ENC_RAW``, ``ENC_COMPRESSED``, ``ENC_TIFF``)."""
        return self._cat("encoding")

    @property
    def signed(self) -> np.ndarray:
        """Whether each frame is a TIFF page of signed samples."""
        return self._cat("signed")

    @property
    def frame_bytes(self) -> np.ndarray:
        """Bytes from each frame's IFD to the end of its data."""
        return self._cat("data_stop") - self._cat("ifd_offset")

    # ------------------------------------------------------------------ data

    def _pieces(self, frames: np.ndarray) -> list[tuple[SiffFile, np.ndarray]]:
        """Split ascending acquisition frames into (part, local frames)."""
        frames = np.asarray(frames, dtype=np.int64)
        file_of = np.searchsorted(self.offsets, frames, side="right") - 1
        return [(self.files[k], frames[file_of == k] - self.offsets[k])
                for k in np.unique(file_of).tolist()]

    def photons_batch(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`SiffFile.photons_batch` (frames ascending)."""
        starts, pix, tau, base = [np.zeros(1, np.int64)], [], [], 0
        for f, local in self._pieces(frames):
            s, p, t = f.photons_batch(local)
            starts.append(s[1:] + base)
            base += int(s[-1])
            pix.append(p)
            tau.append(t)
        empty = np.zeros(0, np.uint32)
        return (np.concatenate(starts), np.concatenate(pix) if pix else empty,
                np.concatenate(tau) if tau else empty)

    def decode_into(self, frames: np.ndarray, rows: np.ndarray, images: np.ndarray,
                    counts: np.ndarray, histograms: np.ndarray, arrivals: np.ndarray) -> int:
        """As :meth:`SiffFile.decode_into` (frames ascending)."""
        frames = np.asarray(frames, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        hi, done, base = 0, 0, 0
        for f, local in self._pieces(frames):
            n = int(f.index.n_photons[local].sum())
            part = slice(done, done + len(local))
            hi = max(hi, f.decode_into(local, rows[part], images, counts, histograms,
                                       arrivals[base : base + n]))
            done += len(local)
            base += n
        return hi

    def parts_ahead(self) -> int:
        """Parts of a long read to have on their way while one decodes (more on a far link)."""
        return max(f._parts_ahead() for f in self.files)

    def keep_parts_ahead(self, n: int) -> None:
        """As :meth:`SiffFile.keep_parts_ahead`, for every part."""
        for f in self.files:
            f.keep_parts_ahead(n)

    def prefetch(self, frames: np.ndarray) -> None:
        """As :meth:`SiffFile.prefetch` (frames ascending)."""
        for f, local in self._pieces(frames):
            f.prefetch(local)

    def read_frames(self, frames: np.ndarray) -> np.ndarray:
        """As :meth:`SiffFile.read_frames` (frames ascending)."""
        return np.concatenate([f.read_frames(local) for f, local in self._pieces(frames)])

    def histograms(self, frames: np.ndarray) -> np.ndarray:
        """As :meth:`SiffFile.histograms` (frames ascending)."""
        return np.concatenate([f.histograms(local) for f, local in self._pieces(frames)])

    def timestamps(self) -> FrameTimestamps:
        """Timestamps of every frame; event frames are acquisition frames."""
        ts = [f.timestamps() for f in self.files]
        events = [Event(int(e.frame + off), e.text, e.time_s)
                  for t, off in zip(ts, self.offsets[:-1].tolist(), strict=True)
                  for e in t.events]
        return FrameTimestamps(np.arange(self.num_frames),
                               np.concatenate([t.experiment_s for t in ts]),
                               np.concatenate([t.epoch_laser_ns for t in ts]),
                               np.concatenate([t.epoch_system_ns for t in ts]), events)

    def description_bytes(self, frames: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Return the description bytes of ``frames`` (ascending; default all) and lengths."""
        pieces = ([(f, None) for f in self.files] if frames is None
                  else self._pieces(frames))
        parts = [f.description_bytes(local) for f, local in pieces]
        if not parts:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def description_lengths(self) -> np.ndarray:
        """Bytes of each frame's description (from the IFDs)."""
        return self._cat("desc_length").astype(np.int64)

    def release(self) -> None:
        """Release mapped pages of every part (see :meth:`SiffFile.release`)."""
        for f in self.files:
            f.release()

    def aside(self, call: Callable[[], Any]) -> Future[Any]:
        """Run ``call``, which uses the parts, in a thread of its own; return its future.

        :meth:`close` waits for it first: the parts stay open until it is done,
        whoever closes them (a converter's upload of the sidecars goes on behind
        its first batches).
        """
        job = thread_pool("siff-xarray-aside", 4).submit(call)
        self._aside.append(job)
        return job

    def close(self) -> None:
        """Close the parts if this object opened them (once the work :meth:`aside` is done)."""
        wait(self._aside)
        if self._owns:
            for f in self.files:
                f.close()

    def __enter__(self) -> Acquisition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
