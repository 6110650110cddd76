"""DDP on CPU (gloo) through the real unet3d command: Lightning's launcher re-runs the command line, so these run
in subprocesses."""

import subprocess

import h5py
import numpy as np
import pytest
import yaml

from conftest import blob_volume, write_h5
from test_cli import subprocess_env, unet3d_command

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
pytestmark = pytest.mark.slow


def run(args, timeout=300):
    result = subprocess.run([*unet3d_command(), *args], capture_output=True, text=True, env=subprocess_env(),
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small fit config (one validation patch: the second rank validates only a flagged duplicate) and a
    checkpoint trained from it on one device."""
    root = tmp_path_factory.mktemp("ddp")
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(shape=(8, 24, 24), seed=seed)
        write_h5(root / "data" / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 5,
        "trainer": {"default_root_dir": str(root / "runs"), "max_epochs": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01},
        "data": {"train_paths": [str(root / "data" / "train_*.h5")], "val_paths": [str(root / "data" / "val_0.h5")],
                 "train_patch_shape": [8, 12, 12], "train_stride_shape": [8, 12, 12],
                 "val_patch_shape": [8, 24, 24], "batch_size": 2, "num_workers": 0},
    }
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(path), "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
         str(root / "single")])
    checkpoint = root / "single" / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    assert checkpoint.is_file()
    return root, path, checkpoint


def test_ddp_fit_completes_and_rank_zero_alone_writes(trained):
    root, config, _ = trained
    result = run(["fit", "--config", str(config), *DDP])
    versions = list((root / "runs" / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"]  # one run directory, not one per rank
    files = sorted(p.name for p in (versions[0] / "checkpoints").iterdir())
    assert files == ["best.ckpt", "last.ckpt"]
    assert (versions[0] / "config.yaml").is_file()
    assert result.stdout.count("fit finished:") == 1  # the summary is printed once, by rank 0
    import torch

    checkpoint = torch.load(versions[0] / "checkpoints" / "last.ckpt", weights_only=True)
    # 2 volumes x 4 patches = 8 training patches: 4 per rank, batches of 2 -> 2 steps per epoch, 2 epochs
    assert checkpoint["global_step"] == 4


@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_ddp_prediction_equals_single_device(trained, blend):
    root, _, checkpoint = trained
    volumes = root / "predict"
    raw_a, _ = blob_volume(shape=(24, 20, 20), seed=7)  # patch (16, 20, 20), stride (4, ...): 3 patches, odd
    raw_b, _ = blob_volume(shape=(6, 20, 20), seed=8)   # smaller than the patch: 1 patch, the second rank pads
    write_h5(volumes / "a.h5", raw=raw_a)
    write_h5(volumes / "b.h5", raw=raw_b)
    outputs = {}
    for devices in ("1", "2"):
        out = root / f"out_{blend}_{devices}"
        run(["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{volumes / 'a.h5'}, {volumes / 'b.h5'}]",
             "--data.predict_patch_shape", "[16, 20, 20]", "--data.predict_stride_shape", "[4, 20, 20]",
             "--data.num_workers", "0", "--prediction.output_dir", str(out), "--prediction.blend", blend,
             "--trainer.accelerator", "cpu", "--trainer.devices", devices, "--trainer.strategy", "ddp"])
        outputs[devices] = out
    for name, shape in (("a", (24, 20, 20)), ("b", (6, 20, 20))):
        with h5py.File(outputs["1"] / f"{name}_predictions.h5") as one, \
                h5py.File(outputs["2"] / f"{name}_predictions.h5") as two:
            single, double = one["predictions"][()], two["predictions"][()]
        assert single.shape == (2, *shape)
        np.testing.assert_allclose(double, single, atol=1e-5, rtol=0)
        np.testing.assert_allclose(single.sum(0), 1.0, atol=1e-5)  # softmax probabilities
    assert not list(outputs["2"].glob(".*tmp*"))  # no temporary files left by either rank
