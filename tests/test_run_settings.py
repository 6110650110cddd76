"""Run settings that change how fast a run goes, not what it computes: channels-last memory format, CPU bf16, cuDNN
autotuning, torch.compile and the default number of DataLoader workers. Each must leave the numbers unchanged (or
within the documented bf16 tolerance) and checkpoints interchangeable."""

from __future__ import annotations

import functools
import itertools
import os
import warnings

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from conftest import blob_volume, write_h5
from unet3d_lightning.cli import ArgumentParser, UNet3DCLI, main
from unet3d_lightning.data.datamodule import HDF5DataModule, default_num_workers
from unet3d_lightning.networks import UNet3D
from unet3d_lightning.module import UNet3DModule, channels_last_format, cpu_has_fast_bf16, network_memory_format

pytestmark = pytest.mark.usefixtures("command_line")
# The tolerance documented in the README's Tuning section for CPU bf16-mixed prediction (max abs difference of the
# probabilities from float32).
BF16_TOLERANCE = 0.03


def _layer_orders():
    """Every valid order: a conv with any one activation and at most one normalisation, in every arrangement."""
    orders = {"c"}
    for activation in "rle":
        for norm in ("", "g", "b"):
            for perm in itertools.permutations("c" + activation + norm):
                orders.add("".join(perm))
    return sorted(orders)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``||actual - expected|| / ||expected||`` (Frobenius norms)."""
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-12))


@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
def test_channels_last_logits_equal_contiguous_for_every_layer_order(upsample):
    x = torch.randn(2, 1, 7, 10, 9, generator=torch.Generator().manual_seed(0))  # odd sizes: ceil pooling, exact up
    for order in _layer_orders():
        torch.manual_seed(0)
        reference = UNet3D(1, 3, f_maps=4, num_levels=3, layer_order=order, num_groups=2, upsample=upsample)
        channels_last = UNet3D(1, 3, f_maps=4, num_levels=3, layer_order=order, num_groups=2, upsample=upsample)
        channels_last.load_state_dict(reference.state_dict())
        channels_last.to(memory_format=torch.channels_last_3d)
        assert channels_last.final_conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        x_last = x.contiguous(memory_format=torch.channels_last_3d)
        # The last decoder's features show that the network really ran channels-last (the final 1x1x1 convolution
        # may hand back either layout).
        features = []
        channels_last.decoders[-1].register_forward_hook(lambda module, args, out: features.append(out))
        for train in (False, True):  # BatchNorm: running statistics, then batch statistics
            reference.train(train)
            channels_last.train(train)
            with torch.no_grad():
                # Copies: an order starting with an in-place activation changes its input.
                expected = reference(x.clone())
                actual = channels_last(x_last.clone(memory_format=torch.channels_last_3d))
            assert features.pop().is_contiguous(memory_format=torch.channels_last_3d)
            assert _relative_error(actual, expected) <= 1e-5, (order, upsample, train)


@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ["unet", "residual_unet", "residual_se_unet"])
def test_channels_last_module_equals_contiguous_for_every_architecture(architecture, spatial_dims):
    x = torch.randn(2, 1, 5 if spatial_dims == 3 else 3, 12, 10, generator=torch.Generator().manual_seed(0))
    logits = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = UNet3DModule(out_channels=3, f_maps=4, num_levels=2, num_groups=2, architecture=architecture,
                              spatial_dims=spatial_dims, channels_last=channels_last).eval()
        module.use_memory_format("cpu")
        expected_format = {3: torch.channels_last_3d, 2: torch.channels_last}[spatial_dims] if channels_last else None
        assert module.input_memory_format is expected_format
        with torch.no_grad():
            logits[channels_last] = module(x.clone())
        assert logits[channels_last].is_contiguous()
    assert _relative_error(logits[True], logits[False]) <= 1e-5


def test_losses_gradients_and_probabilities_equal_contiguous():
    torch.manual_seed(0)
    batch = {"raw": torch.randn(2, 1, 8, 12, 12), "label": torch.randint(0, 3, (2, 8, 12, 12))}
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        module = UNet3DModule(out_channels=3, f_maps=4, num_levels=2, num_groups=2, loss="ce",
                              channels_last=channels_last)
        module.use_memory_format("cpu")
        loss, logits = module._loss(dict(batch))
        loss.backward()
        probabilities = module.final_activation(logits)
        assert logits.is_contiguous() and probabilities.is_contiguous()
        grad = module.net.encoders[0][0].conv.weight.grad
        results.append((loss.detach(), probabilities.detach(), grad.contiguous()))
    (loss0, p0, g0), (loss1, p1, g1) = results
    assert abs(float(loss1 - loss0)) <= 1e-5 * abs(float(loss0))
    assert float((p1 - p0).abs().max()) <= 1e-5
    assert _relative_error(g1, g0) <= 1e-4  # a sum over every voxel: float32 reduction order differs


def test_memory_format_follows_setting_device_and_network_rank():
    assert channels_last_format(5) is torch.channels_last_3d
    assert channels_last_format(4) is torch.channels_last
    assert channels_last_format(3) is None
    assert network_memory_format(nn.Sequential(nn.GroupNorm(1, 1), nn.Conv2d(1, 2, 3))) is torch.channels_last
    assert network_memory_format(nn.Linear(2, 2)) is None

    module = UNet3DModule(f_maps=4, num_levels=2, num_groups=2)
    weight = lambda: module.net.encoders[0][1].conv.weight  # noqa: E731 - 2 in, 4 out channels
    module.use_memory_format("cpu")
    assert module.input_memory_format is torch.channels_last_3d
    assert weight().is_contiguous(memory_format=torch.channels_last_3d) and not weight().is_contiguous()
    assert module.net.final_conv.weight.stride() == (4, 1, 1, 1, 1)  # 1x1x1: contiguous strides, as its gradients
    module.use_memory_format("meta")  # a backend without known channels-last kernels: contiguous
    assert module.input_memory_format is None and weight().is_contiguous()
    off = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, channels_last=False)
    off.use_memory_format("cpu")
    assert off.input_memory_format is None and off.net.encoders[0][1].conv.weight.is_contiguous()

    # The datamodule converts the input once, when the batch reaches the device; the batch keeps its structure (the
    # prediction writer reads the patch locations, which stay on the CPU).
    module.use_memory_format("cpu")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    data = HDF5DataModule(num_workers=0)
    data.trainer = trainer
    batch = {"raw": torch.randn(2, 1, 4, 6, 6), "volume": torch.tensor([0, 0]), "start": torch.zeros(2, 3),
             "padding": torch.tensor([False, True])}
    moved = data.transfer_batch_to_device(dict(batch), torch.device("cpu"), 0)
    assert set(moved) == set(batch)
    assert moved["raw"].is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(moved["raw"], batch["raw"])
    assert all(moved[k] is batch[k] for k in ("volume", "start", "padding"))
    trainer.strategy.connect(off)
    assert data.transfer_batch_to_device(dict(batch), torch.device("cpu"), 0)["raw"].is_contiguous()
    # Called directly (no datamodule), the module converts the input itself and returns contiguous logits.
    logits = module(batch["raw"])
    assert logits.is_contiguous() and batch["raw"].is_contiguous()


# ------------------------------------------------------------------------------------------------ checkpoints
def _fit_checkpoint(root, channels_last: bool, name: str):
    """Two training steps of a tiny model, saved by the trainer (so with optimizer state) as ``name``."""
    for split, seed in (("train", 0), ("val", 2)):
        path = root / f"{split}.h5"
        if not path.exists():
            raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
            write_h5(path, raw=raw, label=label)
    pl.seed_everything(0, verbose=False)
    model = UNet3DModule(out_channels=2, f_maps=4, num_levels=2, num_groups=2, learning_rate=0.01,
                         channels_last=channels_last)
    data = HDF5DataModule(train_paths=[str(root / "train.h5")], val_paths=[str(root / "val.h5")],
                          train_patch_shape=(8, 16, 16), batch_size=1, num_workers=0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    path = root / name
    trainer.save_checkpoint(path)
    return path


def _predict(ckpt, volume, out, *extra):
    main(args=["predict", "--ckpt_path", str(ckpt), "--data.predict_paths", f"[{volume}]",
               "--data.predict_patch_shape", "[8, 16, 16]", "--data.predict_stride_shape", "[4, 8, 8]",
               "--data.num_workers", "0", "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", *extra])
    with h5py.File(out / f"{volume.stem}_predictions.h5", "r") as f:
        return f["predictions"][()]


def test_checkpoints_store_contiguous_tensors_and_load_with_either_setting(tmp_path):
    ckpt_on = _fit_checkpoint(tmp_path, True, "on.ckpt")
    ckpt_off = _fit_checkpoint(tmp_path, False, "off.ckpt")
    saved = torch.load(ckpt_on, weights_only=True)
    assert saved["hyper_parameters"]["channels_last"] is True
    assert torch.load(ckpt_off, weights_only=True)["hyper_parameters"]["channels_last"] is False
    assert all(t.is_contiguous() for t in saved["state_dict"].values())
    moments = [t for s in saved["optimizer_states"][0]["state"].values() for t in s.values() if t.dim() == 5]
    assert moments and all(t.is_contiguous() for t in moments)

    raw, _ = blob_volume(shape=(12, 20, 20), seed=5)
    volume = write_h5(tmp_path / "vol.h5", raw=raw)
    # An overlapping grid (27 patches): the stitched volume must not depend on the setting.
    outputs = {}
    for ckpt in (ckpt_on, ckpt_off):
        for setting in ("true", "false"):
            out = tmp_path / f"out_{ckpt.stem}_{setting}"
            outputs[ckpt.stem, setting] = _predict(ckpt, volume, out, "--model.channels_last", setting)
    for stem in ("on", "off"):
        np.testing.assert_allclose(outputs[stem, "true"], outputs[stem, "false"], atol=1e-5, rtol=0)

    # Old-format checkpoint (written before the setting existed): no channels_last / compile in its hyperparameters.
    old = torch.load(ckpt_off, weights_only=True)
    for key in ("channels_last", "compile"):
        del old["hyper_parameters"][key]
    torch.save(old, tmp_path / "old.ckpt")
    np.testing.assert_allclose(_predict(tmp_path / "old.ckpt", volume, tmp_path / "out_old"), outputs["off", "false"],
                               atol=1e-5, rtol=0)

    # Independent check of the stitched values: with one patch covering the whole volume, the file is the softmax of
    # the plain (contiguous, float32) network's logits on the standardised volume.
    whole = _predict(ckpt_on, volume, tmp_path / "out_whole", "--data.predict_patch_shape", "[12, 20, 20]",
                     "--data.predict_stride_shape", "[12, 20, 20]")
    net = UNet3D(1, 2, f_maps=4, num_levels=2, num_groups=2)
    net.load_state_dict({k[len("net."):]: v for k, v in saved["state_dict"].items() if k.startswith("net.")})
    x = raw.astype(np.float64)
    x = torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32))[None, None]
    with torch.no_grad():
        expected = torch.softmax(net.eval()(x), dim=1)[0].numpy()
    np.testing.assert_allclose(whole, expected, atol=1e-5, rtol=0)


def test_resuming_with_the_other_setting_continues(tmp_path):
    ckpt = _fit_checkpoint(tmp_path, False, "off.ckpt")
    model = UNet3DModule(out_channels=2, f_maps=4, num_levels=2, num_groups=2, learning_rate=0.01, channels_last=True)
    data = HDF5DataModule(train_paths=[str(tmp_path / "train.h5")], val_paths=[str(tmp_path / "val.h5")],
                          train_patch_shape=(8, 16, 16), batch_size=1, num_workers=0)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    assert trainer.global_step == 3
    adam = trainer.optimizers[0]
    weight = model.net.encoders[0][0].conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert adam.state[weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last_3d)


def test_bf16_cpu_prediction_stays_within_the_documented_tolerance(tmp_path):
    ckpt = _fit_checkpoint(tmp_path, True, "model.ckpt")
    raw, _ = blob_volume(shape=(12, 20, 20), seed=5)
    volume = write_h5(tmp_path / "vol.h5", raw=raw)
    full = _predict(ckpt, volume, tmp_path / "fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = _predict(ckpt, volume, tmp_path / "bf16", "--trainer.precision", "bf16-mixed")
    # oneDNN's bf16 convolutions need AVX-512 (F, BW, VL, DQ: "avx512_core"), AMX or AVX2-VNNI-2 (proxy flag
    # avx_ne_convert); a CPU without runs slow fallback kernels, and the user is told.
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if flags:
        fast = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags or bool(flags & {"amx_bf16", "avx_ne_convert"})
        assert fast == cpu_has_fast_bf16()
        warned = any("slow fallback kernels" in str(w.message) for w in caught)
        assert warned == (not fast)
    with h5py.File(tmp_path / "bf16" / "vol_predictions.h5", "r") as f:
        assert f["predictions"].dtype == np.float32  # blending and output stay float32
    difference = np.abs(bf16 - full).max()
    assert 0 < difference <= BF16_TOLERANCE  # > 0: bf16 really ran
    np.testing.assert_allclose(bf16.sum(0), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU settings
def _trainer_of(args):
    cli = UNet3DCLI(UNet3DModule, HDF5DataModule, args=args, run=False, parser_class=ArgumentParser,
                    auto_configure_optimizers=False)
    return cli.trainer


@pytest.mark.parametrize(("extra", "expected"), [
    ([], True),
    (["--trainer.deterministic", "true"], False),
    (["--trainer.benchmark", "false"], False),
])
def test_cudnn_autotuning_is_on_unless_deterministic(extra, expected, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    torch.backends.cudnn.benchmark = not expected
    _trainer_of(["--trainer.accelerator", "cpu", "--trainer.logger", "false", *extra])
    assert torch.backends.cudnn.benchmark is expected


def test_compile_compiles_the_network_in_place_with_equal_outputs(monkeypatch):
    # The inductor backend needs a C++ compiler and a minute here; dynamo's tracing with the eager backend checks
    # the wiring (what is compiled, when, and that checkpoints keep their keys). The slow test below runs inductor.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    plain = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, channels_last=False).eval()
    compiled = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, channels_last=False, compile=True).eval()
    compiled.load_state_dict(plain.state_dict())
    compiled.setup("predict")
    assert compiled.net._compiled_call_impl is not None
    assert plain.net._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." in checkpoint keys
    x = torch.randn(1, 1, 8, 12, 12)
    with torch.no_grad():
        # Traced and eager, the compiler and PyTorch may choose different kernels: float32 rounding apart.
        torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_prediction_equals_eager_with_inductor(tmp_path):
    ckpt = _fit_checkpoint(tmp_path, True, "model.ckpt")
    raw, _ = blob_volume(shape=(8, 16, 16), seed=5)
    volume = write_h5(tmp_path / "vol.h5", raw=raw)
    eager = _predict(ckpt, volume, tmp_path / "eager")
    compiled = _predict(ckpt, volume, tmp_path / "compiled", "--model.compile", "true")
    np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize(("cores", "processes", "expected"), [
    (1, 1, 0), (2, 1, 1), (3, 1, 2), (4, 1, 3), (5, 1, 4), (64, 1, 4), (2, 2, 0), (8, 2, 3), (64, 8, 4), (4, 8, 0),
])
def test_default_num_workers_fits_the_cores_this_process_may_use(cores, processes, expected, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(processes) == expected


@pytest.mark.parametrize("cores", [None, 1, 16])  # this machine, then pretend to be a 1-core and a 16-core one
def test_default_run_gives_no_dataloader_worker_warning(cores, blob_files, tmp_path, monkeypatch, capsys):
    if cores is not None:
        # torch's DataLoader, Lightning's worker check and the default all read the affinity mask.
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args=["fit", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2",
                   "--data.train_paths", f"[{blob_files['train_0']}]", "--data.val_paths", f"[{blob_files['val_0']}]",
                   "--data.train_patch_shape", "[8, 16, 16]", "--trainer.max_steps", "1",
                   "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs")])
    messages = [str(w.message) for w in caught] + capsys.readouterr().err.splitlines()
    assert not [m for m in messages if "worker" in m.lower()], messages
