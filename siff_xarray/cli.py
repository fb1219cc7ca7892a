"""The ``siff-xarray`` command line.

Subcommands so far:

* ``demo [DIR]``: write the built-in demo acquisition and run the main job on it;
* ``info FILE``: print a summary of a ``.siff`` / ScanImage TIFF file (``--json``);
* ``convert SRC... DST``: lossless conversion to Zarr v3 (progress bar, summary);
* ``verify SRC DST``: compare a converted store with its source.

Errors in file content print one line (exit code 2) unless ``--debug`` is given;
``verify`` exits with 1 when the store differs from the source.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import ConversionError, SiffFormatError


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Open a file and compute the summary ``info`` and ``demo`` print.

    Besides metadata it decodes every non-flyback frame once (streaming, through the
    mask kernel) to report the mean photons per pixel of each (slice, channel) plane.
    """
    import numpy as np

    from .reader.siff_file import SiffFile

    with SiffFile(path) as f:
        ip = f.im_params
        n_ph = f.index.n_photons
        enc, counts = np.unique(f.frame_encodings, return_counts=True)
        ts = f.timestamps()
        real = np.asarray(ip.all_frames, dtype=np.int64)
        planes = []
        h, w = f.frame_shape
        whole = np.ones((h, w), dtype=bool)  # streams: no frame stack is held in memory
        for z in range(ip.num_slices):
            for c in range(ip.num_colors):
                frames = ip.framelist_by_slice(c, z, include_partial=True)
                total = f.sum_mask(whole, frames).sum()
                planes.append({"slice": z, "z_um": float(ip.z_positions[z]),
                               "channel": ip.colors[c], "frames": len(frames),
                               "mean_photons_per_pixel": float(total / (len(frames) * h * w))
                               if len(frames) else float("nan")})
        duration = float(np.nanmax(ts.experiment_s) - np.nanmin(ts.experiment_s)) \
            if len(ts.experiment_s) else 0.0
        return {
            "file": f.name,
            "size_bytes": f.header.file_size,
            "container": "BigTIFF" if f.header.bigtiff else "classic TIFF",
            "scanimage_tiff_version": f.header.scanimage_version,
            "frames": f.num_frames,
            "encodings": {str(k): int(v) for k, v in zip(enc, counts, strict=True)},
            "frame_shape": list(f.frame_shape),
            "channels": ip.colors,
            "channel_names": ip.channel_names,
            "slices": ip.num_slices,
            "z_um": ip.z_positions.tolist(),
            "frames_per_slice": ip.frames_per_slice,
            "flyback_frames_per_volume": ip.num_discard_flyback_frames,
            "timepoints": ip.num_timepoints,
            "partial_volume_frames": ip.num_partial_frames,
            "array_shape": list(ip.array_shape),
            "frame_period_s": ip.dt_frame,
            "volume_period_s": ip.dt_volume,
            "duration_s": duration,
            "start_epoch_laser": str(ts.epoch_laser[0]) if len(ts.frames) else None,
            "tau_bins": ip.num_bins,
            "bin_width_ps": ip.picoseconds_per_bin,
            "photons_per_frame": {
                "min": int(n_ph[real].min()) if real.size else 0,
                "median": float(np.median(n_ph[real])) if real.size else 0.0,
                "max": int(n_ph[real].max()) if real.size else 0,
            } if f.has_photons else None,
            "events": [{"frame": e.frame, "text": e.text, "time_s": e.time_s}
                       for e in ts.events],
            "planes": planes,
        }


