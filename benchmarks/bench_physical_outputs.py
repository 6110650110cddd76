"""Memory and time of the OME-Zarr and TIFF outputs as the depth of a volume grows.

Writes one volume's output through :class:`~unet3d_lightning.prediction.outputs.VolumeOutput` (no model: the rows
are random probabilities, written in slabs of ``--slab`` z-rows, as the stitcher hands them over), once per format
and depth, each in a fresh process, and prints the peak of memory that Python's allocators hand out while the
output is written and completed (``tracemalloc``: numpy buffers included; the TIFF's memory-mapped pages are file
pages the system writes back and reclaims, not counted) and the process's peak resident set (``ru_maxrss``), with
the wall time. Flat peaks across depths mean memory bounded by slabs, not the volume.

Examples::

    python benchmarks/bench_physical_outputs.py                       # 2 x {32, 128} x 512 x 512, 2 channels
    python benchmarks/bench_physical_outputs.py --depths 64 256 --size 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def one(format: str, depth: int, size: int, channels: int, slab: int) -> dict:
    import resource
    import time
    import tracemalloc
    from pathlib import Path

    import numpy as np

    from unet3d_lightning.prediction.outputs import VolumeOutput

    rng = np.random.default_rng(0)
    rows = rng.random((channels, slab, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        suffix = "_predictions.ome.zarr" if format == "ome-zarr" else "_predictions.tif"
        start = time.perf_counter()
        tracemalloc.start()
        output = VolumeOutput(Path(tmp) / f"v{suffix}", (depth, size, size), channels, "float32", "argmax", "gzip",
                              None, format, voxel_size=(1.0, 1.0, 1.0), unit="micrometer")
        for z0 in range(0, depth, slab):
            z1 = min(z0 + slab, depth)
            output.write(z0, z1, rows[:, : z1 - z0], None)
        output.commit()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        seconds = time.perf_counter() - start
    return {"format": format, "depth": depth, "peak_mib": peak / 2**20,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--size", type=int, default=512, help="H = W")
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--slab", type=int, default=12, help="z-rows per write (the stitcher's stride)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        format, depth = args.one.split(":")
        print(json.dumps(one(format, int(depth), args.size, args.channels, args.slab)))
        return
    slab_mib = args.channels * args.slab * args.size**2 * 4 / 2**20
    print(f"{args.channels} x D x {args.size} x {args.size} float32 + argmax segmentation, slabs of {args.slab} rows "
          f"({slab_mib:.0f} MiB)")
    print(f"{'format':>9} {'depth':>6} {'volume MiB':>11} {'peak MiB':>9} {'maxrss MiB':>11} {'s':>6}")
    for format in ("ome-zarr", "tiff"):
        for depth in args.depths:
            out = subprocess.run([sys.executable, __file__, "--one", f"{format}:{depth}", "--size", str(args.size),
                                  "--channels", str(args.channels), "--slab", str(args.slab)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            volume = args.channels * depth * args.size**2 * 4 / 2**20
            print(f"{format:>9} {depth:>6} {volume:>11.0f} {r['peak_mib']:>9.0f} {r['maxrss_mib']:>11.0f} "
                  f"{r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
