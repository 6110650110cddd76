"""CPU allocator and exit benchmark of the ``unet3d`` launcher.

**Allocator** (default): the network's forward passes under each way of serving CPU tensors, each in a fresh
process that sets its allocator before torch is imported:

* ``system``: glibc's malloc as it is (``UNET3D_CPU_ALLOCATOR=system``);
* ``hugepages``: the launcher's default, PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for tensor buffers of
  2 MiB or more), set by :func:`unet3d_lightning.launcher.configure_allocator` in the process itself;
* ``glibc-hugetlb``: glibc's ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment at process start (what
  earlier versions of the launcher got by re-executing themselves; the launcher leaves the user's tunable alone);
* ``reuse``: ``UNET3D_CPU_ALLOCATOR=reuse`` (freed memory kept in the heap).

Each process times ``--forwards`` inference forward passes (softmax included) of a U-Net after one warm-up pass.
Modes alternate round by round (the order rotates); medians are printed with the process's system time, page
faults (``ru_minflt``: a count, unaffected by other load on the machine) and peak resident memory.

**Exit** (``--exit``): a demo-sized ``unet3d predict`` end to end (random model f_maps 8, 3 levels, ``crg``; one
48×64×64 volume; patches 32×64×64, stride 24×48×48, batch 2, gaussian blending, segmentation written), once as the
command ends (the launcher's quick exit, after threads are joined and exit handlers have run) and once ending with
the interpreter's normal teardown, and once with that teardown after ``gc.freeze()`` (the objects then alive left
out of the garbage collector's passes at exit). Printed per variant: wall time from process start to exit, and the
time from the last exit handler to the process's end (the teardown itself).

Examples::

    python benchmarks/bench_allocator.py                                  # U-Net f_maps 8, 3 levels, 2 x 32x128x128
    python benchmarks/bench_allocator.py --f-maps 32 --num-levels 4 --forwards 3
    python benchmarks/bench_allocator.py --exit --repeats 7
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

SRC = Path(__file__).resolve().parents[1] / "src"
GLIBC_HUGETLB = "glibc.malloc.hugetlb=1"
# What each mode adds to the environment of its process.
MODES = {
    "system": {"UNET3D_CPU_ALLOCATOR": "system"},
    "hugepages": {"UNET3D_CPU_ALLOCATOR": "hugepages"},
    "glibc-hugetlb": {"GLIBC_TUNABLES": GLIBC_HUGETLB},
    "reuse": {"UNET3D_CPU_ALLOCATOR": "reuse"},
}
# Variables that would decide the allocator instead of the mode under test.
_ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "UNET3D_CPU_ALLOCATOR", "LD_PRELOAD")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--f-maps", type=int, default=8, help="Default 8.")
    p.add_argument("--num-levels", type=int, default=3, help="Default 3.")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128], help="Default 32 128 128.")
    p.add_argument("--batch-size", type=int, default=2, help="Default 2.")
    p.add_argument("--forwards", type=int, default=6, help="timed forward passes per run. Default 6.")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds. Default 3.")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="Default: all.")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; with 1, the CPU time is the work itself, even on a busy machine. Default: "
                        "torch's default.")
    p.add_argument("--contiguous", action="store_true", help="run the network contiguous, not channels-last.")
    p.add_argument("--exit", action="store_true", help="measure the end of a demo-sized predict instead.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_VARIABLES and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def rounds(names: list[str], repeats: int):
    """(round, name) pairs, every name once per round, the order rotating so that none always runs first."""
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            yield r, name


# ---------------------------------------------------------------------------------------------------- allocator
def child(args: argparse.Namespace) -> None:
    from unet3d_lightning.launcher import configure_allocator

    mode = configure_allocator()  # before torch is imported, as the unet3d command does
    import resource

    import torch

    from unet3d_lightning.networks import UNet3D

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last_3d
    net = UNet3D(1, 2, args.f_maps, args.num_levels, "gcr", min(8, args.f_maps // 2), "interpolate").eval()
    net.to(memory_format=fmt)
    x = torch.randn(args.batch_size, 1, *args.patch).contiguous(memory_format=fmt)
    with torch.inference_mode():
        torch.softmax(net(x), 1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for _ in range(args.forwards):
            torch.softmax(net(x), 1)
        seconds = (time.perf_counter() - start) / args.forwards
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "mode": mode, "seconds": seconds, "sys": (after.ru_stime - before.ru_stime) / args.forwards,
        "cpu": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / args.forwards,
        "faults": (after.ru_minflt - before.ru_minflt) / args.forwards, "peak_mib": after.ru_maxrss / 1024,
    }))


def allocator(args: argparse.Namespace, argv: list[str]) -> None:
    env = clean_env()
    print(f"U-Net f_maps {args.f_maps}, {args.num_levels} levels, batch {args.batch_size} of {tuple(args.patch)}, "
          f"{'contiguous' if args.contiguous else 'channels-last'}, torch threads {args.threads or 'default'}; "
          f"{args.forwards} forward passes per run, {args.repeats} alternating rounds", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r, mode in rounds(args.modes, args.repeats):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", mode],
                             env={**env, **MODES[mode]}, capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode].append(figures)
        print(f"  round {r} {mode:>13} (launcher: {figures['mode']}): {figures['seconds']:.3f} s/forward, "
              f"CPU {figures['cpu']:.3f} s, sys {figures['sys']:.3f} s, {figures['faults']:.0f} page faults, "
              f"peak {figures['peak_mib']:.0f} MiB", flush=True)
    keys = ("seconds", "cpu", "sys", "faults", "peak_mib")
    medians = {mode: {k: statistics.median(f[k] for f in results[mode]) for k in keys} for mode in args.modes}
    base = medians[args.modes[0]]
    print(f"\nmedians per forward pass; speed-up against {args.modes[0]} of the wall time and of the CPU time")
    print(f"{'mode':>14} {'s/forward':>10} {'CPU s':>7} {'sys s':>7} {'faults':>9} {'peak MiB':>9} {'wall':>6} "
          f"{'CPU':>6}")
    for mode, med in medians.items():
        print(f"{mode:>14} {med['seconds']:10.3f} {med['cpu']:7.3f} {med['sys']:7.3f} {med['faults']:9.0f} "
              f"{med['peak_mib']:9.0f} {base['seconds'] / med['seconds']:5.2f}x {base['cpu'] / med['cpu']:5.2f}x")


# --------------------------------------------------------------------------------------------------------- exit
# The command as the console script runs it, plus an exit handler, registered first so that it runs last, that
# writes the time: what follows it is the interpreter's teardown (or, with the quick exit, only os._exit).
_MARK = ("import atexit, sys, time\n"
         "mark = sys.argv.pop(1)\n"
         "atexit.register(lambda: open(mark, 'w').write(repr(time.time())))\n"
         "sys.argv[0] = 'unet3d'\n"
         "from unet3d_lightning.launcher import run\n")
EXIT_VARIANTS = {
    # Called from the program's top level: the launcher sees the command itself and ends with its quick exit.
    "quick exit": _MARK + "run()\n",
    # Called from a function, as a wrapping tool would: the launcher returns and the interpreter tears down.
    "teardown": _MARK + "def command():\n    run()\ncommand()\n",
    # The same, with the objects alive at the end moved out of the garbage collector's passes at exit.
    "freeze": _MARK + "import gc\ndef command():\n    try:\n        run()\n    finally:\n        gc.freeze()\n"
              "command()\n",
}


def write_predict_inputs(workdir: Path) -> list[str]:
    """A demo-sized model and volume in ``workdir``; returns the predict arguments."""
    import h5py
    import numpy as np
    import torch

    from unet3d_lightning.module import UNet3DModule

    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=8, num_levels=3, layer_order="crg", num_groups=4)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, workdir / "m.ckpt")
    with h5py.File(workdir / "v.h5", "w") as f:
        f["raw"] = np.random.default_rng(0).random((48, 64, 64), dtype=np.float32)
    return ["predict", "--ckpt_path", "m.ckpt", "--data.predict_paths", "[v.h5]",
            "--data.predict_patch_shape", "[32,64,64]", "--data.predict_stride_shape", "[24,48,48]",
            "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--prediction.output_dir", "out", "--prediction.blend", "gaussian",
            "--prediction.save_segmentation", "true"]


def exit_benchmark(args: argparse.Namespace) -> None:
    import shutil

    env = clean_env()
    with tempfile.TemporaryDirectory(prefix="bench_exit_") as tmp:
        workdir = Path(tmp)
        predict = write_predict_inputs(workdir)
        print(f"demo-sized unet3d predict, {args.repeats} alternating rounds", flush=True)
        results: dict[str, list[tuple[float, float]]] = {v: [] for v in EXIT_VARIANTS}
        for r, variant in rounds(list(EXIT_VARIANTS), args.repeats):
            shutil.rmtree(workdir / "out", ignore_errors=True)
            mark = workdir / "last_exit_handler"
            start = time.time()
            done = subprocess.run([sys.executable, "-c", EXIT_VARIANTS[variant], str(mark), *predict], cwd=workdir,
                                  env=env, capture_output=True, text=True)
            end = time.time()
            if done.returncode != 0:
                raise SystemExit(f"{variant}: exit status {done.returncode}\n{done.stderr[-3000:]}")
            teardown = end - float(mark.read_text())
            results[variant].append((end - start, teardown))
            print(f"  round {r} {variant:>10}: {end - start:.2f} s start to exit, {teardown:.3f} s after the last "
                  f"exit handler", flush=True)
    medians = {v: (statistics.median(t for t, _ in runs), statistics.median(d for _, d in runs))
               for v, runs in results.items()}
    print(f"\n{'variant':>10} {'start to exit s':>16} {'after handlers s':>17}")
    for variant, (total, teardown) in medians.items():
        print(f"{variant:>10} {total:16.2f} {teardown:17.3f}")
    quick, full = medians["quick exit"], medians["teardown"]
    print(f"teardown cost: {full[0] - quick[0]:.2f} s start to exit ({(full[0] - quick[0]) / quick[0]:.0%} of the "
          f"quick run), {full[1] - quick[1]:.2f} s after the handlers ({(full[1] - quick[1]) / quick[0]:.0%})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.exit:
        return exit_benchmark(args)
    allocator(args, argv)


if __name__ == "__main__":
    main()
