"""Ensembles at prediction: ``unet3d predict --ckpt_path a.ckpt --prediction.ensemble '[b.ckpt, c.ckpt]'``.

Every patch goes through all models in the same streaming pass: the probabilities (after each model's final
activation, softmax or sigmoid) of the ``--ckpt_path`` model and of each member are averaged with equal weights
before the patch reaches the stitcher, so the written ``predictions`` are the mean of what each model alone would
write (blending is linear), and segmentation and instances are made from that mean. With ``prediction.tta`` each
model's flip average is taken first, then the mean over models (the same as the mean over models and flips).

Members are loaded once, when prediction starts, onto the model's device, and must agree with the ``--ckpt_path``
model on what the channels mean: ``in_channels``, ``out_channels``, ``spatial_dims``, the label type (``multiclass``:
softmax or sigmoid) and the instance targets (``targets``), and on the normalisation of the raw data they were
trained with (``data.normalization`` and ``percentiles``, which this run applies once to every patch). A member that
differs is one ``error:`` line naming it and the setting, before any patch is predicted: averaging models that read
their input differently would need one normalised copy of every patch per member, and the usual ensemble (the folds
of one training recipe) shares it. Architecture, depth, widths and loss may differ. Memory: each member's weights
and its activations for one batch, one member at a time.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError

# Settings that fix what the input and output channels mean: members must have the reference model's.
AGREEING_SETTINGS = ("in_channels", "out_channels", "spatial_dims", "multiclass", "targets")
# Data settings recorded in a checkpoint that change the numbers a model sees.
NORMALISATION_SETTINGS = ("normalization", "percentiles")
# Hyperparameters a member is built without: training-only or this run's choices.
_NOT_FOR_MEMBERS = ("optimizer", "lr_scheduler", "compile", "channels_last")


def _plain(value: Any) -> Any:
    from ..checkpoints import plain

    return plain(value)


def _same(a: Any, b: Any) -> bool:
    from ..checkpoints import same_setting

    return same_setting(a, b)


def load_members(
    paths: Sequence[str], reference: Any, data: Any = None, reference_path: str | None = None
) -> list[Any]:
    """Build the members of ``paths`` (``.ckpt`` files written by ``unet3d fit``), with their weights, on the
    ``reference`` model's device, after checking that they agree with it.

    Args:
        paths: the members' checkpoints (``~`` and ``$VAR`` expanded).
        reference: the ``--ckpt_path`` model (a :class:`~unet3d_lightning.module.UNet3DModule`).
        data: the run's datamodule, whose ``normalization`` and ``percentiles`` the members must have been trained
            with (checked where the member's checkpoint records them). Default None: not checked.
        reference_path: the ``--ckpt_path`` file, which a member may not name again (it would count twice).
            Default None: not checked.

    Raises:
        ConfigurationError: a member that cannot be read, is listed twice, or differs in a setting of
        :data:`AGREEING_SETTINGS` or in its normalisation.
    """
    from ..checkpoints import foreign_settings, load_checkpoint_weights, read_checkpoint
    from ..module import UNet3DModule

    members = []
    seen: set[str] = set()
    if reference_path:
        seen.add(os.path.realpath(os.path.expandvars(os.path.expanduser(str(reference_path)))))
    accepted = set(inspect.signature(UNet3DModule.__init__).parameters) - {"self"}
    for given in paths:
        path = os.path.expandvars(os.path.expanduser(str(given)))
        where = f"prediction.ensemble member {given}"
        key = os.path.realpath(path)
        if key in seen:
            raise ConfigurationError(
                f"{where} is listed twice (or is the --ckpt_path model, which is a member already); give each "
                "checkpoint once"
            )
        seen.add(key)
        try:
            checkpoint = read_checkpoint(path)
        except ConfigurationError as err:
            raise ConfigurationError(f"prediction.ensemble: {err}") from None
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        foreign = foreign_settings(hparams, UNet3DModule)
        if foreign is not None:
            raise ConfigurationError(f"{where}: {foreign}; give a .ckpt written by unet3d fit")
        for setting in AGREEING_SETTINGS:
            ours = reference.hparams.get(setting)
            theirs = hparams.get(setting, inspect.signature(UNet3DModule.__init__).parameters[setting].default)
            if not _same(_plain(ours), _plain(theirs)):
                raise ConfigurationError(
                    f"{where} has model.{setting}={_plain(theirs)!r} but the --ckpt_path model "
                    f"{_plain(ours)!r}; the members of an ensemble must agree on what their channels mean"
                )
        trained = checkpoint.get("datamodule_hyper_parameters") or {}
        if data is not None:
            for setting in NORMALISATION_SETTINGS:
                if setting not in trained or not hasattr(data, setting):
                    continue
                if setting == "percentiles" and getattr(data, "normalization", None) != "percentile":
                    continue  # the percentiles matter only to percentile normalisation
                if not _same(_plain(trained[setting]), _plain(getattr(data, setting))):
                    raise ConfigurationError(
                        f"{where} was trained with data.{setting}={_plain(trained[setting])!r} but this run "
                        f"normalises with {_plain(getattr(data, setting))!r}; ensemble members must share their "
                        "normalisation (it is applied once per patch for all of them)"
                    )
        settings = {k: v for k, v in hparams.items() if k in accepted and k not in _NOT_FOR_MEMBERS}
        settings["channels_last"] = reference.hparams.get("channels_last", True)
        try:
            member = UNet3DModule(**settings)
        except (TypeError, ValueError) as err:
            raise ConfigurationError(f"{where}: its hyper_parameters do not make a model ({err})") from None
        try:
            load_checkpoint_weights(path, member)
        except ConfigurationError as err:
            raise ConfigurationError(f"prediction.ensemble: {err}") from None
        if member.multiclass is None:
            raise ConfigurationError(f"{where}: its label type is unknown (model.multiclass); give a trained .ckpt")
        device = reference.device
        member.use_memory_format(device)
        member.to(device).eval()
        member.requires_grad_(False)
        members.append(member)
    return members


def ensemble_mean(first: Tensor, members: Sequence[Any], x: Tensor, tta: bool) -> Tensor:
    """The mean of ``first`` (the reference model's probabilities for the batch ``x``) and each member's, in float32;
    with ``tta`` each member's own flip average (:func:`~unet3d_lightning.module.flip_tta`)."""
    from ..module import flip_tta
    from .engine import inference_context

    total = first.float()
    for member in members:
        with inference_context(x.device, member.net), torch.no_grad():
            if tta:
                out = flip_tta(lambda v, m=member: m.final_activation(m(v)), x)
            else:
                out = member.final_activation(member(x))
        total = total + out.float()
    return total / (1 + len(members))
