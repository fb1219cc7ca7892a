"""Codec measurement for the converter: compression ratio and speed on our own data.

Run from the repository root (after the README's test set-up):

    .venv/bin/python benchmarks/bench_codecs.py

Takes 100 volumes of the session-like benchmark file (see ``bench_reader.py``):
their intensity (uint16 count images, chunks of whole volumes as the converter
writes them) and their photons' arrival times (uint16, chunks of 2**20), and writes
each to an in-memory Zarr v3 array with every candidate codec, reporting the
compression ratio and the write and read throughput (MB/s of uncompressed data).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reader import parse_args, session_file  # noqa: E402


def codecs() -> dict[str, tuple]:
    from zarr.codecs import BloscCodec, ZstdCodec

    return {
        "zstd 3 (zarr default)": (ZstdCodec(level=3),),
        "blosc zstd 1 bitshuffle (ours)": (BloscCodec(cname="zstd", clevel=1,
                                                      shuffle="bitshuffle"),),
        "blosc zstd 3 bitshuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),),
        "blosc zstd 5 bitshuffle (our earlier)": (BloscCodec(cname="zstd", clevel=5,
                                                           shuffle="bitshuffle"),),
        "blosc zstd 5 shuffle": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),),
        "blosc zstd 9 bitshuffle": (BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle"),),
        "blosc lz4 5 bitshuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
        "blosc lz4 5 shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    }


def measure(data: np.ndarray, chunks: tuple[int, ...], comp: tuple) -> tuple[float, float,
                                                                             float]:
    import zarr
    from zarr.storage import MemoryStore

    store = MemoryStore()
    arr = zarr.create_array(store, shape=data.shape, dtype=data.dtype, chunks=chunks,
                            compressors=comp)
    t = time.perf_counter()
    arr[...] = data
    write = time.perf_counter() - t
    t = time.perf_counter()
    back = arr[...]
    read = time.perf_counter() - t
    assert np.array_equal(back, data)
    stored = sum(len(v.to_bytes()) for k, v in store._store_dict.items()
                 if not k.endswith("zarr.json"))
    return data.nbytes / stored, data.nbytes / 1e6 / write, data.nbytes / 1e6 / read


def main() -> None:
    args = parse_args(__doc__)
    path = session_file(args.volumes, args.photons, args.path)
    import xarray as xr

    from siff_xarray import SiffFile

    with xr.open_dataset(path, engine="siff") as ds:
        inten = ds.intensity.isel(time=slice(0, 100)).values
        frames = np.arange(int(ds.frame_index.isel(time=slice(0, 100)).max()) + 1)
    with SiffFile(path) as f:
        _, _, tau = f.photons_batch(frames)
    tau = tau.astype(np.uint16)
    vol = inten.shape[1:]
    print(f"\n{path.name}: intensity {inten.shape} ({inten.nbytes / 1e6:.0f} MB), "
          f"{tau.size} arrival times ({tau.nbytes / 1e6:.0f} MB)\n")
    print("| codec | intensity ratio | write MB/s | read MB/s | arrival ratio | write MB/s |"
          " read MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, comp in codecs().items():
        ri, wi, rdi = measure(inten, (2, *vol), comp)
        ra, wa, rda = measure(tau, (1 << 20,), comp)
        print(f"| {name} | {ri:.2f} | {wi:.0f} | {rdi:.0f} | {ra:.2f} | {wa:.0f} | {rda:.0f} |")


if __name__ == "__main__":
    main()
