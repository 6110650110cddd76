"""Throughput of the training loader (HDF5 and Zarr volumes), and whether it keeps a small U-Net fed.

Writes a chunked ``size³`` float32 raw volume and a uint8 label volume (one HDF5 file, and the same arrays with the
same chunks and compression in a Zarr v3 store, in a temporary directory unless ``--data-dir`` is given), then
measures

1. training patches per second from :class:`~unet3d_lightning.VolumeDataModule` (strided ``patch³`` patches,
   shuffled, augmentation on) with each of ``--workers`` DataLoader workers, plus one row without augmentation that
   shows the cost of reading and normalising alone, for each of ``--formats``;
2. the time of one training step of a small :class:`~unet3d_lightning.UNet3DModule` (``--f-maps``, ``--levels``,
   ``--batch-size``) fed (a) by the HDF5 loader and (b) by the very same batches held in memory as tensors. Both use
   the same plain loop (forward, loss, backward, Adam step), so the ratio ``(a) / (b)`` is the loader's overhead on
   training: 1.00 means the loader is fully hidden behind compute. The goal is <= 1.05.

Run: ``python benchmarks/bench_loader.py`` (512³, a few minutes on 2 CPU cores) or, for a quick check,
``python benchmarks/bench_loader.py --size 128 --patch 32 --batches 10 --steps 4``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from unet3d_lightning import UNet3DModule, VolumeDataModule
from unet3d_lightning.data.transforms import Augmentation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic test volume, in voxels")
    parser.add_argument("--patch", type=int, default=64, help="edge of the cubic training patch")
    parser.add_argument("--chunk", type=int, default=64, help="edge of the cubic HDF5 chunks")
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                        help="HDF5 compression of the test volume")
    parser.add_argument("--batches", type=int, default=50, help="batches timed per loader throughput row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values to time")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per batch")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per feeding mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps/batches first (worker start-up)")
    parser.add_argument("--train-workers", type=int, default=2, help="num_workers of the loader feeding the U-Net")
    parser.add_argument("--f-maps", type=int, default=8, help="U-Net channels of the first level")
    parser.add_argument("--levels", type=int, default=3, help="U-Net levels")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the test volume here (reused when it exists) instead of a temporary directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the patch order and the model")
    parser.add_argument("--formats", nargs="+", choices=("hdf5", "zarr"), default=["hdf5", "zarr"],
                        help="volume formats whose loader throughput is timed (the training step uses HDF5)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- data
def write_volume(path: Path, size: int, chunk: int, compression: str, seed: int) -> None:
    """A smooth random field plus noise (raw, float32) and the field thresholded (label, uint8), written z-slab by
    z-slab so memory stays at one slab."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0, 6 * np.pi, size, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    sin_y = np.sin(axis + phase[1])[:, None]
    sin_x = np.sin(axis + phase[2])[None, :]
    options = {} if compression == "none" else {"compression": compression}
    shape, chunks = (size,) * 3, (min(chunk, size),) * 3
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        raw = f.create_dataset("raw", shape=shape, dtype="float32", chunks=chunks, **options)
        label = f.create_dataset("label", shape=shape, dtype="uint8", chunks=chunks, **options)
        for z in range(0, size, chunks[0]):
            zs = slice(z, min(z + chunks[0], size))
            field = np.sin(axis[zs] + phase[0])[:, None, None] * (sin_y * sin_x)[None]
            label[zs] = (field > 0.2).astype(np.uint8)
            field += rng.normal(0, 0.3, field.shape).astype(np.float32)
            raw[zs] = 100 + 20 * field
    tmp.replace(path)


def copy_to_zarr(source: Path, path: Path, compression: str) -> None:
    """The HDF5 volume's arrays, with its chunks, in a Zarr v3 store (gzip: Zarr's gzip codec, the same deflate)."""
    import shutil

    import zarr

    if compression == "lzf":
        sys.exit("--compression lzf exists only in HDF5; use none or gzip to compare with Zarr")
    compressors = zarr.codecs.GzipCodec(level=4) if compression == "gzip" else None
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    with h5py.File(source, "r") as f:
        for name in ("raw", "label"):
            dataset = f[name]
            array = group.create_array(name, shape=dataset.shape, dtype=dataset.dtype, chunks=dataset.chunks,
                                       compressors=compressors)
            for z in range(0, dataset.shape[0], dataset.chunks[0]):
                array[z : z + dataset.chunks[0]] = dataset[z : z + dataset.chunks[0]]
    tmp.rename(path)


def datamodule(path: Path, args: argparse.Namespace, workers: int, augmentation: Augmentation) -> VolumeDataModule:
    dm = VolumeDataModule(
        train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=(args.patch,) * 3,
        batch_size=args.batch_size, num_workers=workers, augmentation=augmentation, seed=args.seed,
    )
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------------- measurements
def loader_throughput(dm: VolumeDataModule, batches: int, warmup: int) -> float:
    """Patches per second over ``batches`` batches, after ``warmup`` untimed ones (worker start-up, first opens)."""
    iterator = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(iterator)
    patches = 0
    start = time.perf_counter()
    for _ in range(batches):
        patches += next(iterator)["raw"].shape[0]
    seconds = time.perf_counter() - start
    del iterator
    return patches / seconds


