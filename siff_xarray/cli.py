"""The ``siff-xarray`` command line.

Subcommands (built on click; ``--help`` on each):

* ``demo [DIR]``: write the built-in demo acquisition and run the main job on it;
* ``info FILE``: a summary of a ``.siff`` / ScanImage TIFF (rich tables, ``--json``);
* ``convert SRC... DST``: lossless conversion to Zarr v3 (progress bar, summary);
* ``verify SRC DST``: compare a converted store with its source;
* ``to-tiff SRC OUT``: the intensity as a ScanImage-style TIFF;
* ``register SRC``: motion registration; shifts saved next to the data.

Errors print one line, with the path of a log file holding the traceback (exit code
2), unless ``--debug`` is given; ``verify`` exits with 1 when the store differs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ._progress import watched
from .errors import ConversionError, SiffFormatError


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Open a file and compute the summary ``info`` and ``demo`` print.

    Besides metadata it reports the mean photons per pixel of each (slice, channel)
    plane: from the photon counts of the frame index for photon frames (every photon
    lies in its frame), by decoding only intensity-only TIFF pages (their image sums).
    """
    import numpy as np

    from .format.constants import ENC_TIFF
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
        tiff = f.index.encoding == ENC_TIFF
        for z in range(ip.num_slices):
            for c in range(ip.num_colors):
                frames = np.asarray(ip.framelist_by_slice(c, z, include_partial=True),
                                    dtype=np.int64)
                is_page = tiff[frames]
                pages = frames[is_page]
                total = int(n_ph[frames[~is_page]].sum()) + (
                    int(f.sum_mask(whole, pages).sum()) if pages.size else 0)
                planes.append({"slice": z, "z_um": float(ip.z_positions[z]),
                               "channel": ip.color_list[c], "frames": len(frames),
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
            "channels": ip.color_list,
            "channel_names": ip.channel_names,
            "slices": ip.num_slices,
            "z_um": ip.z_positions.tolist(),
            "frames_per_slice": ip.frames_per_slice,
            "flyback_frames_per_volume": ip.num_discard_flyback_frames,
            "flyback_scans_per_volume": ip.flyback_scans_per_volume,
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


def _console() -> Any:
    from rich.console import Console

    # a wide console when not on a terminal, so that tables do not wrap in logs
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False, markup=False)


def _print_summary(s: dict[str, Any]) -> None:
    """Print :func:`summarize`'s result as rich tables."""
    from rich.table import Table

    con = _console()
    t = Table(title=s["file"], show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    fh, fw = s["frame_shape"]
    enc = ", ".join(f"{k} {v}" for k, v in s["encodings"].items())
    t.add_row("file", f"{s['size_bytes'] / 1e6:.1f} MB, {s['container']}, ScanImage TIFF "
                      f"version {s['scanimage_tiff_version']}")
    t.add_row("frames", f"{s['frames']} of {fh} x {fw} pixels ({enc})")
    dims = f"{tuple(s['array_shape'])}"
    if s["partial_volume_frames"]:
        dims += f" + {s['partial_volume_frames']} frames of a partial volume"
    t.add_row("dimensions (time, z, [repeat], channel, y, x)", dims)
    t.add_row("channels", ", ".join(f"{c} ({n})" for c, n in zip(
        s["channels"], s["channel_names"], strict=True)))
    t.add_row("z planes (um)", ", ".join(f"{z:g}" for z in s["z_um"]))
    t.add_row("frames per slice", str(s["frames_per_slice"]))
    t.add_row("flyback per volume", f"{s['flyback_scans_per_volume']} scan(s) = "
              f"{s['flyback_frames_per_volume']} frames (one per channel)")
    t.add_row("timepoints", str(s["timepoints"]))
    fp, vp = s["frame_period_s"], s["volume_period_s"]
    if fp and vp:
        t.add_row("frame rate", f"{1 / fp:.2f} Hz (period {fp * 1e3:.2f} ms)")
        t.add_row("volume rate", f"{1 / vp:.2f} Hz (period {vp * 1e3:.2f} ms)")
    t.add_row("duration", f"{s['duration_s']:.3f} s")
    t.add_row("start (laser clock)", str(s["start_epoch_laser"]))
    if s["tau_bins"]:
        t.add_row("FLIM", f"{s['tau_bins']} arrival-time bins of {s['bin_width_ps']:g} ps "
                          f"({s['tau_bins'] * (s['bin_width_ps'] or 0) / 1000:.2f} ns)")
    if s["photons_per_frame"]:
        p = s["photons_per_frame"]
        t.add_row("photons per frame", f"min {p['min']}, median {p['median']:g}, "
                                       f"max {p['max']}")
    con.print(t)
    if s["events"]:
        ev = Table(title="appended events", title_justify="left")
        for col in ("frame", "time (s)", "text"):
            ev.add_column(col, justify="right" if col != "text" else "left")
        for e in s["events"]:
            ev.add_row(str(e["frame"]), f"{e['time_s']:.3f}", e["text"])
        con.print(ev)
    pl = Table(title="mean photons per pixel per plane", title_justify="left")
    for col in ("slice", "z (um)", "channel", "frames", "photons / pixel"):
        pl.add_column(col, justify="right")
    for p in s["planes"]:
        pl.add_row(str(p["slice"]), f"{p['z_um']:g}", str(p["channel"]), str(p["frames"]),
                   f"{p['mean_photons_per_pixel']:.4f}")
    con.print(pl)


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
    # the same plane means, computed lazily with dask over every acquired frame: the
    # partial last volume included (kept on request), its missing frames masked out
    with xr.open_dataset(path, engine="siff", chunks={}, partial_volume="keep") as ds:
        means = ds.intensity.where(ds.frame_present).mean(("time", "y", "x")).compute()
        click.echo("\n  mean photons per pixel per plane (dask, every acquired frame): "
                   + np.array2string(means.values, precision=4, separator=", ")
                   .replace("\n", ""))


@cli.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(file: str, as_json: bool) -> None:
    """Summarize FILE (.siff or ScanImage TIFF, or a converted store; a path or URL).

    Frames, encodings, size, channels, planes and z positions, flyback, timepoints,
    frame and volume rates, duration, start time, FLIM bins, photons per frame,
    appended events, and the mean photons per pixel of every plane. For a converted
    Zarr store: its source, frames and photons, dimensions and variables; or, for an
    unfinished conversion, how far it got and how to finish it.
    """
    if _names_a_store(file):
        from .store import describe_store

        try:
            s = describe_store(file)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}; info reads a .siff or TIFF file, or a store "
                                    "written by siff-xarray convert") from exc
        if as_json:
            click.echo(json.dumps(s, indent=2))
        else:
            _print_store(s)
        return
    s = summarize(file)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        _print_summary(s)


