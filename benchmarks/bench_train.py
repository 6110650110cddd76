"""Training benchmark: Lightning's overhead over a plain PyTorch loop, with and without channels-last.

The same patches (cut from one synthetic HDF5 volume, augmentation off) are trained on in four ways, alternating
round by round so that a noisy machine slows every way alike:

* ``plain``: a plain PyTorch loop over the patches already in memory as tensors — the same network, loss and Adam
  optimizer, ``zero_grad / forward / loss / backward / step`` and nothing else: the network-only floor;
* ``ours``: ``UNet3DModule`` trained by a Lightning ``Trainer`` (what ``unet3d fit`` runs; logging to TensorBoard
  every 50 steps as its default, no validation, no checkpoint) from ``HDF5DataModule(in_memory=True)``;

each with the network contiguous and channels-last (``model.channels_last``). Figures: seconds per optimizer step
in steady state (the first ``--warmup`` steps are left out), medians over the rounds; ``ours / plain - 1`` is
Lightning's (and the data module's) overhead (goal: at most 5 %), ``contiguous / channels-last`` the speed-up.
Because a shared machine's speed drifts between runs by more than that, each run of ``ours`` also times, step by
step, its own forward pass, loss, backward pass and optimizer update (what the plain loop does): ``in-run`` is the
rest of the step relative to them, Lightning's own time measured without the drift.

Examples::

    python benchmarks/bench_train.py                               # f_maps 16, 4 levels, batch 2 of 64^3
    python benchmarks/bench_train.py --f-maps 8 --num-levels 3 --patch 32 64 64 --steps 4 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


try:
    import unet3d_lightning  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The process's allocator as the unet3d command sets it (UNET3D_CPU_ALLOCATOR, default PyTorch's huge pages), set
# before torch is imported, which reads it at its first allocation; every way compared here runs in this one process,
# so all get the same.
from unet3d_lightning.launcher import configure_allocator  # noqa: E402 - imports nothing heavy

ALLOCATOR = configure_allocator()

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import write_volume  # noqa: E402

from unet3d_lightning.cli import silence_known_noise  # noqa: E402
from unet3d_lightning.data.datamodule import HDF5DataModule  # noqa: E402
from unet3d_lightning.data.transforms import Augmentation  # noqa: E402
from unet3d_lightning.module import UNet3DModule  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="patch shape. Default 64 64 64.")
    p.add_argument("--batch-size", type=int, default=2, help="Default 2.")
    p.add_argument("--f-maps", type=int, default=16, help="Default 16.")
    p.add_argument("--num-levels", type=int, default=4, help="Default 4.")
    p.add_argument("--layer-order", default="gcr", help="Default gcr.")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run. Default 6.")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run. Default 2.")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds. Default 2.")
    p.add_argument("--precision", choices=("32", "bf16"), default="32", help="Default 32.")
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def make_module(args: argparse.Namespace, channels_last: bool) -> UNet3DModule:
    torch.manual_seed(0)
    return UNet3DModule(in_channels=1, out_channels=2, f_maps=args.f_maps, num_levels=args.num_levels,
                        layer_order=args.layer_order, num_groups=min(8, args.f_maps // 2), loss="ce",
                        multiclass=True, channels_last=channels_last)


def make_data(path: Path, args: argparse.Namespace) -> HDF5DataModule:
    return HDF5DataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=list(args.patch),
                          batch_size=args.batch_size, num_workers=0, in_memory=True, seed=0,
                          augmentation=Augmentation(flip=False, rotate90=False, intensity=False, noise_sigma=0.0))


class StepClock(Callback):
    """Step start times, and (in the same run, so immune to the machine's drift) the seconds of each step spent in
    what the plain loop also does: the network's forward pass, the loss, the backward pass, the optimizer's update.
    The rest of a step is Lightning's and the data module's own time.

    Lightning runs forward, loss and backward inside ``optimizer.step(closure)``: the update is the time from the
    end of the backward pass to the end of the optimizer's step (a little of Lightning's closure is counted in it)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.compute: list[float] = []
        self._t: dict[str, float] = {}

    def _mark(self, name: str):  # noqa: ANN202
        def mark(*_: object) -> None:
            now = time.perf_counter()
            self._t[name] = now
            if name.endswith("_end"):
                begin = self._t[name[:-4] + "_begin"]
                self.compute[-1] += now - begin
        return mark

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        pl_module.net.register_forward_pre_hook(self._mark("net_begin"))
        pl_module.net.register_forward_hook(self._mark("net_end"))
        pl_module.loss_fn.register_forward_pre_hook(self._mark("loss_begin"))
        pl_module.loss_fn.register_forward_hook(self._mark("loss_end"))

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self._mark("update_end"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())
        self.compute.append(0.0)

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        self._mark("backward_begin")()

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark("backward_end")()
        self._mark("update_begin")()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())


