"""Scaling of DDP prediction with rank-owned output rows: 1, 2, 4 gloo ranks (one thread each) on a deep volume.

For each world size it runs the real ``unet3d predict --trainer.devices W --trainer.strategy ddp`` (CPU, gloo) into
Zarr, in a subprocess, and reports

- per rank: patches predicted, output values written, predict time, peak RSS, and the bytes that rank passed to
  ``torch.distributed`` collectives (from the writer's per-rank lines);
- the redundant-patch fraction (patches predicted by two ranks, over the distinct patches);
- the loopback interface's byte counters (``/proc/net/dev``, ``lo``) around the run: everything gloo sent, Lightning's
  own start-up and barriers included — and anything else on the machine using loopback meanwhile;
- the wall time of the whole command, and what the earlier design (every band all-reduced) would have sent.

Then it models 64 ranks on a ``10000^3`` volume from the assignment itself (:func:`assign_rows` on the z-axis; the
in-plane patches multiply every count alike) and from the per-patch cost measured here (``--gpu-patch-seconds`` for
an assumed GPU cost).

Examples::

    python benchmarks/bench_ddp_predict.py                          # small: ~2 min on 2 free cores
    python benchmarks/bench_ddp_predict.py --shape 512 64 64 --ranks 1 2 4 8
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^rank (\d+): (\d+) patches, (\d+) output voxels written in ([\d.]+) s(?:, peak RSS (\d+) MiB)?, "
                  r"(\d+) bytes sent", re.M)
REDUNDANT = re.compile(r"predicted (\d+) patches for (\d+) distinct ones: (\d+) redundant")


def command() -> list[str]:
    script = Path(sys.executable).parent / "unet3d"
    return [str(script)] if script.exists() else [sys.executable, "-m", "unet3d_lightning"]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def loopback() -> int:
    try:
        for line in open("/proc/net/dev"):
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]) + int(fields[8])  # rx + tx bytes
    except OSError:
        pass
    return 0


def run(args: list[str]) -> tuple[subprocess.CompletedProcess, float, int, int]:
    before_lo = loopback()
    start = time.perf_counter()
    result = subprocess.run([*command(), *args], capture_output=True, text=True, env=env(), timeout=3600)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit((result.stdout + result.stderr)[-3000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result, wall, loopback() - before_lo, rss


def model(patch: int, stride: int, channels: int, size: int, ranks: int, patch_seconds: float) -> list[str]:
    """The assignment for ``ranks`` on a ``size^3`` volume, computed on a z-only plan (one in-plane patch per z-start:
    every in-plane count is the same factor)."""
    from unet3d_lightning.data.patches import patch_grid
    from unet3d_lightning.prediction.distributed import assign_rows

    class Plan:
        pass

    plan = Plan()
    plan.volume = Plan()
    plan.volume.spatial_shape = (size, patch, patch)
    plan.grid = patch_grid((size, patch, patch), (patch, patch, patch), (stride, patch, patch))
    a = assign_rows([plan], ranks)
    per_plane = (len(range(0, size - patch, stride)) + 1) ** 2
    distinct = a.unique * per_plane
    most = max(len(i) for i in a.items) * per_plane
    band = (channels + 1) * patch * size * size * 4
    row = channels * 16 * size * size * 4
    allreduce = 2 * (ranks - 1) / ranks * size**3 * (channels + 1) * 4
    return [
        f"model: {ranks} ranks, {size}^3 volume, patch {patch}^3, stride {stride}, {channels} channels",
        f"  distinct patches {distinct:,}; most on one rank {most:,} (ideal {distinct / ranks:,.0f}); redundant "
        f"{a.redundant * per_plane:,} ({a.redundant / a.unique:.1%})",
        f"  rows per rank ~{size / ranks:.0f} ({math.ceil(size / 16 / ranks)} chunk rows)",
        f"  bytes sent per rank: ~{ranks * 400:,} (one gathering of ~400-byte reports, one broadcast of store paths); "
        f"the earlier all-reduce of every band: {allreduce / 1e12:.1f} TB per rank",
        f"  wall at {patch_seconds * 1e3:.0f} ms per patch: {most * patch_seconds / 3600:.1f} h (one rank alone: "
        f"{distinct * patch_seconds / 3600:.0f} h)",
        f"  per-rank memory, independent of the rank count: stitcher band (C+1) x patch_z x H x W x 4 = "
        f"{band / 2**30:.0f} GiB on the device, writer chunk row C x 16 x H x W x 4 = {row / 2**30:.1f} GiB on the "
        "host",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 48, 48])
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 48, 48])
    parser.add_argument("--stride", type=int, nargs=3, default=[24, 48, 48])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--f-maps", type=int, default=8)
    parser.add_argument("--gpu-patch-seconds", type=float, default=0.05,
                        help="assumed GPU time per 128^3 patch for the 64-rank model (not measured here)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    rng = np.random.default_rng(0)
    with h5py.File(work / "train.h5", "w") as f:
        f["raw"] = rng.normal(size=(16, 48, 48)).astype(np.float32)
        f["label"] = (rng.random((16, 48, 48)) > 0.5).astype(np.uint8)
    with h5py.File(work / "deep.h5", "w") as f:
        f.create_dataset("raw", data=rng.normal(size=args.shape).astype(np.float32), chunks=True)
    run(["fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(work / "runs"), "--trainer.enable_progress_bar", "false",
         "--model.out_channels", "2", "--model.f_maps", str(args.f_maps), "--model.num_levels", "3",
         "--data.train_paths", f"[{work / 'train.h5'}]", "--data.train_patch_shape", "[16, 48, 48]",
         "--data.num_workers", "0", "--checkpoint.dirpath", str(work / "ckpt")])
    channels = 2
    print(f"volume {tuple(args.shape)}, patch {tuple(args.patch)}, stride {tuple(args.stride)}, U-Net f_maps "
          f"{args.f_maps} x 3 levels, Zarr output, gloo, OMP_NUM_THREADS=1, {os.cpu_count()} cores")
    per_patch = None
    for world in args.ranks:
        out = work / f"out_{world}"
        result, wall, lo, rss = run([
            "predict", "--ckpt_path", str(work / "ckpt" / "last.ckpt"), "--data.predict_paths",
            f"[{work / 'deep.h5'}]", "--data.predict_patch_shape", str(list(args.patch)),
            "--data.predict_stride_shape", str(list(args.stride)), "--data.num_workers", "0",
            "--prediction.output_dir", str(out), "--prediction.format", "zarr", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.devices", str(world), "--trainer.strategy", "ddp",
            # one rank, too, through the rank-owned path (a resumable run): the same report
            *(["--prediction.resume", "true"] if world == 1 else []),
        ])
        ranks = LINE.findall(result.stdout)
        redundant = REDUNDANT.search(result.stdout)
        print(f"\n{world} rank(s): wall {wall:.1f} s (whole command), loopback {lo:,} bytes during the run, "
              f"largest process peak RSS {rss / 2**20:.0f} MiB")
        for r, patches, values, seconds, peak, sent in ranks:
            print(f"  rank {r}: {patches} patches, {int(values):,} values written, {float(seconds):.1f} s, "
                  f"peak RSS {peak} MiB, {int(sent):,} bytes to collectives")
            if world == 1:
                per_patch = float(seconds) / int(patches)
        if redundant:
            total, distinct, extra = (int(g) for g in redundant.groups())
            print(f"  redundant patches: {extra} of {distinct} distinct ({extra / distinct:.1%})")
        d, h, w = args.shape
        allreduce = 2 * (world - 1) / world * d * h * w * (channels + 1) * 4
        print(f"  the earlier band all-reduce would send ~{allreduce:,.0f} bytes per rank")
    if per_patch:
        print(f"\nmeasured: {per_patch * 1e3:.1f} ms per {tuple(args.patch)} patch on one CPU thread (whole loop: "
              "read, network, stitch, write)")
    print()
    print("\n".join(model(128, 96, channels, 10_000, 64, args.gpu_patch_seconds)))


if __name__ == "__main__":
    main()