def _print_summary(s: dict[str, Any]) -> None:
    click.echo(f"{s['file']}")
    click.echo(f"  {s['frames']} frames of {s['frame_shape'][0]} x {s['frame_shape'][1]} "
               f"pixels ({s['container']}, {s['size_bytes'] / 1e6:.1f} MB, encodings "
               f"{s['encodings']})")
    click.echo(f"  dimensions (time, z, [repeat], channel, y, x): {tuple(s['array_shape'])}"
               + (f" + {s['partial_volume_frames']} frames of a partial volume"
                  if s["partial_volume_frames"] else ""))
    names = ", ".join(f"{c} ({n})" for c, n in zip(s["channels"], s["channel_names"],
                                                  strict=True))
    click.echo(f"  channels: {names}")
    click.echo(f"  z planes (um): {s['z_um']}; frames per slice {s['frames_per_slice']}; "
               f"flyback frames per volume {s['flyback_frames_per_volume']}")
    fp, vp = s["frame_period_s"], s["volume_period_s"]
    click.echo(f"  timing: frame period {fp * 1e3:.2f} ms, volume period {vp * 1e3:.2f} ms, "
               f"duration {s['duration_s']:.3f} s, start {s['start_epoch_laser']}"
               if fp and vp else f"  timing: duration {s['duration_s']:.3f} s")
    if s["tau_bins"]:
        click.echo(f"  FLIM: {s['tau_bins']} arrival-time bins of {s['bin_width_ps']:g} ps "
                   f"({s['tau_bins'] * (s['bin_width_ps'] or 0) / 1000:.2f} ns)")
    if s["photons_per_frame"]:
        p = s["photons_per_frame"]
        click.echo(f"  photons per frame: min {p['min']}, median {p['median']:g}, "
                   f"max {p['max']}")
    for e in s["events"]:
        click.echo(f"  event at frame {e['frame']} ({e['time_s']:.3f} s): {e['text']}")
    click.echo("  mean photons per pixel per plane:")
    for pl in s["planes"]:
        click.echo(f"    slice {pl['slice']} (z = {pl['z_um']:g} um), channel "
                   f"{pl['channel']}: {pl['mean_photons_per_pixel']:.4f} "
                   f"({pl['frames']} frames)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Read ScanImage-FLIM .siff files with xarray, Zarr and Dask."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("directory", required=False, default="siff-xarray-demo",
                type=click.Path(file_okay=False))
def demo(directory: str) -> None:
    """Write the demo acquisition to DIRECTORY and summarize it."""
    from .synthetic import make_demo

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.siff"
    make_demo(path)
    click.echo(f"wrote {path}")
    _print_summary(summarize(path))
    import numpy as np
    import xarray as xr

    with xr.open_dataset(path, engine="siff", chunks={}) as ds:
        click.echo(f"\nxr.open_dataset({str(path)!r}, engine='siff', chunks={{}}):")
        click.echo(repr(ds.drop_attrs()))
        # the same plane means, computed lazily with dask over the frames that exist
        means = ds.intensity.where(ds.frame_present).mean(("time", "y", "x")).compute()
        click.echo("  mean photons per pixel per plane (dask): "
                   + np.array2string(means.values, precision=4, separator=", ")
                   .replace("\n", ""))


@cli.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(file: str, as_json: bool) -> None:
    """Summarize FILE (.siff or ScanImage TIFF)."""
    s = summarize(file)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        _print_summary(s)


class _ProgressLine:
    """One self-updating progress line on stderr: batches, frames, MB/s, ETA."""

    def __init__(self, name: str, quiet: bool) -> None:
        self.name = name
        self.quiet = quiet
        self.width = 24

    def __call__(self, p: Any) -> None:
        if self.quiet:
            return
        frac = p.batches_done / p.batches_total if p.batches_total else 1.0
        bar = "#" * int(frac * self.width)
        eta = f"{p.eta_s:.0f} s" if p.eta_s == p.eta_s else "?"
        click.echo(f"\r{self.name} [{bar:<{self.width}}] {p.frames_done}/{p.frames_total} "
                   f"frames, {p.mb_per_s:.0f} MB/s, ETA {eta}   ", nl=False, err=True)
        if p.batches_done == p.batches_total:
            click.echo("", err=True)


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.argument("destination")
@click.option("--overwrite", is_flag=True, help="Replace existing stores.")
@click.option("--resume", is_flag=True, help="Finish interrupted conversions.")
@click.option("--scheduler", default="threads", show_default=True,
              help="threads, processes, sync, or a dask.distributed scheduler address.")
@click.option("--workers", type=int, default=None, help="Threads/processes (local schedulers).")
@click.option("--shard-mb", type=float, default=64.0, show_default=True,
              help="Target size of an intensity shard (one batch), MB.")
@click.option("--no-ome", is_flag=True, help="Do not write the OME-Zarr image (ome/).")
@click.option("--ome-levels", type=click.IntRange(min=1), default=None,
              help="OME pyramid levels (default: halve y and x down to 32 pixels).")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def convert(sources: tuple[str, ...], destination: str, overwrite: bool, resume: bool,
            scheduler: str, workers: int | None, shard_mb: float, no_ome: bool,
            ome_levels: int | None, quiet: bool) -> None:
    """Convert SOURCES (.siff files, URLs or globs) to Zarr v3 stores under DESTINATION.

    The numbered parts of a split acquisition (NAME_00001.siff, NAME_00002.siff...)
    become one store. With one acquisition and a DESTINATION ending in .zarr,
    DESTINATION is the store; otherwise DESTINATION is a directory (or URL prefix)
    receiving NAME.zarr per acquisition.
    """
    from .zarr_store import _expand_sources, convert_file, group_acquisitions, store_name

    files: list[str] = []
    for s in sources:
        expanded = _expand_sources(s, None)
        files.extend([s] if expanded is None else expanded)
    if not files:
        raise click.ClickException("no source files match")
    groups = group_acquisitions(files)
    single = len(groups) == 1 and destination.rstrip("/").endswith(".zarr")
    dst = destination.rstrip("/")
    for group in groups:
        out = dst if single else f"{dst}/{store_name(group[0])}"
        summary = convert_file(group if len(group) > 1 else group[0], out,
                               overwrite=overwrite, resume=resume, scheduler=scheduler,
                               num_workers=workers, shard_bytes=int(shard_mb * 2**20),
                               ome=not no_ome, ome_levels=ome_levels,
                               progress=_ProgressLine(store_name(group[0]), quiet))
        if not quiet:
            click.echo(f"{summary.source} -> {summary.destination}: {summary.frames} frames, "
                       f"{summary.photons} photons, {summary.source_bytes / 1e6:.1f} MB -> "
                       f"{summary.store_bytes / 1e6:.1f} MB (x{summary.compression_ratio:.2f}) "
                       f"in {summary.seconds:.1f} s"
                       + (f" ({summary.batches_skipped} of {summary.batches} batches were "
                          "already done)" if summary.batches_skipped else ""))


@cli.command()
@click.argument("source")
@click.argument("store")
def verify(source: str, store: str) -> None:
    """Compare STORE (a converted Zarr store) with SOURCE, frame by frame."""
    from .zarr_store import verify as run_verify

    problems = run_verify(source, store)
    if problems:
        for p in problems:
            click.echo(f"DIFFERENT: {p}")
        sys.exit(1)
    click.echo(f"OK: {store} holds every photon, count image, timestamp and description "
               f"of {source}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning file errors into one-line messages."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (SiffFormatError, ConversionError, FileNotFoundError, IsADirectoryError,
            PermissionError) as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
