"""Checkpoints: each file is read once per run (predict, validate, resume, fine-tuning), and a file that is not a
unet3d checkpoint — pytorch-3dunet's, bare weights, another model's, a pickle, cut short, edited — is named in one
`error:` line with the fix; the checkpoint's settings rebuild the model and set the normalisation, and settings
given beside it must agree. In-process runs through main(args=...)."""

import copy
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import error_line, load_checkpoint_file, make_config, predict_args, run_dir
from unet3d_lightning import checkpoints
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.module import UNet3DModule

pytestmark = pytest.mark.usefixtures("command_line")
load = load_checkpoint_file


def probabilities(out: Path) -> np.ndarray:
    with h5py.File(out / "val_0_predictions.h5") as f:
        return f["predictions"][()]


@pytest.fixture
def torch_loads(monkeypatch):
    """Every file torch.load reads from now on, by resolved path (Lightning opens the file itself and passes the
    open file)."""
    loads = []
    original = torch.load

    def counting(f, *args, **kwargs):
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "path", None) or getattr(f, "name", None)
        loads.append(Path(name).resolve() if name is not None else f)
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    checkpoints.forget()  # nothing read before the test counts
    yield loads
    checkpoints.forget()


# ------------------------------------------------------------------------------------------ one read per run
def test_predict_and_validate_read_the_checkpoint_once(percentile_checkpoint, tmp_path, torch_loads):
    root, config, checkpoint = percentile_checkpoint
    main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, tmp_path / "out")])
    assert (tmp_path / "out" / "val_0_predictions.h5").is_file()
    assert torch_loads == [checkpoint.resolve()]
    torch_loads.clear()
    main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint),
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert torch_loads == [checkpoint.resolve()]


def test_resuming_reads_the_checkpoint_once_and_continues_it(tmp_path, torch_loads, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=1)
    main(["fit", "--config", str(config)])
    last = run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    saved = load(last)
    torch_loads.clear()
    main(["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert torch_loads == [last.resolve()]  # the command's checks and the Trainer's restore share one load
    assert "fit finished: 4 steps, 2 epochs" in capsys.readouterr().out
    resumed = load(last)
    assert resumed["global_step"] == 2 * saved["global_step"]
    # The Trainer restored what the file held: Adam's step counter went on from the saved one, and the loop too.
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {4}
    assert resumed["epoch"] == saved["epoch"] + 1


def test_fine_tuning_from_another_run_reads_its_checkpoint_once(trained, tmp_path, torch_loads, capsys):
    config, other_run = trained
    best = other_run / "checkpoints" / "best.ckpt"
    before = best.read_bytes()
    main(["fit", "--config", str(config), "--ckpt_path", str(best), "--trainer.default_root_dir",
          str(tmp_path / "finetune"), "--trainer.max_epochs", "2"])
    assert torch_loads == [best.resolve()]
    assert f"belongs to the run {other_run}, outside trainer.default_root_dir" in capsys.readouterr().err
    assert best.read_bytes() == before


def test_a_rewritten_checkpoint_is_read_again_and_the_shared_one_is_never_changed(trained, tmp_path, torch_loads):
    _, run = trained
    path = tmp_path / "model.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", path)
    first = checkpoints.read_checkpoint(path)
    assert checkpoints.read_checkpoint(str(path)) is first and len(torch_loads) == 1
    # What Lightning's restore is given is its own: it changes it in place (migrations, on_load_checkpoint hooks).
    restored = checkpoints.SharedCheckpointIO().load_checkpoint(path)
    assert len(torch_loads) == 1
    restored["state_dict"]["net.final_conv.weight"].add_(1.0)
    restored["callbacks"].clear()
    assert first["callbacks"] and torch.equal(first["state_dict"]["net.final_conv.weight"],
                                              load(path)["state_dict"]["net.final_conv.weight"])
    # A save replaces the file (a new one renamed over it): the next read sees the new content.
    edited = copy.deepcopy(load(path))
    edited["global_step"] = 12345
    torch.save(edited, tmp_path / "new.ckpt")
    os.replace(tmp_path / "new.ckpt", path)
    torch_loads.clear()
    assert checkpoints.global_step(path) == 12345 and torch_loads == [path.resolve()]
    checkpoints.forget()
    assert checkpoints.read_checkpoint(path) is not first


def test_files_are_classified_by_what_they_hold(trained):
    _, run = trained
    ours = load(run / "checkpoints" / "last.ckpt")
    assert checkpoints.classify(ours) == "lightning"
    assert checkpoints.classify(ours["state_dict"]) == "state_dict"
    assert checkpoints.classify({"model_state_dict": ours["state_dict"], "num_epochs": 3}) == "pytorch-3dunet"
    assert checkpoints.classify({"state_dict": ours["state_dict"]}) == "other"
    assert checkpoints.classify([1, 2]) == "other"


# ------------------------------------------------------------------------------------------ settings from the checkpoint
def test_print_config_of_a_prediction_holds_the_checkpoints_settings_and_repeats_it(percentile_checkpoint, tmp_path,
                                                                                   capsys):
    root, _, checkpoint = percentile_checkpoint
    direct = tmp_path / "direct"
    main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, direct)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, tmp_path / "printed"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    trained = load(checkpoint)
    for key in ("f_maps", "num_levels", "num_groups", "out_channels", "learning_rate"):
        assert config["model"][key] == trained["hyper_parameters"][key]
    assert config["model"]["f_maps"] == 4  # not the parser's default 64
    assert config["data"]["normalization"] == "percentile" and config["data"]["percentiles"] == [2.0, 98.0]
    assert config["ckpt_path"] == str(checkpoint)
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    main(["predict", "--config", str(path)])
    np.testing.assert_array_equal(probabilities(tmp_path / "printed"), probabilities(direct))
    # the normalisation matters here: the parser's default would predict something else
    main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, tmp_path / "standardized"),
          "--data.normalization", "standardize"])
    assert np.abs(probabilities(tmp_path / "standardized") - probabilities(direct)).max() > 0.01


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_printed_config_of_other_runs_from_a_checkpoint_runs_back(percentile_checkpoint, tmp_path, capsys,
                                                                  subcommand):
    root, config, checkpoint = percentile_checkpoint
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]  # the model comes from the checkpoint alone
    cfg["trainer"].update(default_root_dir=str(tmp_path / "runs"), max_epochs=2)
    config = tmp_path / "data_only.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main([subcommand, "--config", str(config), "--ckpt_path", str(checkpoint), "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["f_maps"] == 4
    if subcommand == "validate":
        assert yaml.safe_load(printed)["data"]["normalization"] == "percentile"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    main([subcommand, "--config", str(path)])  # every printed model key equals the checkpoint's: no contradiction
    assert "error:" not in capsys.readouterr().err


