"""Prediction benchmark: how far the real predict path is from the network's own speed, from MONAI, and in memory.

On one synthetic volume and one patch grid it measures

1. the floor: the network (forward + final activation) over exactly the patches of the grid, pre-made as tensors
   on the device, in the same batches — nothing else;
2. ours: the real ``trainer.predict`` path — HDF5 reads through ``HDF5DataModule``'s ``PredictDataset`` and
   ``DataLoader``, the network, streaming stitching and the HDF5 writes of ``PredictionWriter`` — timed from the
   start to the end of the predict loop (files complete on disk). The whole ``trainer.predict`` call, which adds
   set-up (scanning the volume for its normalisation statistics, building the trainer), is shown beside it;
3. the overhead, ``(2) / (1) - 1`` (goal: at most 3 %). A figure near or below zero means the machine was too noisy
   for the measurement: use ``--repeats`` and a quiet machine;
4. if MONAI is installed, ``monai.inferers.sliding_window_inference`` with the same network on the same grid
   (``roi_size`` = patch, ``overlap`` = ``1 - stride / patch`` per axis, the same batch size; ``mode="constant"``
   for our ``average``, ``"gaussian"`` with ``sigma_scale=1/8`` for ours), on the normalised volume already in
   device memory, without writing anything; and the ratio ours / MONAI (goal: at most 0.8). With ``average`` the
   two outputs agree to float32 rounding; with ``gaussian`` they differ where every covering patch has a tiny
   weight, because MONAI floors its importance map (at about 1e-3) and ours is the exact Gaussian (given our map as
   ``roi_weight_map``, MONAI agrees with us again). The timings compare like with like either way;
5. peak resident memory of a prediction with a tiny network (f_maps 2, one level) for a volume of depth ``D`` and
   one of depth ``4 D``, each in a fresh subprocess, against the growth of the output (goal: peak growth at most
   25 % of the output's growth). The peak of the whole process includes set-up (imports, the volume scan for the
   normalisation statistics); the peak of the predict loop alone is read from the kernel's high-water mark, reset
   when the loop starts (Linux). The default in-plane size makes the input larger than HDF5's 64 MiB read cache
   already at depth ``D``, so that the cache's filling does not pass for growth.

Examples::

    python benchmarks/bench_predict.py                                  # small CPU run, a few minutes on 2 cores
    python benchmarks/bench_predict.py --device cuda --precision bf16 --shape 256 512 512 \\
        --patch 64 128 128 --f-maps 32 --num-levels 4 --batch-size 4 --workers 4 --repeats 3
    python benchmarks/bench_predict.py --skip-rss --profile             # where does our time go?

MONAI is optional (``pip install monai``); the package itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


try:
    import unet3d_lightning  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The process's allocator as the unet3d command sets it (UNET3D_CPU_ALLOCATOR, default PyTorch's huge pages), set
# before torch is imported, which reads it at its first allocation; every way compared here runs in this one process,
# so all get the same.
from unet3d_lightning.launcher import configure_allocator  # noqa: E402 - imports nothing heavy

ALLOCATOR = configure_allocator()

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from unet3d_lightning.cli import silence_known_noise
from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.data.patches import padded_shape, patch_grid
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.engine import inference_context
from unet3d_lightning.prediction.callback import PredictionWriter


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
                   help="volume shape for (1)-(4). Default 64 128 128.")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64], help="patch shape. Default 32 64 64.")
    p.add_argument("--stride", type=int, nargs=3, default=None,
                   help="stride. Default: patch - patch // 4, the datamodule's default (a quarter overlap).")
    p.add_argument("--batch-size", type=int, default=2, help="patches per batch. Default 2.")
    p.add_argument("--f-maps", type=int, default=16, help="feature maps of the first level. Default 16.")
    p.add_argument("--num-levels", type=int, default=3, help="U-Net levels. Default 3.")
    p.add_argument("--num-groups", type=int, default=8, help="GroupNorm groups. Default 8.")
    p.add_argument("--out-channels", type=int, default=2, help="classes (softmax output). Default 2.")
    p.add_argument("--blend", choices=("average", "gaussian"), default="average", help="Default average.")
    p.add_argument("--halo", type=int, default=0, help="our halo (MONAI has none; keep 0 to compare). Default 0.")
    p.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip", help="Default gzip.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Default cpu.")
    p.add_argument("--precision", choices=("32", "bf16"), default="32",
                   help="32: float32; bf16: bf16 autocast for the network (Lightning's bf16-mixed). Default 32.")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading HDF5. Default 0.")
    p.add_argument("--contiguous", action="store_true", help="turn model.channels_last off for every run.")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs of (1), (2) and (4); the best is kept. Default 1.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's choice.")
    p.add_argument("--rss-depth", type=int, default=64, help="depth D of the memory test (and 4 D). Default 64.")
    p.add_argument("--rss-shape", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="in-plane size of the memory test. Default 512 512 (input larger than HDF5's read cache).")
    p.add_argument("--skip-rss", action="store_true", help="skip (5).")
    p.add_argument("--skip-monai", action="store_true", help="skip (4) even if MONAI is installed.")
    p.add_argument("--profile", action="store_true", help="also profile one run of (2) and print the top functions.")
    p.add_argument("--workdir", default=None, help="where volumes and outputs go. Default: a temporary directory.")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: one memory run
    args = p.parse_args(argv)
    if args.stride is None:
        args.stride = [q - q // 4 for q in args.patch]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and models
# ----------------------------------------------------------------------------------------------------------------------


def write_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A smooth random field plus noise, written z-block by z-block so that writing needs little memory."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    yy, xx = np.meshgrid(np.linspace(0, 8, h), np.linspace(0, 8, w), indexing="ij")
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("raw", shape=shape, dtype="float32", chunks=(min(d, 32), min(h, 128), min(w, 128)))
        for z0 in range(0, d, 32):
            zs = np.linspace(0, 8 * d / max(h, 1), d)[z0 : z0 + 32]
            field = np.sin(zs[:, None, None] + phase[0]) * np.cos(yy + phase[1]) * np.sin(xx + phase[2])
            raw[z0 : z0 + len(zs)] = (field + rng.normal(0, 0.2, field.shape)).astype(np.float32)
    return path


def build_model(f_maps: int, num_levels: int, num_groups: int, out_channels: int,
                channels_last: bool = True) -> UNet3DModule:
    torch.manual_seed(0)
    model = UNet3DModule(in_channels=1, out_channels=out_channels, f_maps=f_maps, num_levels=num_levels,
                         num_groups=num_groups, loss="ce", channels_last=channels_last)
    # The network's layout as a run would set it (channels-last on CPU/CUDA unless turned off), so that the floor
    # and MONAI run the same network as (2).
    model.use_memory_format(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval()


def autocast(device: str, precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, enabled=False)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def normalised_volume(path: Path) -> np.ndarray:
    """The datamodule's default normalisation: (x - mean) / std over the volume (float64 statistics)."""
    with h5py.File(path, "r") as f:
        raw = f["raw"][()]
    x = raw.astype(np.float64)
    return ((raw - x.mean()) / max(x.std(), 1e-8)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# (1) the floor, (2) ours, (4) MONAI
# ----------------------------------------------------------------------------------------------------------------------


def make_batches(volume: np.ndarray, patch, stride, batch_size: int, device: str) -> list[torch.Tensor]:
    """The grid's patches, zero-padded like the datamodule does, in its z-major order and batches, on the device."""
    padded = padded_shape(volume.shape, patch)
    canvas = np.zeros(padded, np.float32)
    canvas[: volume.shape[0], : volume.shape[1], : volume.shape[2]] = volume
    grid = patch_grid(padded, patch, stride)
    patches = [torch.from_numpy(np.ascontiguousarray(canvas[s]))[None] for s in grid]
    return [torch.stack(patches[i : i + batch_size]).to(device) for i in range(0, len(patches), batch_size)]


def bf16_difference(model: UNet3DModule, batches: list[torch.Tensor], args: argparse.Namespace) -> float:
    """Largest absolute difference of the probabilities under bf16 autocast from the float32 ones, over every patch
    of the grid (the accuracy price of ``--trainer.precision bf16-mixed``)."""
    largest = 0.0
    with torch.inference_mode():
        for batch in batches:
            reference = model.final_activation(model(batch)).float()
            with autocast(args.device, "bf16"):
                mixed = model.final_activation(model(batch)).float()
            largest = max(largest, float((mixed - reference).abs().max()))
    return largest


def time_floor(model: UNet3DModule, batches: list[torch.Tensor], args: argparse.Namespace) -> float:
    model.to(args.device)
    best = float("inf")
    # The kernel choice of the predict path (oneDNN also for batches of one on a CPU), so that the floor runs the
    # same convolutions as (2).
    with torch.inference_mode(), autocast(args.device, args.precision), inference_context(args.device, model.net):
        model.final_activation(model(batches[0]))  # warm-up: allocator, kernels, cuDNN choices
        for _ in range(args.repeats):
            synchronize(args.device)
            start = time.perf_counter()
            for batch in batches:
                model.final_activation(model(batch))
            synchronize(args.device)
            best = min(best, time.perf_counter() - start)
    return best


class LoopTimer(Callback):
    """Wall time from the start to the end of the predict loop; the last volume is on disk by then."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def run_ours(model: UNet3DModule, path: Path, out_dir: Path, args: argparse.Namespace,
             extra_callbacks: tuple = ()) -> tuple[float, float]:
    """One real ``trainer.predict``; returns (predict-loop seconds, whole-call seconds)."""
    timer = LoopTimer(args.device)
    writer = PredictionWriter(str(out_dir), blend=args.blend, halo=args.halo, compression=args.compression)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[timer, *extra_callbacks, writer],
    )
    datamodule = HDF5DataModule(
        predict_paths=[str(path)], predict_patch_shape=list(args.patch), predict_stride_shape=list(args.stride),
        batch_size=args.batch_size, num_workers=args.workers,
    )
    start = time.perf_counter()
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    return timer.seconds, time.perf_counter() - start


def time_ours(model: UNet3DModule, path: Path, workdir: Path, args: argparse.Namespace) -> tuple[float, float]:
    loops, calls = [], []
    for r in range(args.repeats):
        loop, call = run_ours(model, path, workdir / f"ours_{r}", args)
        loops.append(loop)
        calls.append(call)
    return min(loops), min(calls)


def profile_ours(model: UNet3DModule, path: Path, workdir: Path, args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run_ours(model, path, workdir / "profile", args)
    profiler.disable()
    print("\nprofile of one run of (2), main thread, top 25 by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def time_monai(model: UNet3DModule, volume: np.ndarray, args: argparse.Namespace) -> tuple[float, int] | None:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    # MONAI's window step is int(roi * (1 - overlap)); the tiny epsilon keeps floating error from rounding it below
    # our stride.
    overlap = [max(0.0, 1.0 - s / p - 1e-6) for s, p in zip(args.stride, args.patch)]
    mode = "constant" if args.blend == "average" else "gaussian"
    windows = -1
    try:
        from monai.data.utils import dense_patch_slices

        steps = [s if p < n else p for s, p, n in zip(args.stride, args.patch, volume.shape)]
        windows = len(dense_patch_slices(volume.shape, args.patch, steps))
    except Exception:  # noqa: BLE001 - only a consistency print
        pass
    model.to(args.device)
    x = torch.from_numpy(volume)[None, None].to(args.device)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return model.final_activation(model(batch))

    best = float("inf")
    with torch.inference_mode(), autocast(args.device, args.precision):
        for _ in range(args.repeats):
            synchronize(args.device)
            start = time.perf_counter()
            sliding_window_inference(x, list(args.patch), args.batch_size, predictor, overlap=overlap, mode=mode,
                                     sigma_scale=0.125, padding_mode="constant", cval=0.0)
            synchronize(args.device)
            best = min(best, time.perf_counter() - start)
    return best, windows


# ----------------------------------------------------------------------------------------------------------------------
# (5) memory
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class LoopPeak(Callback):
    """Resets the kernel's peak-RSS mark when the predict loop starts and reads it when the loop ends (Linux)."""

    def __init__(self) -> None:
        self.setup_peak_kib: int | None = None
        self.start_kib: int | None = None
        self.peak_kib: int | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.setup_peak_kib = _status_kib("VmHWM")  # imports, model, volume scan, trainer set-up
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS
            self.start_kib = _status_kib("VmRSS")
        except OSError:
            self.start_kib = None

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_kib is not None:
            self.peak_kib = _status_kib("VmHWM")


def rss_child(args: argparse.Namespace) -> None:
    """One prediction with a tiny network in this fresh process; prints its memory figures as JSON."""
    # The network is made as cheap as possible: memory, not speed, is measured, and reading, stitching and writing
    # should dominate.
    model = build_model(f_maps=2, num_levels=1, num_groups=1, out_channels=args.out_channels)
    peak = LoopPeak()
    path = Path(args.rss_child)
    run_ours(model, path, path.parent / f"out_{path.stem}", args, extra_callbacks=(peak,))
    print(json.dumps({
        "process_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "setup_peak_kib": peak.setup_peak_kib, "loop_start_kib": peak.start_kib, "loop_peak_kib": peak.peak_kib,
    }))


def measure_rss(workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    h, w = args.rss_shape
    for depth in (args.rss_depth, 4 * args.rss_depth):
        path = write_volume(workdir / f"rss_{depth}.h5", (depth, h, w), seed=1)
        command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(path),
                   "--patch", *map(str, args.patch), "--stride", *map(str, args.stride),
                   "--batch-size", str(args.batch_size), "--blend", args.blend, "--halo", str(args.halo),
                   "--compression", args.compression, "--device", args.device, "--precision", args.precision,
                   "--workers", str(args.workers), "--out-channels", str(args.out_channels)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"memory run for depth {depth} failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        figures["depth"] = depth
        figures["output_bytes"] = args.out_channels * depth * h * w * 4  # float32 probabilities
        rows.append(figures)
        path.unlink()
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def mib(kib_or_bytes: float, unit: str = "kib") -> str:
    value = kib_or_bytes / 1024 if unit == "kib" else kib_or_bytes / 1024**2
    return f"{value:,.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"CPU allocator: {ALLOCATOR}", flush=True)
    silence_known_noise()  # the same filters as the unet3d command: only the results on screen
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_predict_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    path = write_volume(workdir / "volume.h5", shape)
    volume = normalised_volume(path)
    model = build_model(args.f_maps, args.num_levels, args.num_groups, args.out_channels, not args.contiguous)
    params = sum(p.numel() for p in model.parameters())
    batches = make_batches(volume, args.patch, args.stride, args.batch_size, args.device)
    n_patches = sum(len(b) for b in batches)

    print(f"volume {shape}, patch {tuple(args.patch)}, stride {tuple(args.stride)}, {n_patches} patches in "
          f"{len(batches)} batches of {args.batch_size}; U-Net f_maps {args.f_maps}, {args.num_levels} levels, "
          f"{params:,} parameters; device {args.device}, precision {args.precision}, torch threads "
          f"{torch.get_num_threads()}, blend {args.blend}, halo {args.halo}, compression {args.compression}, "
          f"workers {args.workers}, best of {args.repeats}", flush=True)

    floor = time_floor(model, batches, args)
    bf16_error = bf16_difference(model, batches, args) if args.precision == "bf16" else None
    del batches
    loop, call = time_ours(model, path, workdir, args)
    monai = None if args.skip_monai else time_monai(model, volume, args)
    rss = [] if args.skip_rss else measure_rss(workdir, args)

    rows = [
        ("(1) network only, pre-made patches on the device (floor)", f"{floor:8.2f} s",
         f"{n_patches / floor:8.1f}", ""),
        ("(2) ours: trainer.predict loop (read + network + stitch + write)", f"{loop:8.2f} s",
         f"{n_patches / loop:8.1f}", ""),
        ("    ours: whole trainer.predict call (adds volume scan, set-up)", f"{call:8.2f} s",
         f"{n_patches / call:8.1f}", ""),
        ("(3) overhead (2) / (1) - 1", f"{100 * (loop / floor - 1):7.1f} %", "", "goal <= 3 %"),
    ]
    if bf16_error is not None:
        rows.append(("    bf16: max |probability - float32 probability| over the grid", f"{bf16_error:8.4f}", "", ""))
    if monai is None:
        rows.append(("(4) MONAI sliding_window_inference", "  skipped" if args.skip_monai else "  not installed",
                     "", ""))
    else:
        seconds, windows = monai
        note = f"{windows} windows" if windows >= 0 else ""
        rows.append((f"(4) MONAI sliding_window_inference ({'constant' if args.blend == 'average' else 'gaussian'}, "
                     "in memory, no I/O)", f"{seconds:8.2f} s", f"{n_patches / seconds:8.1f}", note))
        rows.append(("    ours / MONAI (loop time)", f"{loop / seconds:8.2f}", "", "goal <= 0.8"))
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'step':<{width}}{'time':>10}{'patches/s':>11}  note")
    for label, value, rate, note in rows:
        print(f"{label:<{width}}{value:>10}{rate:>11}  {note}")

    if rss:
        small, large = rss
        out_growth = large["output_bytes"] - small["output_bytes"]
        print(f"\n(5) peak resident memory, tiny U-Net (f_maps 2, 1 level), in-plane {tuple(args.rss_shape)}, "
              "each run in a fresh process")
        print(f"{'depth':>7}{'output (float32)':>18}{'process peak':>15}{'set-up peak':>14}{'loop start':>13}"
              f"{'loop peak':>12}")
        for r in rss:
            setup_peak, loop_start, loop_peak = (
                mib(r[key]) if r[key] else "n/a" for key in ("setup_peak_kib", "loop_start_kib", "loop_peak_kib")
            )
            print(f"{r['depth']:>7}{mib(r['output_bytes'], 'bytes'):>18}{mib(r['process_peak_kib']):>15}"
                  f"{setup_peak:>14}{loop_start:>13}{loop_peak:>12}")
        growth = (large["process_peak_kib"] - small["process_peak_kib"]) * 1024
        print(f"process peak growth {mib(growth, 'bytes')} = {100 * growth / out_growth:.0f} % of the output's growth "
              f"{mib(out_growth, 'bytes')} (goal <= 25 %)")
        if small["loop_peak_kib"] and large["loop_peak_kib"]:
            loop_growth = (large["loop_peak_kib"] - small["loop_peak_kib"]) * 1024
            print(f"predict-loop peak growth {mib(loop_growth, 'bytes')} = {100 * loop_growth / out_growth:.0f} % of "
                  "the output's growth (goal <= 25 %)")
    if args.profile:
        profile_ours(model, path, workdir, args)
    print(f"\nfiles in {workdir}")


if __name__ == "__main__":
    main()