def model(args: argparse.Namespace) -> tuple[UNet3DModule, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    net = UNet3DModule(in_channels=1, out_channels=2, f_maps=args.f_maps, num_levels=args.levels, num_groups=4)
    return net, torch.optim.Adam(net.parameters(), lr=1e-4)


def train_steps(batches, args: argparse.Namespace, steps: int, warmup: int) -> list[float]:
    """Seconds per step of the same plain loop (forward, loss, backward, Adam step) for any source of batches.

    A step's time runs from the end of the previous step to the end of this one, so it includes waiting for the
    batch: exactly what a loader that cannot keep up adds to training.
    """
    net, optimizer = model(args)
    net.train()
    times = []
    source = iter(batches)
    last = time.perf_counter()
    for step in range(warmup + steps):
        batch = next(source)
        optimizer.zero_grad(set_to_none=True)
        loss = net.loss_fn(net(batch["raw"]), batch["label"])
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - last)
        last = now
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.patch > args.size:
        sys.exit(f"--patch {args.patch} must be at most --size {args.size}")
    print(f"torch {torch.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        folder = args.data_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"volume_{args.size}_c{args.chunk}_{args.compression}.h5"
        if not path.exists():
            start = time.perf_counter()
            write_volume(path, args.size, args.chunk, args.compression, args.seed)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
        paths = {"hdf5": path}
        if "zarr" in args.formats:
            paths["zarr"] = path.with_suffix(".zarr")
            if not paths["zarr"].exists():
                start = time.perf_counter()
                copy_to_zarr(path, paths["zarr"], args.compression)
                print(f"wrote {paths['zarr']} in {time.perf_counter() - start:.1f} s")

        rows = []
        plain_augmentation = Augmentation(flip=False, rotate90=False, intensity=False, noise_sigma=0.0)
        for fmt in args.formats:
            start = time.perf_counter()
            augmented = datamodule(paths[fmt], args, 0, Augmentation())
            print(f"{fmt} setup (read and check the {args.size}³ volume once): {time.perf_counter() - start:.1f} s, "
                  f"{len(augmented.datasets['train'])} training patches of {args.patch}³")
            plain = datamodule(paths[fmt], args, 0, plain_augmentation)
            rows.append((fmt, "0", "off", loader_throughput(plain, args.batches, args.warmup)))
            for workers in args.workers:
                augmented.num_workers = workers  # read when the loader is made; saves scanning the volume again
                rows.append((fmt, str(workers), "on", loader_throughput(augmented, args.batches, args.warmup)))
        print(f"\nloader throughput ({args.batches} batches of {args.batch_size}, {args.patch}³ patches, "
              f"chunks {args.chunk}³, compression {args.compression}):")
        print(f"  {'format':>6}  {'num_workers':>11}  {'augmentation':>12}  {'patches/s':>10}")
        for fmt, workers, aug, rate in rows:
            print(f"  {fmt:>6}  {workers:>11}  {aug:>12}  {rate:>10.1f}")
        augmented = datamodule(path, args, 0, Augmentation())

        # Training: the HDF5 loader, then the same batches from memory (collected from an identical loader, so both
        # feedings see identical tensors in identical order).
        total = args.warmup + args.steps
        augmented.num_workers = args.train_workers
        from_hdf5 = train_steps(augmented.train_dataloader(), args, args.steps, args.warmup)
        augmented.num_workers = 0  # the batches do not depend on the number of workers
        reference = augmented.train_dataloader()
        held: list[dict[str, torch.Tensor]] = []
        for batch in reference:
            held.append(batch)
            if len(held) == total:
                break
        from_memory = train_steps(held, args, args.steps, args.warmup)

    hdf5_step, memory_step = statistics.median(from_hdf5), statistics.median(from_memory)
    print(f"\ntraining step, UNet3DModule(f_maps={args.f_maps}, num_levels={args.levels}), batch {args.batch_size} "
          f"of {args.patch}³, median of {args.steps} steps after {args.warmup}:")
    print(f"  {'fed from':<34}  {'s/step':>8}  {'mean':>8}")
    print(f"  {f'HDF5 loader (num_workers={args.train_workers})':<34}  {hdf5_step:>8.3f}  "
          f"{statistics.mean(from_hdf5):>8.3f}")
    print(f"  {'the same batches in memory':<34}  {memory_step:>8.3f}  {statistics.mean(from_memory):>8.3f}")
    ratio = hdf5_step / memory_step
    verdict = "ok" if ratio <= 1.05 else "loader overhead above goal"
    print(f"  ratio HDF5 / memory: {ratio:.3f} (goal <= 1.05: {verdict})")


if __name__ == "__main__":
    main()
