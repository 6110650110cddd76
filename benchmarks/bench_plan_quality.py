"""Quality of a planned configuration against the demo-style one, at the same wall-clock budget on this machine.

The data are not the demo spheres: membranes of touching cells (a 3D Voronoi tissue, as in plant or epithelial
light-sheet stacks) on a noisy, unevenly lit background, imaged anisotropically — generated at 1 µm in every axis
and kept every ``--z_step``-th slice, so the stored voxel size is ``(z_step, 1, 1)`` µm (recorded as
``element_size_um``, as PlantSeg and ilastik files do). The task is two classes: cell interior (0) and membrane (1).

Both runs train for the same ``--minutes`` (``trainer.max_time``), predict the held-out volume and are scored by
``unet3d evaluate`` on the whole volume (Dice and HD95 of the membrane class):

- **demo-style**: ``configs/demo.yaml``'s choices (U-Net f_maps 8, 3 levels, isotropic pooling, ``ce``, grid
  sampling, 16-slice patches since the volumes are shallow);
- **planned**: the config ``unet3d plan`` writes for the training volumes and this machine (``--trainer.max_time``
  the same budget), run as written.

Run: ``python benchmarks/bench_plan_quality.py [--minutes 3] [--z_step 4] [--out runs/bench_plan_quality]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

from unet3d_lightning.data.targets import boundaries
from unet3d_lightning.demo.cells import cells_volume


def write_volumes(root: Path, z_step: int, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    paths = {}
    for name in ("train_0", "train_1", "val_0", "test_0"):
        raw, ids = cells_volume((96, 96, 96), rng, cell_size=14.0, noise=0.35)
        label = (boundaries(ids)[0] > 0).astype(np.uint8)  # membrane = 1, interior = 0
        raw, label = raw[::z_step], label[::z_step]
        path = root / f"{name}.h5"
        with h5py.File(path, "w") as f:
            for key, data in (("raw", raw), ("label", label)):
                f.create_dataset(key, data=data, chunks=True, compression="gzip")
                f[key].attrs["element_size_um"] = [float(z_step), 1.0, 1.0]
        paths[name] = path
    return paths


def unet3d(*args: str) -> str:
    command = [str(Path(sys.executable).parent / "unet3d"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def demo_style(paths: dict[str, Path], root: Path, budget: str) -> Path:
    config = {
        "seed_everything": 42,
        "trainer": {"default_root_dir": str(root / "demo_style"), "accelerator": "cpu", "max_epochs": 10_000,
                    "max_time": budget, "log_every_n_steps": 5, "enable_progress_bar": False},
        "model": {"in_channels": 1, "out_channels": 2, "f_maps": 8, "num_levels": 3, "layer_order": "crg",
                  "num_groups": 4, "loss": "ce", "learning_rate": 0.005},
        "data": {"train_paths": [str(paths["train_0"]), str(paths["train_1"])], "val_paths": [str(paths["val_0"])],
                 "train_patch_shape": [16, 32, 32], "train_stride_shape": [8, 16, 16],
                 "val_patch_shape": [16, 64, 64], "val_stride_shape": [8, 32, 32], "batch_size": 2,
                 "num_workers": 0},
        "early_stopping": {"patience": 1000},
    }
    path = root / "demo_style.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def planned(paths: dict[str, Path], root: Path, budget: str) -> Path:
    path = root / "plan.yaml"
    print(unet3d("plan", "--data.train_paths", f"[{paths['train_0']}, {paths['train_1']}]",
                 "--data.val_paths", f"[{paths['val_0']}]", "--trainer.accelerator", "cpu",
                 "--trainer.max_time", budget, "--output", str(path)))
    config = yaml.safe_load(path.read_text())
    config.setdefault("trainer", {}).update(default_root_dir=str(root / "planned"), enable_progress_bar=False)
    config.setdefault("early_stopping", {})["patience"] = 1000
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_predict_evaluate(name: str, config: Path, test: Path, label: Path, root: Path) -> dict:
    start = time.perf_counter()
    unet3d("fit", "--config", str(config))
    trained = time.perf_counter() - start
    run = root / name / "lightning_logs"
    best = sorted(run.glob("version_*/checkpoints/best.ckpt"))[-1]
    settings = yaml.safe_load(config.read_text())
    patch = settings["data"].get("predict_patch_shape") or settings["data"]["val_patch_shape"]
    out = root / name / "predictions"
    unet3d("predict", "--ckpt_path", str(best), "--data.predict_paths", f"[{test}]",
           "--data.predict_patch_shape", json.dumps(patch), "--prediction.save_segmentation", "true",
           "--prediction.output_dir", str(out))
    report = root / f"{name}_report.json"
    unet3d("evaluate", "--prediction_paths", str(out / f"{test.stem}_predictions.h5"), "--label_paths", str(label),
           "--output", str(report))
    scores = json.loads(report.read_text())["mean"]["classes"]["1"]
    return {"name": name, "train_s": trained, "dice": scores["dice"], "hd95": scores["hd95"],
            "patch": patch, "model": {k: settings["model"].get(k) for k in
                                      ("f_maps", "num_levels", "loss", "pool_kernel_size", "deep_supervision")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--z_step", type=int, default=4)
    parser.add_argument("--out", default="runs/bench_plan_quality")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = write_volumes(root, args.z_step)
    seconds = round(args.minutes * 60)
    budget = f"00:00:{seconds // 60:02d}:{seconds % 60:02d}"
    rows = [fit_predict_evaluate("demo_style", demo_style(paths, root, budget), paths["test_0"], paths["test_0"],
                                 root),
            fit_predict_evaluate("planned", planned(paths, root, budget), paths["test_0"], paths["test_0"], root)]
    print(f"\nvolumes (96/{args.z_step}, 96, 96) at ({args.z_step}, 1, 1) µm; budget {budget} each; membrane class")
    print(f"{'config':12} {'train s':>8} {'dice':>7} {'hd95 µm':>8}  patch / model")
    for row in rows:
        print(f"{row['name']:12} {row['train_s']:8.0f} {row['dice']:7.3f} {row['hd95']:8.2f}  {row['patch']} "
              f"{row['model']}")


if __name__ == "__main__":
    main()