def run_ours(path: Path, args: argparse.Namespace, channels_last: bool) -> float:
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        logger=pl.loggers.TensorBoardLogger(str(path.parent / "logs")), log_every_n_steps=50,
    )
    trainer.fit(make_module(args, channels_last), datamodule=make_data(path, args))
    starts = clock.starts[args.warmup:]
    step = (starts[-1] - starts[0]) / (len(starts) - 1)
    compute = clock.compute[args.warmup:]
    OWN_TIME[channels_last].append(step / (sum(compute) / len(compute)) - 1)
    return step


# Per run of ours: Lightning's own time per step relative to the step's computations (see StepClock).
OWN_TIME: dict[bool, list[float]] = {False: [], True: []}


def patches_in_memory(path: Path, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The batches ``ours`` trains on, read once through the same data module."""
    data = make_data(path, args)
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append({"raw": batch["raw"].clone(), "label": batch["label"].clone()})
        if len(batches) == args.warmup + args.steps:
            break
    return batches


def run_plain(batches: list[dict[str, torch.Tensor]], args: argparse.Namespace, channels_last: bool) -> float:
    module = make_module(args, channels_last)
    module._configure_task(True)
    net, loss_fn = module.net, module.loss_fn
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    starts = []
    for i, batch in enumerate(batches + batches[:1]):
        starts.append(time.perf_counter())
        if i == len(batches):
            break
        x = batch["raw"].contiguous(memory_format=fmt)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = net(x)
        loss = loss_fn(logits.contiguous(), batch["label"])
        loss.backward()
        optimizer.step()
    starts = starts[args.warmup:]
    return (starts[-1] - starts[0]) / (len(starts) - 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"CPU allocator: {ALLOCATOR}", flush=True)
    silence_known_noise()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = tuple(max(2 * p, 64) for p in args.patch)
    path = workdir / "train.h5"
    write_volume(path, shape)
    import h5py

    with h5py.File(path, "a") as f:  # labels: the sign of the smooth field
        f.create_dataset("label", data=(f["raw"][()] > 0).astype(np.uint8))
    batches = patches_in_memory(path, args)
    print(f"U-Net f_maps {args.f_maps}, {args.num_levels} levels, {args.layer_order}; batch {args.batch_size} of "
          f"{tuple(args.patch)}; {args.steps} timed steps after {args.warmup}; precision {args.precision}; torch "
          f"threads {torch.get_num_threads()}; {args.repeats} alternating rounds", flush=True)
    ways = [("plain", False), ("ours", False), ("plain", True), ("ours", True)]
    results: dict[tuple[str, bool], list[float]] = {w: [] for w in ways}
    for r in range(args.repeats):
        for way in ways[r % len(ways):] + ways[: r % len(ways)]:
            name, channels_last = way
            seconds = run_ours(path, args, channels_last) if name == "ours" else run_plain(batches, args, channels_last)
            results[way].append(seconds)
            print(f"  round {r} {name:>5} {'channels-last' if channels_last else 'contiguous':>13}: "
                  f"{seconds:6.3f} s/step", flush=True)
    med = {w: statistics.median(v) for w, v in results.items()}
    print(f"\n{'':<28}{'contiguous':>12}{'channels-last':>15}{'speed-up':>10}")
    for name, label in (("plain", "plain loop (floor), s/step"), ("ours", "ours (Lightning), s/step")):
        print(f"{label:<28}{med[name, False]:12.3f}{med[name, True]:15.3f}{med[name, False] / med[name, True]:9.2f}x")
    print(f"{'overhead ours / plain - 1':<28}{100 * (med['ours', False] / med['plain', False] - 1):11.1f}%"
          f"{100 * (med['ours', True] / med['plain', True] - 1):14.1f}%   goal <= 5 %")
    own = {k: 100 * statistics.median(v) for k, v in OWN_TIME.items()}
    print(f"{'in-run: step / compute - 1':<28}{own[False]:11.1f}%{own[True]:14.1f}%   goal <= 5 %")
    print(f"{'steps/s ours':<28}{1 / med['ours', False]:12.3f}{1 / med['ours', True]:15.3f}")
    print("(in-run: each step of ours against its own forward + loss + backward + optimizer update, timed in the "
          "same run; across runs the machine's speed drifts by more than the overhead)")


if __name__ == "__main__":
    main()
