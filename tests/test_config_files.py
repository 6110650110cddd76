"""Config files and path settings: YAML read as YAML defines it (merge keys), a key given twice and an empty file as
one `error:` line naming the file and lines, the same rules for nested values, and environment variables and ~ in
every path setting. In-process runs through main(args=...)."""

import pytest
import yaml

from conftest import error_line, load_checkpoint_file, make_config, predict_args, run_dir
from unet3d_lightning.cli import main

pytestmark = pytest.mark.usefixtures("command_line")


# ------------------------------------------------------------------------------------------ YAML
def test_yaml_merge_keys_are_read_as_yaml_defines_them(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=50)
    merged = tmp_path / "merged.yaml"
    merged.write_text("trainer:\n  <<: {max_steps: 3}\n")
    main(["fit", "--config", str(config), "--config", str(merged), "--trainer.default_root_dir", str(tmp_path / "a")])
    assert load_checkpoint_file(run_dir(tmp_path / "a") / "checkpoints" / "last.ckpt")["global_step"] == 3
    # keys merged from an anchor, one of them overridden by an explicit key: not a key given twice
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text("trainer:\n  max_steps: 2\n"
                        "checkpoint: &monitoring\n  monitor: val/dice\n  mode: max\n"
                        "early_stopping:\n  <<: *monitoring\n  monitor: val/loss\n")
    main(["fit", "--config", str(config), "--config", str(anchored), "--trainer.default_root_dir", str(tmp_path / "b")])
    callbacks = load_checkpoint_file(run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt")["callbacks"]
    assert "ModelCheckpoint{'monitor': 'val/dice', 'mode': 'max'" in "".join(callbacks)
    assert "EarlyStopping{'monitor': 'val/loss', 'mode': 'max'}" in callbacks  # mode merged, monitor overridden
    twice = tmp_path / "twice.yaml"
    twice.write_text("trainer:\n  <<: {max_steps: 3}\n  max_steps: 4\n  max_steps: 5\n")
    line = error_line(capsys, ["fit", "--config", str(config), "--config", str(twice)])
    assert f"config {twice}: line 4: key 'max_steps' is given twice (lines 3 and 4); keep one" in line


def test_nested_values_follow_the_same_yaml_rules():
    from unet3d_lightning.config_files import unique_key_yaml_load

    text = "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n"
    assert unique_key_yaml_load(text) == yaml.safe_load(text) == {"base": {"x": 1, "y": 2}, "c": {"x": 5, "y": 2}}
    with pytest.raises(yaml.YAMLError, match="key 'x' is given twice"):
        unique_key_yaml_load("c:\n  <<: {x: 1, x: 2}\n")


def test_a_key_given_twice_in_a_config_file(tmp_path, capsys):
    good = make_config(tmp_path, str(tmp_path / "runs"))
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  f_maps: 8\n  num_levels: 2\n  f_maps: 4\n")
    line = error_line(capsys, ["fit", "--config", str(good), "--config", str(config)])
    assert f"config {config}: line 4: key 'f_maps' is given twice (lines 2 and 4); keep one" in line
    assert not (tmp_path / "runs").exists()


def test_an_empty_config_file(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    line = error_line(capsys, ["fit", "--config", str(config)])
    assert f"config {config} is empty" in line


# ------------------------------------------------------------------------------------------ environment variables
def test_environment_variables_in_paths_are_expanded_for_every_part_of_the_run(tmp_path, monkeypatch, capsys):
    config = make_config(tmp_path, "${RUNROOT}/run", max_epochs=1)
    text = config.read_text().replace(str(tmp_path / "data"), "$DATADIR")
    assert "default_root_dir: ${RUNROOT}/run" in text and "$DATADIR/train_0.h5" in text  # block style YAML
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNROOT", str(tmp_path / "expanded"))
    monkeypatch.setenv("DATADIR", str(tmp_path / "data"))
    main(["fit", "--config", str(config)])
    run = run_dir(tmp_path / "expanded" / "run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "expanded", "run.yaml"]  # no literal ${RUNROOT}

    monkeypatch.delenv("RUNROOT")
    line = error_line(capsys, ["fit", "--config", str(config), "--trainer.max_epochs", "2"])
    assert line == "error: trainer.default_root_dir '${RUNROOT}/run': the environment variable RUNROOT is not set; " \
                   "set it (export RUNROOT=...) or write the path out"
    line = error_line(capsys, ["predict", "--ckpt_path", "~/$NO_SUCH_VARIABLE_X/last.ckpt",
                               *predict_args(tmp_path, tmp_path / "out")])
    assert "ckpt_path '~/$NO_SUCH_VARIABLE_X/last.ckpt': the environment variable NO_SUCH_VARIABLE_X" in line
    assert not (tmp_path / "out").exists()
