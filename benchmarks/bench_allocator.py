"""CPU allocator benchmark: the network's forward passes under each ``UNET3D_CPU_ALLOCATOR`` mode.

Each mode runs in a fresh process that sets its allocator exactly as the ``unet3d`` command does
(:func:`unet3d_lightning.launcher.configure_allocator`: ``hugepages`` re-executes the process with glibc's
``hugetlb`` tunable, ``reuse`` keeps freed heap memory, ``system`` changes nothing), then times ``--forwards``
inference forward passes (softmax included) of a U-Net after one warm-up pass. Modes alternate round by round;
medians are printed with the process's system time, page faults and peak resident memory.

Examples::

    python benchmarks/bench_allocator.py                                  # U-Net f_maps 8, 3 levels, 2 x 32x128x128
    python benchmarks/bench_allocator.py --f-maps 32 --num-levels 4 --forwards 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MODES = ("system", "hugepages", "reuse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--f-maps", type=int, default=8, help="Default 8.")
    p.add_argument("--num-levels", type=int, default=3, help="Default 3.")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128], help="Default 32 128 128.")
    p.add_argument("--batch-size", type=int, default=2, help="Default 2.")
    p.add_argument("--forwards", type=int, default=6, help="timed forward passes per run. Default 6.")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds. Default 3.")
    p.add_argument("--contiguous", action="store_true", help="run the network contiguous, not channels-last.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    from unet3d_lightning.launcher import configure_allocator

    mode = configure_allocator()  # may re-execute this process (hugepages)
    import resource
    import time

    import torch

    from unet3d_lightning.networks import UNet3D

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
        "faults": (after.ru_minflt - before.ru_minflt) / args.forwards, "peak_mib": after.ru_maxrss / 1024,
    }))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "_UNET3D_ALLOCATOR_APPLIED")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(f"U-Net f_maps {args.f_maps}, {args.num_levels} levels, batch {args.batch_size} of {tuple(args.patch)}, "
          f"{'contiguous' if args.contiguous else 'channels-last'}; {args.forwards} forward passes per run, "
          f"{args.repeats} alternating rounds", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--child", mode],
                                 env={**env, "UNET3D_CPU_ALLOCATOR": mode}, capture_output=True, text=True,
                                 check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(figures)
            print(f"  round {r} {mode:>9} (applied: {figures['mode']}): {figures['seconds']:.3f} s/forward, "
                  f"sys {figures['sys']:.3f} s, {figures['faults']:.0f} page faults, peak {figures['peak_mib']:.0f} MiB",
                  flush=True)
    base = statistics.median(f["seconds"] for f in results["system"])
    print(f"\n{'mode':>10} {'s/forward':>10} {'sys s':>7} {'faults':>9} {'peak MiB':>9} {'speed-up':>9}")
    for mode in MODES:
        med = {k: statistics.median(f[k] for f in results[mode]) for k in ("seconds", "sys", "faults", "peak_mib")}
        print(f"{mode:>10} {med['seconds']:10.3f} {med['sys']:7.3f} {med['faults']:9.0f} {med['peak_mib']:9.0f} "
              f"{base / med['seconds']:8.2f}x")


if __name__ == "__main__":
    main()
