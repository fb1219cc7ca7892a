"""Adapter to suite2p 1.x rigid registration (optional extra ``siff-xarray[suite2p]``).

suite2p computes a reference image (``compute_reference``) and rigid offsets
(``register_frames``) with torch. Its offsets ``yoff, xoff`` mean
``registered = numpy.roll(raw, (-yoff, -xoff))``, so our shifts (the siff-xarray
convention ``registered = numpy.roll(raw, (shift_y, shift_x))``) are their
negatives. Only rigid registration is used: the shifts must be integers that
apply exactly to frames and to photons.

suite2p and torch are imported when a function here is called, never at import
time of :mod:`siff_xarray`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["suite2p_reference", "suite2p_settings", "suite2p_shifts"]


def _import() -> tuple[Any, Any, Any]:
    try:
        import torch
        from suite2p import default_settings
        from suite2p.registration import register
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("method='suite2p' needs suite2p 1.x and torch: "
                          "pip install 'siff-xarray[suite2p]'") from exc
    return torch, default_settings, register


def suite2p_settings(**overrides: Any) -> dict[str, Any]:
    """suite2p's ``default_settings()["registration"]`` with ``overrides`` applied.

    Unknown keys raise ``KeyError`` so that a misspelt setting is not silently ignored.
    """
    _, default_settings, _ = _import()
    reg = dict(default_settings()["registration"])
    unknown = set(overrides) - set(reg)
    if unknown:
        raise KeyError(f"unknown suite2p registration setting(s) {sorted(unknown)}; "
                       f"known: {sorted(reg)}")
    reg.update(overrides)
    return reg


def _device(device: str | Any | None) -> Any:
    torch, _, _ = _import()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _prepare(frames: np.ndarray, max_shift: int | None, settings: dict[str, Any] | None
             ) -> tuple[np.ndarray, dict[str, Any]]:
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
    s = suite2p_settings(**(settings or {}))
    s["nonrigid"] = False
    if max_shift is not None:
        s["maxregshift"] = (max_shift + 0.5) / min(frames.shape[1:])
    return np.clip(frames, -32768, 32767).astype(np.int16), s


def suite2p_reference(frames: np.ndarray, *, max_shift: int | None = None,
                      device: str | Any | None = None, settings: dict[str, Any] | None = None
                      ) -> np.ndarray:
    """suite2p's reference image (``compute_reference``) from up to ``nimg_init`` frames.

    Parameters as in :func:`suite2p_shifts`; frames are sampled evenly when there
    are more than ``nimg_init``. Returns the ``(H, W)`` reference as float64.
    """
    _, _, register = _import()
    data, s = _prepare(frames, max_shift, settings)
    if len(data) > s["nimg_init"]:
        data = data[np.linspace(0, len(data), 1 + s["nimg_init"], dtype=int)[:-1]]
    ref = register.compute_reference(data.copy(), settings=s, device=_device(device))
    return np.asarray(ref, dtype=np.float64)


def suite2p_shifts(
    frames: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    max_shift: int | None = None,
    device: str | Any | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rigid shifts of ``frames (N, H, W)`` by suite2p, in siff-xarray's convention.

    Parameters
    ----------
    frames
        Count images of one plane; converted to ``int16`` as suite2p expects
        (values above 32767 are clipped).
    reference
        ``(H, W)`` reference; default: :func:`suite2p_reference` of ``frames``.
    max_shift
        Largest shift in pixels; sets suite2p's ``maxregshift`` (a fraction of
        the smaller frame side). Default: suite2p's setting.
    device
        torch device (``"cpu"``, ``"cuda"``, a ``torch.device``); default: CUDA
        when available, else the CPU.
    settings
        Overrides of suite2p's registration settings (``smooth_sigma``,
        ``batch_size``, ``norm_frames``, ...), see :func:`suite2p_settings`.
        ``nonrigid`` is always off.

    Returns
    -------
    shifts, reference, quality
        ``int64 (N, 2)`` with ``numpy.roll(frame, shift)`` registered; the
        reference (float64); suite2p's peak correlation ``corrXY`` per frame.

    """
    _, _, register = _import()
    data, s = _prepare(frames, max_shift, settings)
    h, w = data.shape[1:]
    if reference is None:
        reference = suite2p_reference(frames, max_shift=max_shift, device=device,
                                      settings=settings)
    ref = np.asarray(reference)
    if ref.shape != (h, w):
        raise ValueError(f"reference shape {ref.shape} does not match frames {(h, w)}")
    ref16 = np.clip(np.round(ref), -32768, 32767).astype(np.int16)
    if len(data) == 0:
        return np.zeros((0, 2), dtype=np.int64), ref.astype(np.float64), np.zeros(0)
    out = register.register_frames(
        data, ref16, batch_size=s["batch_size"], norm_frames=s["norm_frames"],
        smooth_sigma=s["smooth_sigma"], spatial_taper=s["spatial_taper"], nonrigid=False,
        maxregshift=s["maxregshift"], smooth_sigma_time=s["smooth_sigma_time"],
        device=_device(device), apply_shifts=False,
    )
    yoff, xoff, corr = (np.asarray(v) for v in out[3][:3])
    shifts = -np.stack([yoff, xoff], axis=1).astype(np.int64)
    return shifts, ref.astype(np.float64), corr.astype(np.float64)