def _names_a_store(file: str) -> bool:
    """Tell whether ``info`` reads FILE as a converted store.

    A local directory, or a URL whose path ends in ``.zarr`` or a slash.
    """
    from ._paths import is_remote

    if not is_remote(file):
        return Path(file).is_dir()
    path = file.split("?")[0]
    return path.endswith("/") or path.lower().endswith(".zarr")


def _print_store(s: dict[str, Any]) -> None:
    """Print :func:`~siff_xarray.store.describe_store`'s result as a rich table."""
    from rich.table import Table

    t = Table(title=f"{s['store']} (converted store)", show_header=False,
              title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("source file", str(s["source_file"]))
    t.add_row("frames", f"{s['frames']:,} (flyback included)")
    t.add_row("photons", f"{s['photons']:,}")
    t.add_row("dimensions", ", ".join(f"{k} {v}" for k, v in s["sizes"].items()))
    t.add_row("variables", ", ".join(s["variables"]))
    t.add_row("OME-Zarr levels", str(s["ome_levels"]))
    t.add_row("siff_zarr_version", str(s["siff_zarr_version"]))
    _console().print(t)


class _ProgressLine:
    """One self-updating progress line on stderr: batches, frames, MB/s, ETA."""

    def __init__(self, name: str, quiet: bool) -> None:
        self.name = name
        self.quiet = quiet
        self.width = 24
        # nobody watching (a batch job's log): a whole line per tenth, not a bar redrawn
        # with carriage returns
        self.terminal = watched()
        self.tenths = -1

    def __call__(self, p: Any) -> None:
        if self.quiet:
            return
        frac = p.batches_done / p.batches_total if p.batches_total else 1.0
        eta = f"{p.eta_s:.0f} s" if p.eta_s == p.eta_s else "?"
        counts = (f"{p.frames_done}/{p.frames_total} frames, {p.mb_per_s:.0f} MB/s, "
                  f"ETA {eta}")
        if not self.terminal:
            if int(frac * 10) > self.tenths:
                self.tenths = int(frac * 10)
                click.echo(f"{self.name}: {frac:.0%} ({counts})", err=True)
            return
        bar = "#" * int(frac * self.width)
        click.echo(f"\r{self.name} [{bar:<{self.width}}] {counts}   ", nl=False, err=True)
        if p.batches_done == p.batches_total:
            click.echo("", err=True)


_NO_PIN_HELP = ("Remote sources: do not require every read to be of the version (ETag) "
                "first seen, for servers that give one object different ETags from one "
                "request to the next.")


def _json_option(name: str, text: str | None) -> dict[str, Any] | None:
    """Parse a JSON object given on the command line (None if not given)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object ({...})", param_hint=name)
    return value


#: errors of one source (or its store) that a conversion of many goes on after
_ONE_SOURCE_ERRORS = (SiffFormatError, ConversionError, FileNotFoundError,
                      IsADirectoryError, PermissionError)


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.argument("destination")
@click.option("--overwrite", is_flag=True, help="Replace existing stores.")
@click.option("--resume", is_flag=True, help="Finish interrupted conversions.")
@click.option("--scheduler", default="threads", show_default=True,
              help="threads, processes, sync, or a dask.distributed scheduler address.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads/processes (local schedulers).")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=64.0,
              show_default=True,
              help="Target size of an intensity shard (one batch), MB.")
@click.option("--no-ome", is_flag=True, help="Do not write the OME-Zarr image (ome/).")
@click.option("--ome-levels", type=click.IntRange(min=1), default=None,
              help="OME pyramid levels (default: halve y and x down to 32 pixels).")
@click.option("--allow-truncated", is_flag=True,
              help="Convert the complete frames of a file cut off mid-write (or damaged).")
@click.option("--storage-options", default=None,
              help="fsspec storage options for source URLs, as JSON.")
@click.option("--target-options", default=None,
              help="fsspec storage options for the destination, as JSON.")
@click.option("--no-pin-version", is_flag=True, help=_NO_PIN_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def convert(sources: tuple[str, ...], destination: str, overwrite: bool, resume: bool,
            scheduler: str, workers: int | None, shard_mb: float, no_ome: bool,
            ome_levels: int | None, allow_truncated: bool, storage_options: str | None,
            target_options: str | None, no_pin_version: bool, quiet: bool) -> None:
    """Convert SOURCES (.siff files, URLs or globs) to Zarr v3 stores under DESTINATION.

    The numbered parts of a split acquisition (NAME_00001.siff, NAME_00002.siff...)
    become one store. With one acquisition and a DESTINATION ending in .zarr,
    DESTINATION is the store; otherwise DESTINATION is a directory (or URL prefix)
    receiving NAME.zarr per acquisition.
    """
    from ._paths import expand
    from .store import convert_file, group_acquisitions, store_name

    opts = _json_option("--storage-options", storage_options)
    files: list[str] = []
    for s in sources:
        files.extend(os.fspath(p) for p in expand(s, opts))
    if not files:
        raise FileNotFoundError(f"no source files match {' '.join(sources)}")
    groups = group_acquisitions(files)
    single = len(groups) == 1 and destination.rstrip("/").endswith(".zarr")
    dst = destination.rstrip("/")
    failed: list[str] = []
    for group in groups:
        out = dst if single else f"{dst}/{store_name(group[0])}"
        try:
            summary = convert_file(group if len(group) > 1 else group[0], out,
                                   overwrite=overwrite, resume=resume, scheduler=scheduler,
                                   num_workers=workers, shard_bytes=int(shard_mb * 2**20),
                                   allow_truncated=allow_truncated, storage_options=opts,
                                   target_options=_json_option("--target-options",
                                                               target_options),
                                   pin_version=not no_pin_version,
                                   ome=not no_ome, ome_levels=ome_levels,
                                   progress=_ProgressLine(store_name(group[0]), quiet))
        except _ONE_SOURCE_ERRORS as exc:
            if len(groups) == 1:
                raise
            # one damaged or cut-off acquisition of many: the others are converted,
            # and the command fails at the end naming each that was not
            failed.append(group[0])
            log = _log_error(exc)
            click.echo(f"error: {exc} (not converted; going on with the others"
                       + (f"; details: {log})" if log else ")"), err=True)
            continue
        if not quiet and summary.already_complete:
            click.echo(f"{summary.source} -> {summary.destination}: already complete "
                       f"({summary.frames} frames, {summary.photons} photons)")
        elif not quiet:
            click.echo(f"{summary.source} -> {summary.destination}: {summary.frames} frames, "
                       f"{summary.photons} photons, {summary.source_bytes / 1e6:.1f} MB -> "
                       f"{summary.store_bytes / 1e6:.1f} MB (x{summary.compression_ratio:.2f}) "
                       f"in {summary.seconds:.1f} s"
                       + (f" ({summary.batches_skipped} of {summary.batches} batches were "
                          "already done)" if summary.batches_skipped else ""))
    if failed:
        raise ConversionError(f"{len(failed)} of {len(groups)} acquisitions were not "
                              f"converted: {', '.join(failed)} (their errors are above)")



@cli.command()
@click.argument("source")
@click.argument("store")
@click.option("--storage-options", default=None,
              help="fsspec storage options for a source URL, as JSON.")
@click.option("--target-options", default=None,
              help="fsspec storage options for a store URL, as JSON.")
@click.option("--no-pin-version", is_flag=True, help=_NO_PIN_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(source: str, store: str, storage_options: str | None, target_options: str | None,
           no_pin_version: bool, quiet: bool) -> None:
    """Compare STORE (a converted Zarr store) with SOURCE, frame by frame."""
    from .store import is_converted_store
    from .store import verify as run_verify

    source_opts = _json_option("--storage-options", storage_options)
    store_opts = _json_option("--target-options", target_options)
    if not is_converted_store(store, store_opts):
        hint = (f"; {source} is one: the arguments are SOURCE then STORE"
                if is_converted_store(source, source_opts) else "")
        raise ValueError(f"verify SOURCE STORE: {store} is not a converted siff-xarray "
                         f"store{hint}")

    problems = run_verify(source, store, storage_options=source_opts,
                          target_options=store_opts, pin_version=not no_pin_version,
                          progress=not quiet)
    if problems:
        for p in problems:
            click.echo(f"DIFFERENT: {p}")
        sys.exit(1)
    click.echo(f"OK: {store} holds every photon, count image, timestamp and description "
               f"of {source}")


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--storage-options", default=None,
              help="fsspec storage options for URLs, as JSON (e.g. '{\"anon\": true}').")
@click.option("--no-pin-version", is_flag=True, help=_NO_PIN_HELP)
def index(sources: tuple[str, ...], storage_options: str | None, no_pin_version: bool) -> None:
    """Write a frame-index sidecar (FILE.siffidx) next to each SOURCE file or URL.

    Any machine then opens SOURCE without walking its IFD chain (a few requests on
    object storage instead of streaming the file). Places that cannot be written
    (read-only directories or buckets) are reported and skipped.
    """
    from ._paths import expand
    from .reader.siff_file import SiffFile

    opts = _json_option("--storage-options", storage_options)
    for src in [x for s in sources for x in expand(s, opts)]:
        with SiffFile(src, storage_options=opts, pin_version=not no_pin_version) as f:
            where = f.write_sidecar()
            current = f.sidecar_found  # (one there already: not written)
            n = f.num_frames
        if where is None:
            click.echo(f"skipped: {src} (its sidecar cannot be written there)")
        elif current is not None:
            click.echo(f"up to date: {where} ({n} frames)")
        else:
            click.echo(f"wrote {where} ({n} frames)")


@cli.command("to-tiff")
@click.argument("source")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def to_tiff(source: str, output: str, overwrite: bool) -> None:
    """Write the photon counts of SOURCE as a ScanImage-style TIFF (OUTPUT).

    Every frame, flyback included, becomes a 16-bit page with its original
    description, after SOURCE's ScanImage header: what ScanImage writes without FLIM.
    """
    from .store import to_tiff as run

    n = run(source, output, overwrite=overwrite)
    click.echo(f"{source} -> {output}: {n} frames")


@cli.command()
@click.argument("source")
@click.option("--channel", type=int, default=None,
              help="ScanImage channel number to align on (default: the first).")
@click.option("--method", type=click.Choice(["likelihood", "phase", "suite2p"]),
              default="likelihood", show_default=True,
              help="Native photon-count likelihood, native FFT correlation, or suite2p 1.x.")
@click.option("--max-shift", type=int, default=None, help="Largest shift searched (pixels).")
@click.option("--motion", type=click.Choice(["frame", "volume"]), default="frame",
              show_default=True, help="One shift per frame, or one per volume (all planes).")
@click.option("--step-cost", type=float, default=0.0, show_default=True,
              help="likelihood: prior of smooth motion, nats per pixel moved between "
                   "consecutive frames (0: frames independent).")
@click.option("--regularize-sigma", type=float, default=0.0, show_default=True,
              help="Pool neighbouring planes (Gaussian width in planes; 0: independent).")
@click.option("--output", type=click.Path(), default=None,
              help="Where to write the shifts (.zarr or .nc); default SOURCE.shifts.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def register(source: str, channel: int | None, method: str, max_shift: int | None,
             motion: str, step_cost: float, regularize_sigma: float, output: str | None,
             overwrite: bool, quiet: bool) -> None:
    """Register SOURCE (a .siff or a converted .zarr) and save its shifts beside it.

    The output holds shift_y, shift_x, quality over (time, z) and the reference
    images; apply them with ds.siff.apply_shifts(xr.open_zarr(OUTPUT)).
    """
    import xarray as xr

    from .store import is_converted_store, open_converted

    out = output or f"{source.rstrip('/')}.shifts.zarr"
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    opened = (open_converted(source) if is_converted_store(source)
              else xr.open_dataset(source, engine="siff"))
    with opened as ds:
        reg = ds.siff.register(channel=channel, method=method, max_shift=max_shift,
                               motion=motion, step_cost=step_cost,
                               regularize_sigma=regularize_sigma,
                               progress=not quiet).compute()
    reg.attrs.update({"source": source, "convention": reg.shift_y.attrs["convention"]})
    if out.endswith(".nc"):
        reg.to_netcdf(out, mode="w")
    else:
        import warnings

        # consolidated, so that xr.open_zarr(out) opens it without a warning (zarr-python
        # warns, when writing, that v3 has no consolidated metadata in its spec yet)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently")
            reg.to_zarr(out, mode="w", consolidated=True)
    n = reg.sizes["time"] * reg.sizes["z"]
    click.echo(f"{source}: {n} frames registered ({method}); shifts y {int(reg.shift_y.min())}"
               f"..{int(reg.shift_y.max())}, x {int(reg.shift_x.min())}.."
               f"{int(reg.shift_x.max())} pixels -> {out}")


def _log_path() -> Path:
    """Where the CLI records full tracebacks of the errors it reports in one line."""
    env = os.environ.get("SIFF_XARRAY_LOG_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or
                                      Path.home() / ".cache") / "siff-xarray"
    return base / "siff-xarray.log"


def _log_error(exc: BaseException) -> Path | None:
    import datetime
    import traceback

    path = _log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(f"--- {datetime.datetime.now().isoformat()} siff-xarray "
                     f"{' '.join(sys.argv[1:])}\n")
            fh.write("".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None


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
            PermissionError, ValueError, OSError, ImportError) as e:
        if debug:
            raise
        log = _log_error(e)
        click.echo(f"error: {e}" + (f" (details: {log})" if log else ""), err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