def test_model_flags_that_contradict_the_checkpoint_are_errors(trained, capsys):
    config, run = trained
    last = run / "checkpoints" / "last.ckpt"
    line = error_line(capsys, ["fit", "--config", str(config), "--ckpt_path", str(last), "--model.f_maps", "8"])
    assert f"model.f_maps=8 contradicts the checkpoint {last} (f_maps=4)" in line and "drop --model.f_maps" in line
    # in the config file too: the default value given explicitly is still an explicit setting
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["loss"] = "dice"
    other = config.with_name("other.yaml")
    other.write_text(yaml.safe_dump(cfg))
    line = error_line(capsys, ["validate", "--config", str(other), "--ckpt_path", str(last)])
    assert "model.loss='dice' contradicts the checkpoint" in line and "(loss='ce')" in line
    # the checkpoint's own values, repeated, are fine
    main(["validate", "--config", str(config), "--ckpt_path", str(last), "--model.f_maps", "4"])


def test_explicit_normalization_is_not_replaced_by_the_checkpoints(trained, tmp_path, monkeypatch, capsys):
    config, _ = trained
    main(["fit", "--config", str(config), "--data.normalization", "percentile", "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    checkpoint = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    used = []
    original = HDF5DataModule.check

    def record(self, stage, model=None):
        used.append(self.normalization)
        return original(self, stage, model)

    monkeypatch.setattr(HDF5DataModule, "check", record)
    val = yaml.safe_load(config.read_text())["data"]["val_paths"][0]
    predict = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{val}]",
               "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(tmp_path / "out"),
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    main([*predict, "--prediction.output_dir", str(tmp_path / "a")])
    assert set(used) == {"percentile"}  # taken from the checkpoint
    used.clear()
    main([*predict, "--prediction.output_dir", str(tmp_path / "b"), "--data.normalization", "standardize"])
    assert set(used) == {"standardize"}  # given: kept, although it is the default


# ------------------------------------------------------------------------------------------ files that are not ours
def edited(checkpoint: Path, path: Path, edit) -> Path:
    state = copy.deepcopy(load(checkpoint))
    edit(state)
    torch.save(state, path)
    return path


def test_edited_checkpoint_settings_fail_before_any_volume_is_read(percentile_checkpoint, tmp_path, capsys,
                                                                   monkeypatch):
    root, config, checkpoint = percentile_checkpoint
    checked = []
    monkeypatch.setattr(HDF5DataModule, "check", lambda self, stage, model=None: checked.append(stage))
    out_channels = edited(checkpoint, tmp_path / "out_channels.ckpt",
                          lambda c: c["hyper_parameters"].update(out_channels=3))
    normalization = edited(checkpoint, tmp_path / "normalization.ckpt",
                           lambda c: c["datamodule_hyper_parameters"].update(normalization="bogus"))
    percentiles = edited(checkpoint, tmp_path / "percentiles.ckpt",
                         lambda c: c["datamodule_hyper_parameters"].update(percentiles=[99, 1]))
    as_list = edited(checkpoint, tmp_path / "list.ckpt", lambda c: c.update(hyper_parameters=[1, 2]))
    wrong_type = edited(checkpoint, tmp_path / "type.ckpt", lambda c: c["hyper_parameters"].update(f_maps="many"))
    expected = {
        out_channels: f"error: ckpt_path {out_channels}: hyper_parameters out_channels=3 but its weights have 2 output "
                      "channels; the file was edited or is damaged: give a .ckpt as unet3d fit wrote it",
        normalization: f"error: ckpt_path {normalization}: its datamodule_hyper_parameters normalization 'bogus' is "
                       "not one of standardize, percentile, none; the file was edited or is damaged: give the "
                       "normalization the model was trained with, e.g. --data.normalization standardize",
        percentiles: f"ckpt_path {percentiles}: its datamodule_hyper_parameters percentiles [99, 1] is not two numbers "
                     "low < high in [0, 100]",
        as_list: f"error: ckpt_path {as_list}: hyper_parameters is a list, not a mapping of settings; the file was "
                 "edited or is damaged: give a .ckpt as unet3d fit wrote it",
        wrong_type: f"ckpt_path {wrong_type}: its hyper_parameters do not make a model (",
    }
    # the data and trainer settings of the run, without model settings (given ones would contradict the edits)
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    data_only = tmp_path / "data_only.yaml"
    data_only.write_text(yaml.safe_dump(cfg))
    for path, message in expected.items():
        for subcommand in ("predict", "validate"):
            args = predict_args(root, tmp_path / "out") if subcommand == "predict" else ["--config", str(data_only)]
            line = error_line(capsys, [subcommand, "--ckpt_path", str(path), *args])
            assert message in line, line
            if path == wrong_type:
                assert "f_maps" in line
    edited_in_fit = error_line(capsys, ["fit", "--config", str(data_only), "--ckpt_path", str(out_channels)])
    assert "hyper_parameters out_channels=3 but its weights have 2 output channels" in edited_in_fit
    assert checked == []  # each one stopped before the data checks
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_a_checkpoint_cut_short_is_named_so(percentile_checkpoint, tmp_path, capsys):
    root, _, checkpoint = percentile_checkpoint
    data = checkpoint.read_bytes()
    for length in (10, 1000, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        cut = tmp_path / f"cut_{length}.ckpt"
        cut.write_bytes(data[:length])
        line = error_line(capsys, ["predict", "--ckpt_path", str(cut), *predict_args(root, tmp_path / "out")])
        assert line.startswith(f"error: ckpt_path {cut}: truncated, not a complete checkpoint ({length} bytes"), line
    assert checkpoint.read_bytes() == data


def test_another_models_checkpoint_is_named_in_one_line(percentile_checkpoint, tmp_path, capsys):
    root, _, checkpoint = percentile_checkpoint
    foreign = edited(checkpoint, tmp_path / "foreign.ckpt", lambda c: c.update(
        hyper_parameters={"hidden": 32, "lr": 0.1, "_instantiator": "lightning.pytorch.cli.instantiate_module"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(foreign), *predict_args(root, tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: ckpt_path {foreign}: written by another model or program, not by unet3d fit; its "
                       "hyper_parameters hold hidden, lr, which UNet3DModule does not have; give a .ckpt written by "
                       "unet3d fit")
    assert not any("does not accept" in line or "while reading" in line for line in err)


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_foreign_checkpoints_are_named_with_the_fix(trained, tmp_path, capsys, subcommand):
    config, run = trained
    weights = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    state_dict = tmp_path / "weights.pt"
    torch.save(weights, state_dict)
    pytorch3dunet = tmp_path / "best_checkpoint.pytorch"
    torch.save({"num_epochs": 3, "num_iterations": 120, "best_eval_score": 0.7,
                "model_state_dict": {k.removeprefix("net."): v for k, v in weights.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": []}}, pytorch3dunet)
    extra = []
    if subcommand == "predict":
        val = yaml.safe_load(config.read_text())["data"]["val_paths"][0]
        extra = ["--data.predict_paths", f"[{val}]", "--data.predict_patch_shape", "[8, 16, 16]",
                 "--prediction.output_dir", str(tmp_path / "out")]
    line = error_line(capsys, [subcommand, "--config", str(config), "--ckpt_path", str(pytorch3dunet), *extra])
    assert f"ckpt_path {pytorch3dunet}: a pytorch-3dunet checkpoint" in line
    assert f"unet3d import-pytorch3dunet --model_path {pytorch3dunet} --config train_config.yml --output model.ckpt" \
        in line
    line = error_line(capsys, [subcommand, "--config", str(config), "--ckpt_path", str(state_dict), *extra])
    assert f"ckpt_path {state_dict}: holds only weights" in line


def test_a_pickle_that_is_not_a_checkpoint_gets_no_weights_only_advice(trained, tmp_path, capsys):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"model": UNet3DModule}))
    line = error_line(capsys, ["validate", "--config", str(trained[0]), "--ckpt_path", str(path)])
    assert f"ckpt_path {path}: not a checkpoint unet3d can load" in line
    assert "weights_only" not in line
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    assert "not a PyTorch checkpoint file" in error_line(
        capsys, ["validate", "--config", str(trained[0]), "--ckpt_path", str(text)])
