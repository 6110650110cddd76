"""Bad input, table-driven: each user mistake the command can see ends with exit status 2, one last `error:` line
saying what is wrong (file, dataset, problem), and nothing written — no run directory, no prediction file."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from unet3d_lightning.cli import main


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


@pytest.fixture
def workspace(tmp_path):
    """Good inputs, a fit config for them, and a trained checkpoint for the prediction rows."""
    data = tmp_path / "data"
    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
    write_h5(data / "train.h5", raw=raw, label=label)
    write_h5(data / "val.h5", raw=raw, label=label)
    config = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2},
        "data": {"train_paths": [str(data / "train.h5")], "val_paths": [str(data / "val.h5")],
                 "train_patch_shape": [8, 8, 8], "num_workers": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def bad_file(root: Path, kind: str) -> Path:
    """Write one broken volume of the given kind and return its path."""
    raw, label = blob_volume(shape=(8, 16, 16), seed=1)
    path = root / "data" / f"bad_{kind}.h5"
    if kind == "no_label":
        return write_h5(path, raw=raw, mask=label)
    if kind == "shape":
        return write_h5(path, raw=raw, label=label[:, :12])
    if kind == "channels":
        return write_h5(path, raw=np.stack([raw, raw, raw]), label=label)
    if kind == "classes":
        return write_h5(path, raw=raw, label=(label * 3).astype(np.uint8))
    if kind == "masks3":
        return write_h5(path, raw=raw, label=np.stack([label, label, 1 - label]))
    if kind == "nonbinary":
        return write_h5(path, raw=raw, label=np.stack([label * 255, 1 - label]))
    if kind == "nan":
        raw = raw.copy()
        raw[3, 4, 5] = np.nan
        return write_h5(path, raw=raw, label=label)
    if kind == "small":
        return write_h5(path, raw=raw[:, :6], label=label[:, :6])
    if kind == "weighted":
        return write_h5(path, raw=raw, label=label, weight=np.ones_like(raw))
    if kind == "corrupt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an HDF5 file" * 100)
        return path
    raise ValueError(kind)


# (id, extra command-line arguments (with {root} / {bad} placeholders), bad file kind or None, expected pieces)
FIT_ROWS = [
    ("unknown config key", ["--model.out_chanels", "3"], None, ["unrecognized arguments: --model.out_chanels"]),
    ("missing file", ["--data.train_paths", "[{root}/data/nope.h5]"], None,
     ["train volume {root}/data/nope.h5: file does not exist"]),
    ("empty glob", ["--data.train_paths", "[{root}/data/*.hdf9]"], None, ["matched no file"]),
    ("missing dataset", ["--data.train_paths", "[{bad}]"], "no_label",
     ["{bad}", "dataset 'label' does not exist", "raw", "mask"]),
    ("shape mismatch", ["--data.train_paths", "[{bad}]"], "shape", ["{bad}", "'label'", "(8, 12, 16)", "(8, 16, 16)"]),
    ("channels vs in_channels", ["--data.train_paths", "[{bad}]"], "channels",
     ["{bad}", "'raw'", "3 channel(s)", "in_channels=1"]),
    ("class ids vs out_channels", ["--data.train_paths", "[{bad}]"], "classes",
     ["{bad}", "'label'", "class id 3", "out_channels=2"]),
    ("4D label channels vs out_channels", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]",
                                           "--model.loss", "bce"], "masks3",
     ["{bad}", "'label'", "3 channels", "out_channels=2"]),
    ("non-binary masks", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]", "--model.loss", "bce"],
     "nonbinary", ["{bad}", "'label'", "255", "binary"]),
    ("loss does not fit the labels", ["--model.loss", "bce"], None,
     ["loss 'bce'", "3D class-id labels", "use loss ce, wce or dice"]),
    ("NaN in raw", ["--data.train_paths", "[{bad}]"], "nan", ["{bad}", "'raw'", "NaN"]),
    ("corrupt file", ["--data.train_paths", "[{bad}]"], "corrupt", ["{bad}", "HDF5"]),
    ("patch larger than the volume", ["--data.train_paths", "[{bad}]"], "small",
     ["{bad}", "'raw'", "smaller than the patch", "along axis y"]),
    ("loss_weight length", ["--model.loss_weight", "[1.0, 2.0, 3.0]"], None,
     ["weight has 3 entries but out_channels=2"]),
    ("GroupNorm groups", ["--model.num_groups", "3"], None, ["GroupNorm cannot split", "num_groups=3"]),
    ("layer order", ["--model.layer_order", "cxr"], None, ["layer_order 'cxr'", "valid letters"]),
    ("per-voxel weights with dice", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]",
                                     "--data.weight_internal_path", "weight", "--model.loss", "dice"], "weighted",
     ["loss 'dice' takes no per-voxel weights"]),
]


def _fill(text: str, root: Path, bad: Path | None) -> str:
    return text.replace("{root}", str(root)).replace("{bad}", str(bad))


@pytest.mark.parametrize("name, args, kind, expected", FIT_ROWS, ids=[row[0] for row in FIT_ROWS])
def test_fit_mistakes(workspace, capsys, name, args, kind, expected):
    bad = bad_file(workspace, kind) if kind else None
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(workspace / "fit.yaml"), *[_fill(a, workspace, bad) for a in args]])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for piece in expected:
        assert _fill(piece, workspace, bad) in last, last
    assert not (workspace / "runs").exists()  # nothing written


@pytest.fixture
def checkpoint(workspace):
    main(["fit", "--config", str(workspace / "fit.yaml"), "--trainer.default_root_dir", str(workspace / "trained")])
    path = next((workspace / "trained").rglob("last.ckpt"))
    return path


PREDICT_ROWS = [
    ("no checkpoint", ["--ckpt_path", None], ["predict needs --ckpt_path"]),
    ("missing checkpoint", ["--ckpt_path", "{root}/nope.ckpt"], ["ckpt_path {root}/nope.ckpt: file does not exist"]),
    ("missing predict path", ["--data.predict_paths", "[{root}/data/missing.h5]"],
     ["predict volume {root}/data/missing.h5: file does not exist"]),
    ("output dir not writable", ["--prediction.output_dir", "{root}/data/val.h5/out"],
     ["prediction.output_dir {root}/data/val.h5/out: not writable"]),
    ("no patch shape", ["--data.predict_patch_shape", "null"], ["data.predict_patch_shape is required"]),
    ("halo too large", ["--prediction.halo", "3", "--data.predict_stride_shape", "[8, 8, 8]"], ["prediction.halo"]),
]


@pytest.mark.parametrize("name, args, expected", PREDICT_ROWS, ids=[row[0] for row in PREDICT_ROWS])
def test_predict_mistakes(workspace, checkpoint, capsys, name, args, expected):
    out = workspace / "out"
    base = {"--ckpt_path": str(checkpoint), "--data.predict_paths": f"[{workspace / 'data' / 'val.h5'}]",
            "--data.predict_patch_shape": "[8, 8, 8]", "--prediction.output_dir": str(out),
            "--data.num_workers": "0", "--trainer.accelerator": "cpu"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = None if value is None else _fill(value, workspace, None)
    argv = [item for key, value in base.items() if value is not None for item in (key, value)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *argv])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for piece in expected:
        assert _fill(piece, workspace, None) in last, last
    assert not out.exists() or not any(out.iterdir())  # no prediction (nor temporary) file
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1  # the checkpoint is untouched
