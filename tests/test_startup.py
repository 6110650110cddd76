"""Start-up: ``unet3d predict`` imports only what prediction uses. Lightning itself imports ``torch._dynamo``,
torchmetrics (and with them sympy and ``scipy.signal``) whenever it is imported, so those are not ours to avoid; what
the package adds must be what the run asks for. Checked in a fresh interpreter (slow), as the command starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"

# What a CPU prediction of an HDF5 volume into HDF5 files must not import, and why it would.
NOT_FOR_PREDICT = (
    "tensorboard", "tensorboardX", "torch.utils.tensorboard",  # fit's logger writes TensorBoard files
    "torch._inductor.compile_fx",  # the compiler, for model.compile only
    "zarr", "tifffile",  # readers and writers of the other formats
    "unet3d_lightning.importers",  # unet3d import-pytorch3dunet
    "skimage",  # the watershed of prediction.instances (scipy.ndimage comes with Lightning: torchmetrics, scipy.signal)
)

_RUN = """
import json, sys
from unet3d_lightning.cli import main
main(args=json.loads(sys.stdin.read()))
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.slow
def test_predict_imports_only_what_prediction_uses(tmp_path):
    args = ["predict", "--ckpt_path", str(FIXTURES / "unet_interpolate" / "model.ckpt"), "--data.predict_paths",
            f"[{FIXTURES / 'volume.h5'}]", "--data.predict_patch_shape", "[8, 12, 12]", "--data.num_workers", "0",
            "--prediction.output_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false"]
    result = subprocess.run([sys.executable, "-c", _RUN], input=json.dumps(args), capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "volume_predictions.h5").is_file()
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert sorted(m for m in NOT_FOR_PREDICT if m in modules) == []
