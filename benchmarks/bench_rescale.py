"""``--prediction.rescale`` benchmark: memory stays flat in depth, and what the resampling costs in time.

A synthetic volume of voxel size (4, 1, 1) µm is predicted by a tiny model whose voxel size is (2, 0.5, 0.5) µm, so
the model's grid has 8x the voxels; with ``--prediction.rescale true`` the input is resampled region by region and
the output back slab by slab. Each depth runs in a fresh subprocess, which reports the peak resident memory of the
predict loop alone (the kernel's high-water mark ``VmHWM``, reset when the loop starts; Linux) and its time. Flat in
depth means: the peak levels off as the depth grows from ``D`` to ``8 D``, growing far less than the output (the
output is written as it is produced, never held; the model's grid has 8x the input's voxels).

Example::

    python benchmarks/bench_rescale.py                     # a minute or two on 2 cores
    python benchmarks/bench_rescale.py --depth 32 --plane 96
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    import h5py
    import lightning.pytorch as pl
    import numpy as np
    import torch

    from unet3d_lightning.data.datamodule import VolumeDataModule
    from unet3d_lightning.data.spacing import VoxelSize
    from unet3d_lightning.module import UNet3DModule
    from unet3d_lightning.prediction.callback import PredictionWriter

    torch.set_num_threads(1)
    root = Path(args.dir)
    shape = (args.depth, args.plane, args.plane)
    rng = np.random.default_rng(0)
    with h5py.File(root / "vol.h5", "w") as f:
        dataset = f.create_dataset("raw", shape=shape, dtype="float32", chunks=(8, 64, 64))
        for z in range(0, shape[0], 8):  # written in slabs: the benchmark itself never holds the volume
            dataset[z : z + 8] = rng.normal(size=(min(8, shape[0] - z), *shape[1:])).astype(np.float32)
        dataset.attrs["element_size_um"] = [4.0, 1.0, 1.0]
    torch.manual_seed(0)
    model = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2).eval()
    model.voxel_size = VoxelSize((2.0, 0.5, 0.5), "micrometer")

    class Peak(pl.Callback):
        def on_predict_start(self, trainer, pl_module):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start_kib, self.t0 = _status_kib("VmRSS"), time.perf_counter()

        def on_predict_end(self, trainer, pl_module):
            self.peak_kib, self.seconds = _status_kib("VmHWM"), time.perf_counter() - self.t0

    peak = Peak()
    writer = PredictionWriter(str(root / "out"), rescale=args.rescale, compression="none")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[peak, writer])
    dm = VolumeDataModule(predict_paths=[str(root / "vol.h5")], predict_patch_shape=[16, 64, 64], batch_size=2,
                          num_workers=0)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    print(json.dumps({"peak_mib": (peak.peak_kib - peak.start_kib) / 1024, "seconds": peak.seconds,
                      "output_mib": 2 * 4 * np.prod(shape) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16, help="depth D of the smaller volume (input grid)")
    parser.add_argument("--plane", type=int, default=128, help="in-plane size (input grid)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rescale", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"volume (D, {args.plane}, {args.plane}) at (4, 1, 1) um, model at (2, 0.5, 0.5) um; predict loop only")
    print(f"{'rescale':>8} {'depth':>6} {'output MiB':>11} {'peak above start MiB':>21} {'seconds':>8}")
    for rescale in (False, True):
        rows = []
        depths = (args.depth, 4 * args.depth, 8 * args.depth)
        for depth in depths:
            with tempfile.TemporaryDirectory() as directory:
                command = [sys.executable, __file__, "--child", "--dir", directory, "--depth", str(depth),
                           "--plane", str(args.plane)] + ["--rescale"] * rescale
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                                    .stdout.strip().splitlines()[-1])
            rows.append(result)
            print(f"{str(rescale):>8} {depth:>6} {result['output_mib']:>11.1f} {result['peak_mib']:>21.1f} "
                  f"{result['seconds']:>8.2f}")
        for a, b in ((0, 2), (1, 2)):
            growth = rows[b]["peak_mib"] - rows[a]["peak_mib"]
            output_growth = rows[b]["output_mib"] - rows[a]["output_mib"]
            model_grid = f", {8 * output_growth:.1f} MiB on the model's grid" if rescale else ""
            print(f"{'':>8} depth {depths[a]} -> {depths[b]}: peak growth {growth:.1f} MiB for "
                  f"{output_growth:.1f} MiB more output{model_grid}")


if __name__ == "__main__":
    main()
