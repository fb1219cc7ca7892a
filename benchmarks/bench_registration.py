"""Registration accuracy against the oracle, and speed against suite2p.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_registration.py              # every file below
    .venv/bin/python benchmarks/bench_registration.py --volumes 50 # quicker

Synthetic files with known motion (256x128 frames, 6 planes + 1 flyback, the
benchmark session's layout), written to ``benchmarks/_data`` on first use:

* ``session 0.73``: one channel, 24,000 photons per frame (0.73 per pixel), motion
  a random walk of one-pixel steps per scan (issue 18's file);
* ``session 0.30``: the same at 9,830 photons per frame (0.30 per pixel);
* ``walkthrough``: two channels (the second at a tenth of the brightness),
  registered on the bright one;
* ``drift+jumps``: 0.30 photons per pixel, slow drift (a step every 40 scans) with
  four jumps of several pixels.

For each file and plane: the fraction of frames whose shift equals the truth up
to one constant per plane, for ``ds.siff.register()`` (the native likelihood
method), its ``step_cost=3`` motion prior (drift file), the older ``"phase"``
method, suite2p 1.x rigid (CPU), and the oracle that knows the true scene and
takes each frame's shift of maximum multinomial likelihood
(:meth:`siff_xarray.synthetic.SyntheticTruth.oracle_shifts`) -- the limit for
any method that, like these, treats frames independently. Then frames per
second (references included), median over ``--repeats`` runs in this process: on
the 100-volume file (where building the references from every volume dominates)
and on the bright channel of ``bench_reader.py``'s session file
(``--throughput-volumes``, default 700: 4200 frames).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _drift(n_scans: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    walk = np.zeros((n_scans, 2), dtype=np.int64)
    jumps = set(np.linspace(0, n_scans, 6).astype(int)[1:-1])
    for k in range(1, n_scans):
        walk[k] = np.clip(walk[k - 1] + (rng.integers(-1, 2, 2) if k % 40 == 0 else 0), -4, 4)
        if k in jumps:
            walk[k] = -walk[k]
    return walk


FILES = {
    "session 0.73": {"channels": (1,), "photons_per_frame": 24000, "seed": 3},
    "session 0.30": {"channels": (1,), "photons_per_frame": 9830, "seed": 5},
    "walkthrough": {"channels": (1, 2), "photons_per_frame": 24000, "seed": 4,
                    "channel_brightness": (1.0, 0.1)},
    "drift+jumps": {"channels": (1,), "photons_per_frame": 9830, "seed": 6, "motion": "drift"},
}


def _file(name: str, volumes: int):  # -> SyntheticTruth
    from siff_xarray.synthetic import write_siff

    kw = dict(FILES[name])
    path = HERE / "_data" / f"reg_{name.replace(' ', '_').replace('+', '_')}_{volumes}v.siff"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kw.pop("motion", None) == "drift":
        kw["motion"] = _drift(volumes * 7 * len(kw["channels"]), kw["seed"])
    return write_siff(path, shape=(256, 128), n_slices=6, n_flyback=1, n_timepoints=volumes,
                      max_shift=4, encoding="compressed", **kw)


def _rate(est: np.ndarray, truth: np.ndarray) -> float:
    _, counts = np.unique(est - truth, axis=0, return_counts=True)
    return counts.max() / len(est)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-suite2p", action="store_true")
    ap.add_argument("--throughput-volumes", type=int, default=700)
    args = ap.parse_args()
    import xarray as xr

    import siff_xarray  # noqa: F401 - registers ds.siff

    methods: dict[str, dict] = {"likelihood": {}, "phase": {"method": "phase"}}
    if not args.no_suite2p:
        try:
            import suite2p  # noqa: F401
            methods["suite2p"] = {"method": "suite2p", "device": "cpu"}
        except ImportError:
            print("suite2p not installed: its columns are skipped")
    speed: dict[str, list[float]] = {m: [] for m in methods}
    print("| file | method | " + " | ".join(f"plane {k}" for k in range(6)) + " |")
    print("|---|---|" + "---:|" * 6)
    for name in FILES:
        truth = _file(name, args.volumes)
        with xr.open_dataset(truth.path, engine="siff") as ds:
            ds = ds.load()
            fmap = ds.frame_index.sel(channel=1).values
            img = ds.intensity.sel(channel=1).values
            ok = (fmap >= 0).all(axis=1)
            rows = {"oracle (true scene)": [
                _rate(truth.oracle_shifts(img[ok, k], fmap[ok, k]), truth.shifts[fmap[ok, k]])
                for k in range(6)]}
            runs = dict(methods)
            if name == "drift+jumps":
                runs["likelihood, step_cost=3"] = {"step_cost": 3.0}
            for label, kw in runs.items():
                times = []
                for _ in range(args.repeats if name == "session 0.73" else 1):
                    t0 = time.perf_counter()
                    reg = ds.siff.register(channel=1, **kw)
                    times.append(time.perf_counter() - t0)
                if label in speed and name == "session 0.73":
                    speed[label] = times
                est = np.stack([reg.shift_y.values, reg.shift_x.values], axis=-1)
                rows[label] = [_rate(est[ok, k], truth.shifts[fmap[ok, k]]) for k in range(6)]
            for label, rates in rows.items():
                print(f"| {name} | {label} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")
    _speed_table(f"session 0.73 ({args.volumes} volumes)", args.volumes * 6 + 6, speed)
    if args.throughput_volumes:
        _throughput(args.throughput_volumes, methods, args.repeats)


def _speed_table(title: str, n: int, speed: dict[str, list[float]]) -> None:
    print(f"\n{title}, {n} frames of one channel, references included:\n")
    print("| method | s (median) | frames/s | speed vs suite2p |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(speed["suite2p"]) if speed.get("suite2p") else None
    for label, times in speed.items():
        med = statistics.median(times)
        ratio = f"{ref / med:.1f}x" if ref else ""
        print(f"| {label} | {med:.2f} | {n / med:.0f} | {ratio} |")


def _throughput(volumes: int, methods: dict[str, dict], repeats: int) -> None:
    import sys

    import xarray as xr

    sys.path.insert(0, str(HERE))
    from bench_reader import session_file

    path = session_file(volumes, 24000)
    with xr.open_dataset(path, engine="siff") as ds:
        one = ds.assign(intensity=ds.intensity.sel(channel=[1]).load())
        speed: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(repeats):
            for label, kw in methods.items():
                t0 = time.perf_counter()
                one.siff.register(channel=1, **kw)
                speed[label].append(time.perf_counter() - t0)
        _speed_table(f"{path.name}", one.sizes["time"] * one.sizes["z"], speed)


if __name__ == "__main__":
    main()
