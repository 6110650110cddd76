"""Whole-process prediction benchmark: ``unet3d predict`` against a MONAI script and pytorch-3dunet's predictor.

Each tool does the whole job in a fresh process, as a user runs it: start Python, load the checkpoint, read the
HDF5 volume, predict every patch of the same grid (50 % overlap, the same batch size, the same U-Net architecture),
stitch, and write the probabilities to a gzip-compressed HDF5 file. Runs alternate between the tools (the order
rotates each round), so that a machine's slow phases hit every tool alike; medians and their ratios are printed.

* ``ours``: ``unet3d predict --ckpt_path …`` run as ``python -m unet3d_lightning`` (the console script's entry point, so with its
  default settings: huge pages for malloc, channels-last, ``data.num_workers`` auto);
* ``monai``: a plain script — the same network and checkpoint, the volume read whole and standardised,
  ``monai.inferers.sliding_window_inference`` (``overlap=0.5``, ``mode="constant"``, softmax per window),
  ``h5py.create_dataset(..., compression="gzip")``;
* ``p3d``: pytorch-3dunet's own prediction path (``get_model``, ``load_checkpoint``, ``get_test_loaders``,
  ``StandardPredictor``) from a config like its ``predict`` command's; its network is its own ``UNet3D`` with the
  same layout (``gcr`` blocks, nearest-neighbour upsampling, softmax), randomly initialised.

All three use the architecture pytorch-3dunet builds by default (layer order ``gcr``, ``upsample: interpolate``).
Figures per run: wall time of the process, and its peak resident memory (``wait4``'s ``ru_maxrss``: the larger of
the process's own peak and that of any of its reader processes).

Examples::

    python benchmarks/bench_compare.py                                    # default sizes, about 15 min on 2 cores
    python benchmarks/bench_compare.py --shape 32 128 128 --patch 16 64 64 --models 8:3 --repeats 1   # smoke run
    python benchmarks/bench_compare.py --tools ours p3d --depths 64 256 --models 16:4    # memory vs pytorch-3dunet

MONAI and pytorch-3dunet come with the ``bench`` extra; the package never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[64], help="volume depths to run. Default 64.")
    p.add_argument("--shape", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="in-plane size of the volume. Default 256 256.")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128], help="patch shape. Default 32 128 128.")
    p.add_argument("--batch-size", type=int, default=2, help="patches per batch. Default 2.")
    p.add_argument("--models", nargs="+", default=["8:3", "32:4"],
                   help="U-Nets as F_MAPS:LEVELS. Default 8:3 (small) 32:4 (standard).")
    p.add_argument("--tools", nargs="+", default=["ours", "monai", "p3d"], choices=("ours", "monai", "p3d"))
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs every tool once. Default 2.")
    p.add_argument("--workers", type=int, default=None,
                   help="reader processes for ours and p3d. Default: ours' automatic choice, the same for p3d.")
    p.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments for unet3d predict (last on the line), e.g. --trainer.precision bf16-mixed")
    p.add_argument("--workdir", default=None, help="where volumes and outputs go. Default: a temporary directory.")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: TOOL CONFIG.json
    args = p.parse_args(argv)
    args.stride = [q // 2 for q in args.patch]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Child processes: the MONAI script and pytorch-3dunet's predictor (what a user of either would run)
# ----------------------------------------------------------------------------------------------------------------------


def monai_child(job: dict[str, Any]) -> None:
    import h5py
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from unet3d_lightning.networks import UNet3D

    checkpoint = torch.load(job["checkpoint"], map_location="cpu", weights_only=True, mmap=True)
    hp = checkpoint["hyper_parameters"]
    net = UNet3D(hp["in_channels"], hp["out_channels"], hp["f_maps"], hp["num_levels"], hp["layer_order"],
                 hp["num_groups"], hp["upsample"])
    net.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    net.eval()
    with h5py.File(job["volume"], "r") as f:
        raw = f["raw"][()]
    stats = raw.astype(np.float64)
    raw = ((raw - stats.mean()) / max(stats.std(), 1e-8)).astype(np.float32)
    del stats
    x = torch.from_numpy(raw)[None, None]
    with torch.no_grad():
        out = sliding_window_inference(x, job["patch"], job["batch_size"], lambda b: torch.softmax(net(b), 1),
                                       overlap=0.5, mode="constant")
    with h5py.File(job["output"], "w") as f:
        f.create_dataset("predictions", data=out[0].numpy(), compression="gzip", chunks=True)


def p3d_config(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_path": job["p3d_checkpoint"],
        "device": "cpu",
        "model": {"name": "UNet3D", "in_channels": 1, "out_channels": job["out_channels"], "layer_order": "gcr",
                  "f_maps": job["f_maps"], "num_groups": job["num_groups"], "num_levels": job["num_levels"],
                  "final_sigmoid": False, "is_segmentation": True},
        "predictor": {"name": "StandardPredictor"},
        "loaders": {
            "output_dir": job["output_dir"], "batch_size": job["batch_size"], "num_workers": job["workers"],
            "raw_internal_path": "raw",
            "test": {"file_paths": [job["volume"]],
                     "slice_builder": {"name": "SliceBuilder", "patch_shape": job["patch"],
                                       "stride_shape": job["stride"]},
                     "transformer": {"raw": [{"name": "Standardize"}, {"name": "ToTensor", "expand_dims": True}]}},
        },
    }


def p3d_child(job: dict[str, Any]) -> None:
    # pytorch-3dunet's predict.main() without its argument parsing: the same calls in the same order.
    import logging

    from pytorch3dunet.datasets.utils import get_test_loaders
    from pytorch3dunet.predict import get_predictor
    from pytorch3dunet.unet3d import utils
    from pytorch3dunet.unet3d.config import TorchDevice
    from pytorch3dunet.unet3d.model import get_model

    logging.disable(logging.WARNING)
    config = p3d_config(job)
    config["device"] = TorchDevice.CPU
    model = get_model(config["model"])
    utils.load_checkpoint(config["model_path"], model)
    model = model.to(config["device"])
    predictor = get_predictor(model, config)
    for loader in get_test_loaders(config):
        predictor(loader)


# ----------------------------------------------------------------------------------------------------------------------
# Parent: inputs, alternating runs, report
# ----------------------------------------------------------------------------------------------------------------------


def run_process(command: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process (``ru_maxrss``: it or its largest reaped child)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    # Output goes to a file, not a pipe: wait4 (for this process's own rusage) cannot also drain a pipe.
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} … failed ({process.returncode}):\n{log.read()[-4000:]}")
    return seconds, usage.ru_maxrss


def make_inputs(workdir: Path, args: argparse.Namespace, f_maps: int, levels: int) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_predict import write_volume

    from unet3d_lightning.module import UNet3DModule

    groups = min(8, f_maps // 2)
    torch.manual_seed(0)
    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=f_maps, num_levels=levels, layer_order="gcr",
                          num_groups=groups, upsample="interpolate", loss="ce", multiclass=True)
    checkpoint = workdir / f"unet_{f_maps}_{levels}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    p3d_checkpoint = workdir / f"p3d_{f_maps}_{levels}.pytorch"
    if "p3d" in args.tools:
        from pytorch3dunet.unet3d.model import UNet3D as P3DUNet3D

        torch.manual_seed(0)
        p3d = P3DUNet3D(1, 2, final_sigmoid=False, f_maps=f_maps, layer_order="gcr", num_groups=groups,
                        num_levels=levels)
        torch.save({"model_state_dict": p3d.state_dict()}, p3d_checkpoint)
    volumes = {}
    for depth in args.depths:
        path = workdir / f"volume_{depth}.h5"
        if not path.exists():
            write_volume(path, (depth, *args.shape))
        volumes[depth] = path
    return {"checkpoint": checkpoint, "p3d_checkpoint": p3d_checkpoint, "volumes": volumes, "groups": groups}


def command_for(tool: str, inputs: dict[str, Any], depth: int, out: Path, args: argparse.Namespace,
                f_maps: int, levels: int, workers: int) -> list[str]:
    volume = inputs["volumes"][depth]
    if tool == "ours":
        return [sys.executable, "-m", "unet3d_lightning", "predict", "--ckpt_path", str(inputs["checkpoint"]),
                "--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape", json.dumps(args.patch),
                "--data.predict_stride_shape", json.dumps(args.stride), "--data.batch_size", str(args.batch_size),
                "--data.num_workers", str(workers), "--prediction.output_dir", str(out),
                "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *args.ours_args]
    out.mkdir(parents=True, exist_ok=True)
    job = {"checkpoint": str(inputs["checkpoint"]), "p3d_checkpoint": str(inputs["p3d_checkpoint"]),
           "volume": str(volume), "output": str(out / "predictions.h5"), "output_dir": str(out),
           "patch": list(args.patch), "stride": list(args.stride), "batch_size": args.batch_size,
           "out_channels": 2, "f_maps": f_maps, "num_levels": levels, "num_groups": inputs["groups"],
           "workers": workers}
    job_path = out / "job.json"
    job_path.write_text(json.dumps(job))
    return [sys.executable, str(Path(__file__).resolve()), "--child", tool, str(job_path)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(SRC))
        tool, job_path = args.child
        job = json.loads(Path(job_path).read_text())
        {"monai": monai_child, "p3d": p3d_child}[tool](job)
        return
    sys.path.insert(0, str(SRC))
    from unet3d_lightning.data.datamodule import default_num_workers

    workers = default_num_workers() if args.workers is None else args.workers
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_compare_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"volumes {[(d, *args.shape) for d in args.depths]}, patch {tuple(args.patch)}, stride "
          f"{tuple(args.stride)} (50 % overlap), batch {args.batch_size}, reader processes {workers}, "
          f"{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), {args.repeats} alternating rounds; "
          f"tools {args.tools}; extra unet3d args {args.ours_args}", flush=True)
    rows = []
    for model in args.models:
        f_maps, levels = (int(v) for v in model.split(":"))
        inputs = make_inputs(workdir, args, f_maps, levels)
        for depth in args.depths:
            results: dict[str, list[tuple[float, int]]] = {tool: [] for tool in args.tools}
            for r in range(args.repeats):
                order = args.tools[r % len(args.tools):] + args.tools[: r % len(args.tools)]
                for tool in order:
                    out = workdir / f"out_{tool}_{f_maps}_{levels}_{depth}_{r}"
                    seconds, peak = run_process(
                        command_for(tool, inputs, depth, out, args, f_maps, levels, workers), workdir)
                    results[tool].append((seconds, peak))
                    print(f"  U-Net {f_maps}:{levels} depth {depth} round {r} {tool:>5}: {seconds:7.2f} s, "
                          f"peak {peak / 1024:7.0f} MiB", flush=True)
            rows.append((f_maps, levels, depth, {
                tool: (statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs))
                for tool, runs in results.items()}))

    print(f"\n{'U-Net':>7}{'depth':>7}{'tool':>7}{'wall (median)':>15}{'peak RSS':>11}{'ours / tool: wall':>19}"
          f"{'peak':>7}")
    for f_maps, levels, depth, medians in rows:
        ours = medians.get("ours")
        for tool, (seconds, peak) in medians.items():
            ratio = f"{ours[0] / seconds:19.2f}{ours[1] / peak:7.2f}" if ours and tool != "ours" else ""
            print(f"{f'{f_maps}:{levels}':>7}{depth:>7}{tool:>7}{seconds:13.2f} s{peak / 1024:7.0f} MiB{ratio}")
    print("goals: ours / monai wall <= 0.8; ours / p3d wall <= 0.8 and peak RSS <= 1.0")
    print(f"files in {workdir}")


if __name__ == "__main__":
    main()
