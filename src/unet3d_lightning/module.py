"""The LightningModule: UNet3D + a Sudre loss + torchmetrics validation metrics + optimizer and LR schedule."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelF1Score,
    MultilabelJaccardIndex,
)

from .data.spacing import VoxelSize
from .data.targets import MASKED
from .errors import ConfigurationError
from .losses import REGRESSION_LOSS_NAMES, apply_final_activation, create_loss, final_activation_name
from .networks import DEFAULT_DROPOUT, build_network, patch_divisor, slice_wise
from .networks.deep_supervision import DeepSupervision, downsample_target
from .prediction.engine import inference_context
from .regression import regression_metrics, update_regression_metrics

LossName = Literal["ce", "wce", "bce", "dice", "bce_dice", "dice_ce", "mse", "l1", "smooth_l1"]
#: What a model is trained for, :attr:`UNet3DModule.task`: class probabilities / masks, or float values.
Task = Literal["segmentation", "regression"]
Architecture = Literal["unet", "residual_unet", "residual_se_unet"]
# Which way a monitored metric improves, read from its name: the first listed word found in the last part of the
# name (``val/dice_class1`` -> ``dice_class1``) decides. Errors and losses fall, overlap scores rise.
_METRIC_DIRECTIONS = (
    ("loss", "min"), ("error", "min"), ("arand", "min"), ("voi", "min"),
    ("dice", "max"), ("iou", "max"), ("jaccard", "max"), ("f1", "max"), ("accuracy", "max"), ("precision", "max"),
    ("recall", "max"), ("ap", "max"), ("mse", "min"), ("mae", "min"), ("psnr", "max"), ("ssim", "max"),
)
# Losses whose label type is fixed by the loss itself; 'dice' works with both and learns it from the data.
_MULTICLASS_BY_LOSS = {"ce": True, "wce": True, "bce": False, "bce_dice": False, "dice_ce": True}


class UNet3DModule(pl.LightningModule):
    """3D U-Net segmentation model trained with one of the Sudre et al. 2017 losses.

    Architecture args are those of :class:`~unet3d_lightning.networks.UNet`; they are saved in every checkpoint
    (``save_hyperparameters``), so ``UNet3DModule.load_from_checkpoint(path)`` and ``unet3d predict --ckpt_path``
    rebuild the model without repeating them.

    Args:
        in_channels, out_channels, f_maps, num_levels, layer_order, num_groups, upsample: see ``UNet3D``.
        architecture: ``"unet"`` (Çiçek et al.), ``"residual_unet"`` (Lee et al. 2017) or ``"residual_se_unet"``
            (plus squeeze-excitation, Roy et al. 2018); see :mod:`unet3d_lightning.networks`. Default ``"unet"``.
        spatial_dims: 3, or 2 for a 2D network trained and applied slice by slice on the volumes' z-slices (patch
            shapes then have z = 1). Default 3.
        variant: layer details, ``"native"`` or ``"pytorch3dunet"`` (set by ``unet3d import-pytorch3dunet`` for
            models trained with pytorch-3dunet; keep it to fine-tune them). Default ``"native"``.
        loss: ``"ce"`` cross-entropy, ``"wce"`` Sudre's weighted cross-entropy, ``"bce"`` binary cross-entropy (4D
            binary labels), ``"dice"`` Sudre's Generalized Dice, ``"bce_dice"`` BCE + Dice, ``"dice_ce"`` nnU-Net's soft
            Dice (softmax, batch Dice, background excluded) + cross-entropy for class ids; or, for a regression
            (denoising, restoration) model trained on float targets, ``"mse"``, ``"l1"`` or ``"smooth_l1"`` (see
            :mod:`unet3d_lightning.losses`): such a model has no final activation, ``final_activation`` returns its
            raw output, and validation logs ``val/psnr`` and ``val/mse`` instead of Dice and IoU. Default ``"ce"``.
        loss_weight: per-class (``ce``) or per-channel (``bce``, ``bce_dice``, ``mse``, ``l1``, ``smooth_l1``)
            weights, one per output channel; the original ``--loss-weight``. Default None (all 1).
        ignore_index: label value whose voxels count neither in the loss nor in the metrics; for regression, the
            target value marking voxels without a target (e.g. -1), compared exactly. Default None.
        multiclass: whether labels are class ids (3D label volumes, softmax output) or binary masks (4D labels,
            per-channel sigmoid output). Default None: implied by the loss (ce/wce: class ids; bce/bce_dice: masks)
            and, for ``dice``, read from the training data at setup; the value is then stored in the checkpoint so
            prediction applies the same final activation.
        learning_rate: initial learning rate given to the optimizer. Default 2e-4 (the original's).
        weight_decay: weight decay given to the optimizer. Default 1e-4 (the original's).
        optimizer: optimizer class and its other arguments (momentum, betas, ...), e.g. in YAML
            ``optimizer: {class_path: torch.optim.SGD, init_args: {momentum: 0.9, nesterov: true}}``. The learning
            rate and weight decay always come from ``learning_rate`` and ``weight_decay`` (a different ``lr`` in
            the optimizer's init_args is an error). Default None: Adam.
        lr_scheduler: LR scheduler class and arguments, e.g. ``lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau``
            or ``{class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 100}}``. Default None
            (constant learning rate).
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every optimizer ``"step"``. Default ``"epoch"``.
        lr_scheduler_monitor: metric that ``ReduceLROnPlateau`` watches. Default ``"val/loss"``.
        channels_last: run the network in the channels-last memory format (``torch.channels_last_3d`` for a 3D
            network, ``torch.channels_last`` for a 2D one) on CPU and CUDA devices, where oneDNN and cuDNN
            convolutions are faster in it; each batch's input is converted once, after it reaches the device. Outputs
            (logits, losses, probabilities) are contiguous and equal the contiguous network's up to float32 rounding,
            and checkpoints always store contiguous weights, so a checkpoint loads whatever this setting. Default True.
        compile: ``torch.compile`` the network (not the loss or the metrics) when a run starts. Pays off on long GPU
            runs; the first batches are slow while it compiles. Default False.
        targets: what the output channels mean when the model is trained on targets derived from instance labels
            (``data.label_transform``), e.g. ``{"kind": "boundaries", "foreground_channel": false, ...}`` or
            ``{"kind": "affinities", "offsets": [[1, 0, 0], ...]}``. Filled in from the data at setup and stored in
            the checkpoint, so that prediction can turn the maps into instances; not meant to be set by hand.
            Default None: the outputs are class probabilities or masks. Runs with such targets also log
            ``val/arand`` (adapted Rand error, lower is better) and ``val/ap`` (average precision at IoU 0.5, higher
            is better), see :mod:`unet3d_lightning.instances`.
        pool_kernel_size: pooling factor per axis of each level: an int (every axis and level), one ``[z, y, x]``
            (``[y, x]`` for ``spatial_dims`` 2) for every level, or ``num_levels - 1`` of them, one per pooling, e.g.
            ``[[1, 2, 2], [1, 2, 2], [2, 2, 2]]`` for voxels 4 times as deep as wide (README "Anisotropic data").
            The decoders upsample by the same factors; patches must be at least the product of each axis' factors
            long (:attr:`patch_divisor`, checked at setup). Default 2 (the classic U-Net).
        conv_kernel_size: kernel of every convolution of a level, in the same forms with ``num_levels`` entries,
            e.g. ``[[1, 3, 3], [3, 3, 3], [3, 3, 3]]``; odd sizes, padded to keep the size. Default 3.
        dropout: probability of the ``d`` (dropout) and ``D`` (channel dropout) letters of ``layer_order``, as
            pytorch-3dunet's ``dropout_prob``: one value, or ``[first, second]`` for each block's two convolutions.
            Active in training only (no effect at prediction or validation). Default None: 0.1 where the layer order
            has such a letter; a value with no such letter is an error.
        deep_supervision: train with auxiliary 1×1 heads on the decoder levels below full resolution, each level's
            loss on the target downsampled to it (nearest voxel for class ids and weights, max-pooling for masks),
            weights halving per level and normalised to sum 1 (nnU-Net; see
            :mod:`unet3d_lightning.networks.deep_supervision`); ``train/loss`` is then that weighted sum. Only
            training uses the heads: validation, prediction, export and the network's state dict are those of the
            plain network. Needs ``num_levels >= 3``. Default False.
    """

    # The voxel size (z, y, x) of the training data, recorded in checkpoints under "voxel_size" (None: unknown); set
    # by fit from the data, read back with the weights, compared with each prediction volume's.
    voxel_size: VoxelSize | None = None

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        f_maps: int | list[int] = 64,
        num_levels: int = 4,
        layer_order: str = "crg",
        num_groups: int = 8,
        upsample: Literal["deconv", "interpolate"] = "deconv",
        architecture: Architecture = "unet",
        spatial_dims: Literal[3, 2] = 3,
        variant: Literal["native", "pytorch3dunet"] = "native",
        loss: LossName = "ce",
        loss_weight: list[float] | None = None,
        ignore_index: int | None = None,
        multiclass: bool | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        channels_last: bool = True,
        compile: bool = False,  # noqa: A002 - the user's word for it; stored in hparams, never as an attribute
        targets: dict[str, Any] | None = None,
        pool_kernel_size: int | list[int] | list[list[int]] = 2,
        conv_kernel_size: int | list[int] | list[list[int]] = 3,
        dropout: float | list[float] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dropout is not None and not any(letter in str(layer_order) for letter in "dD"):
            raise ConfigurationError(
                f"model.dropout {dropout!r} has no effect: model.layer_order {layer_order!r} has no dropout layer; "
                f"add 'd' (dropout) or 'D' (channel dropout), e.g. {str(layer_order) + 'd'!r}, or drop model.dropout"
            )
        try:
            self.net = build_network(
                architecture, in_channels, out_channels, f_maps, num_levels, layer_order, num_groups, upsample,
                spatial_dims, variant, pool_kernel_size=_plain_kernel(pool_kernel_size),
                conv_kernel_size=_plain_kernel(conv_kernel_size),
                dropout=DEFAULT_DROPOUT if dropout is None else dropout,
            )
        except ValueError as err:
            raise ConfigurationError(_model_message(err)) from None
        try:
            self.deep_supervision = (
                DeepSupervision(self.net, out_channels, spatial_dims) if deep_supervision else None
            )
        except ValueError as err:
            raise ConfigurationError(f"model.deep_supervision: {err}") from None
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ignore_index = ignore_index
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._optimizer_kwargs()  # a conflicting learning rate fails here, not after data setup
        self.loss_fn: torch.nn.Module | None = None
        self.multiclass: bool | None = None
        # Whether the labels are targets derived from instance labels, whose MASKED elements the loss leaves out.
        self.instance_targets = False
        implied = _MULTICLASS_BY_LOSS.get(loss)
        if loss in REGRESSION_LOSS_NAMES:
            if multiclass:
                raise ConfigurationError(
                    f"loss {loss!r} is a regression loss (float targets, no final activation) and takes no class "
                    "ids: drop model.multiclass, or use loss ce, wce or dice for class-id labels"
                )
            if targets:
                raise ConfigurationError(
                    f"loss {loss!r} is a regression loss; boundary/affinity targets (data.label_transform) need loss "
                    "bce, dice or bce_dice"
                )
        elif multiclass is not None and implied is not None and multiclass != implied:
            kind = "class-id (3D)" if implied else "binary (4D)"
            raise ConfigurationError(f"loss {loss!r} needs {kind} labels, but multiclass={multiclass} was given")
        resolved = multiclass if multiclass is not None else implied
        if loss in REGRESSION_LOSS_NAMES:
            self._configure_regression()
        elif resolved is not None:
            self._configure_task(resolved)
        else:
            # 'dice' without an explicit label type still checks its loss arguments up front.
            _user_error(create_loss, loss, multiclass=True, weight=loss_weight, ignore_index=ignore_index,
                        out_channels=out_channels)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Set by the prediction writer for flip test-time augmentation.
        self.predict_tta = False
        # Memory format of the network's input, set when a run starts (None: leave the input as it comes).
        self.input_memory_format: torch.memory_format | None = None

    @property
    def patch_divisor(self) -> tuple[int, int, int]:
        """Per axis ``(z, y, x)``, the product of the network's pooling factors: the shortest patch each axis takes
        (:func:`~unet3d_lightning.networks.kernels.patch_divisor`; z is 1 for a 2D network)."""
        hp = self.hparams
        return patch_divisor(
            _plain_kernel(hp.get("pool_kernel_size", 2)), len(self.net.channels), int(hp.get("spatial_dims", 3))
        )

    # ----------------------------------------------------------------------------------------------- task set-up
    @property
    def task(self) -> Task:
        """``"regression"`` for a model trained with ``mse``, ``l1`` or ``smooth_l1`` (float outputs, no final
        activation: :meth:`final_activation` returns the network's output), else ``"segmentation"`` (class
        probabilities or masks). Read from ``hparams.loss``, so it holds for any checkpoint."""
        return "regression" if self.hparams.get("loss") in REGRESSION_LOSS_NAMES else "segmentation"

    def _configure_regression(self) -> None:
        """Loss and metrics of a regression model: a float target per output channel, no final activation; the
        validation metrics are PSNR and MSE over the voxels that are not ignored (see :func:`regression_metrics`)."""
        hp = self.hparams
        self.instance_targets = False
        self.loss_fn = _user_error(
            create_loss, hp.loss, multiclass=False, weight=hp.loss_weight, ignore_index=hp.ignore_index,
            out_channels=hp.out_channels,
        )
        self.multiclass = False  # per-channel outputs; "none" below is what the prediction writer and exports apply
        self.activation = final_activation_name(hp.loss, multiclass=False)
        self.val_metrics = regression_metrics("val").to(self.device)
        self.test_metrics = regression_metrics("test").to(self.device)

    def _configure_task(self, multiclass: bool, instance_targets: bool = False) -> None:
        """Build the loss and the metrics for class-id labels (``multiclass``) or binary masks; with
        ``instance_targets`` the masks are derived from instance labels and their MASKED elements are left out
        (``model.ignore_index`` then names an instance id, which the derivation masks)."""
        hp = self.hparams
        self.instance_targets = instance_targets
        self.loss_fn = _user_error(
            create_loss, hp.loss, multiclass=multiclass, weight=hp.loss_weight,
            ignore_index=MASKED if instance_targets else hp.ignore_index, out_channels=hp.out_channels,
        )
        self.multiclass = multiclass
        # Stored so that the checkpoint carries the label type, and prediction the right final activation.
        self.hparams["multiclass"] = multiclass
        self.activation = final_activation_name(hp.loss, multiclass=multiclass)
        self.val_metrics = self._make_metrics("val")
        self.test_metrics = self._make_metrics("test")
        if instance_targets:
            # Not persistent (MeanMetric's default): checkpoints keep the same keys with or without them.
            self.instance_metrics = torch.nn.ModuleDict(
                {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in ("arand", "ap")}
            ).to(self.device)

    def _make_metrics(self, stage: str) -> MetricCollection:
        c = self.hparams.out_channels
        ignore = MASKED if self.instance_targets else self.hparams.ignore_index
        if self.multiclass:
            metrics = {
                "dice": MulticlassF1Score(num_classes=c, average="none", ignore_index=ignore),
                "iou": MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=ignore),
            }
        elif c == 1:
            # One mask (the usual boundary or foreground model): torchmetrics' multilabel metrics need two labels.
            metrics = {
                "dice": BinaryF1Score(ignore_index=ignore),
                "iou": BinaryJaccardIndex(ignore_index=ignore),
            }
        else:
            metrics = {
                "dice": MultilabelF1Score(num_labels=c, average="none", ignore_index=ignore),
                "iou": MultilabelJaccardIndex(num_labels=c, average="macro", ignore_index=ignore),
            }
        return MetricCollection(metrics, prefix=f"{stage}/").to(self.device)

    def setup(self, stage: str) -> None:
        """Learn the label type from the datamodule (for ``dice``) and check it against the loss; choose the
        network's memory format (and compile it) for the run's device."""
        strategy = getattr(self._trainer, "strategy", None)
        device = strategy.root_device if strategy is not None else self.device
        self.use_memory_format(device)
        precision = str(getattr(self._trainer, "precision", ""))
        if precision.startswith("bf16") and torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
            warnings.warn(
                f"trainer.precision {precision}: this CPU lacks the AVX-512/AMX instructions of oneDNN's bfloat16 "
                "convolutions, so bfloat16 runs on slow fallback kernels, many times slower than float32; use "
                "--trainer.precision 32-true here",
                stacklevel=2,
            )
        if self.hparams.get("compile") and getattr(self.net, "_compiled_call_impl", None) is None:
            # nn.Module.compile compiles in place: the state_dict keys (checkpoints) stay those of the plain network.
            self.net.compile()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        targets = getattr(datamodule, "targets", None)
        if targets is not None and stage != "predict":
            self.hparams["targets"] = targets.spec()
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "training_voxel_size"):
            self.voxel_size = datamodule.training_voxel_size
        self.use_label_kind(
            getattr(datamodule, "label_kind", None),
            voxel_weights=stage != "predict" and getattr(datamodule, "weight_internal_path", None) is not None,
        )

    def use_label_kind(self, label_kind: str | None, voxel_weights: bool = False) -> None:
        """Adopt the data's label type, ``"class_ids"`` (3D labels) or ``"binary"`` (4D masks), or raise if the
        loss cannot train on it, or cannot take the per-voxel weights the data comes with (``voxel_weights``).
        ``label_kind=None`` (no labelled data, e.g. prediction) changes nothing."""
        if label_kind is None:
            return
        if self.task == "regression" or label_kind == "regression":
            self._use_regression_targets(label_kind)
            return
        self._use_label_kind(label_kind)
        if voxel_weights and not getattr(self.loss_fn, "takes_voxel_weight", True):
            raise ConfigurationError(
                f"loss {self.hparams.loss!r} takes no per-voxel weights; drop data.weight_internal_path or use "
                "loss ce, wce, bce or bce_dice"
            )

    def _use_regression_targets(self, label_kind: str) -> None:
        """A regression loss trains on float targets only (the datamodule reads ``/label`` so when the model is a
        regression model), and a segmentation loss never on them."""
        if self.task != "regression":
            raise ConfigurationError(
                f"the data holds float regression targets but loss {self.hparams.loss!r} is a segmentation loss; "
                "use loss mse, l1 or smooth_l1"
            )
        if label_kind != "regression":
            what = {"instances": "instance labels (data.label_transform)"}.get(label_kind, f"{label_kind} labels")
            raise ConfigurationError(
                f"loss {self.hparams.loss!r} is a regression loss but the data holds {what}; use a segmentation loss "
                "(ce, wce, bce, dice, bce_dice) for them"
            )

    def _use_label_kind(self, label_kind: str) -> None:
        data_multiclass = label_kind == "class_ids"
        instances = label_kind == "instances"
        if instances and self.multiclass:
            raise ConfigurationError(
                f"loss {self.hparams.loss!r} (multiclass=True) cannot train on the boundary/affinity targets of "
                "data.label_transform; use loss bce, dice or bce_dice"
            )
        if self.multiclass is None or instances != self.instance_targets:
            self._configure_task(data_multiclass, instance_targets=instances)
        elif self.multiclass != data_multiclass:
            have = "3D class-id" if data_multiclass else "4D binary"
            if self.hparams.loss in _MULTICLASS_BY_LOSS:
                fix = "use loss ce, wce or dice" if data_multiclass else "use loss bce, dice or bce_dice"
            else:
                fix = "set model.multiclass to match the labels"
            raise ConfigurationError(
                f"loss {self.hparams.loss!r} (multiclass={self.multiclass}) does not fit the {have} labels of the "
                f"data; {fix}"
            )

    # ----------------------------------------------------------------------------------------------- memory format
    def use_memory_format(self, device: torch.device | str) -> None:
        """Lay out the network's weights for ``device``: channels-last where ``model.channels_last`` is on and the
        device is a CPU or a CUDA GPU (oneDNN and cuDNN have channels-last kernels; other backends may not), else
        contiguous. Called when a run starts, before the model is moved to the device or wrapped by DDP."""
        fmt = network_memory_format(self.net)
        if not (self.hparams.get("channels_last", True) and torch.device(device).type in ("cpu", "cuda")):
            fmt = None
        def lay_out(tensor: Tensor) -> Tensor:
            # A 1x1x1 kernel is laid out alike in both formats, but only contiguous strides match the gradients
            # autograd makes for it (DDP warns about, and copies, mismatched gradient strides).
            if fmt is not None and tensor.dim() == _FORMAT_DIMS[fmt] and any(s > 1 for s in tensor.shape[2:]):
                return tensor.contiguous(memory_format=fmt)
            return tensor.contiguous()

        self.net._apply(lay_out)
        self.input_memory_format = fmt

    def input_to_memory_format(self, x: Tensor) -> Tensor:
        """``x`` in the memory format the network runs in (a no-op when it already is, or when the network runs
        contiguous). ``HDF5DataModule`` calls it once per batch, right after the batch reaches the device."""
        fmt = self.input_memory_format
        if fmt is not None and x.dim() == _FORMAT_DIMS[fmt]:
            return x.contiguous(memory_format=fmt)
        return x

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints hold contiguous tensors whatever the run's memory format: the file does not depend on the
        # setting, and any checkpoint loads into a network of either layout (load_state_dict copies into it).
        checkpoint["state_dict"] = {k: _contiguous(v) for k, v in checkpoint["state_dict"].items()}
        if self.voxel_size is not None:
            checkpoint["voxel_size"] = self.voxel_size.as_dict()
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for state in optimizer_state.get("state", {}).values():
                state.update({k: _contiguous(v) for k, v in state.items()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _match_deep_supervision_heads(self, checkpoint.get("state_dict"))
        # Resumed optimizer state (Adam's moments) takes the layout of the parameters it updates, so that the
        # optimizer keeps its fast path; load_state_dict already copies the weights into the network's layout.
        self.voxel_size = VoxelSize.from_dict(checkpoint.get("voxel_size")) or self.voxel_size
        fmt = self.input_memory_format
        if fmt is None:
            return
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for state in optimizer_state.get("state", {}).values():
                state.update({
                    k: v.contiguous(memory_format=fmt) if isinstance(v, Tensor) and v.dim() == _FORMAT_DIMS[fmt] else v
                    for k, v in state.items()
                })

    def logged_metric_names(self, validation: bool = True) -> list[str]:
        """The metrics ``fit`` logs, which ``checkpoint.monitor``, ``early_stopping.monitor`` and
        ``lr_scheduler_monitor`` may name: ``train/loss`` (per step), ``train/loss_epoch`` and, when validation runs
        (``validation``, default True), ``val/loss``, ``val/dice``, ``val/iou`` and ``val/dice_class<i>`` for each
        of the ``out_channels`` (when there is more than one), and with instance targets ``val/arand`` and
        ``val/ap``; for a regression model ``val/loss``, ``val/psnr`` and ``val/mse`` instead."""
        names = ["train/loss", "train/loss_epoch"]
        if validation and self.task == "regression":
            return names + ["val/loss", "val/psnr", "val/mse"]
        if validation:
            names += ["val/loss", "val/dice", "val/iou"]
            if self.hparams.out_channels > 1:
                names += [f"val/dice_class{i}" for i in range(self.hparams.out_channels)]
            if self.instance_targets or self.hparams.get("targets"):
                names += ["val/arand", "val/ap"]  # targets derived from instance labels (data.label_transform)
        return names

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, out_channels, D, H, W)`` for an input ``(B, in_channels, D, H, W)`` (a 2D network sees each
        z-slice on its own), contiguous."""
        # The input is normally converted already, when the batch reached the device (3D networks; a 2D network's
        # slices exist only here); this covers other callers. A channels-last network returns channels-last logits;
        # the copy to a contiguous tensor is cheap (few channels) and keeps everything after the network (losses,
        # metrics, stitching) layout-independent.
        if self.spatial_dims == 2:
            return slice_wise(lambda slices: self.net(self.input_to_memory_format(slices)), x).contiguous()
        return self.net(self.input_to_memory_format(x)).contiguous()

    def final_activation(self, logits: Tensor) -> Tensor:
        """The values prediction writes: softmax over channels for class-id labels, per-channel sigmoid for masks,
        and for a regression model (:attr:`task` ``"regression"``) the network's output as it is (float32)."""
        if self.multiclass is None:
            raise ConfigurationError(
                "the label type of this model is unknown (loss 'dice' never trained); set model.multiclass"
            )
        return apply_final_activation(logits, self.activation)

    # ----------------------------------------------------------------------------------------------- steps
    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.loss_fn is None:
            # Used without a datamodule that reports the label type: class ids come without a channel axis.
            self._configure_task(batch["label"].dim() == 4)
        logits = self(batch["raw"])
        loss = self.loss_fn(logits, batch["label"], batch.get("weight"))
        return loss, logits

    def _training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The loss of the full-resolution output; with deep supervision, the weighted sum over the decoder levels
        of the losses of their heads' logits against the target (and weights) downsampled to their size."""
        if self.deep_supervision is None:
            return self._loss(batch)[0]
        with self.deep_supervision.capture(self.net) as features:
            loss, _ = self._loss(batch)
        batch_size, depth = batch["raw"].shape[0], batch["raw"].shape[2]
        total = self.deep_supervision.weights[0] * loss
        ignore = MASKED if self.instance_targets else self.hparams.ignore_index
        for weight, logits in zip(self.deep_supervision.weights[1:], self.deep_supervision(features)):
            if self.spatial_dims == 2:  # the slices of a 2D network come back as one batch of B * D images
                logits = logits.reshape(batch_size, depth, *logits.shape[1:]).transpose(1, 2)
            size = tuple(logits.shape[2:])
            # Masks are max-pooled; class ids and regression targets (float values, not masks) take the nearest voxel.
            binary = not self.multiclass and self.task != "regression"
            target = downsample_target(batch["label"], size, binary, ignore)
            voxel_weight = batch.get("weight")
            if voxel_weight is not None:
                voxel_weight = downsample_target(voxel_weight, size, False)
            total = total + weight * self.loss_fn(logits.contiguous(), target, voxel_weight)
        return total

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._training_loss(batch)
        batch_size = batch["raw"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.train_loss.update(loss.detach(), weight=batch_size)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor | None]:
        # Under DDP the datamodule pads the last round of validation patches so that every rank runs the same
        # number of batches (the metrics' collectives must line up); padded duplicates are flagged and skipped
        # here, so every patch counts exactly once. Metrics sync across ranks once, at compute().
        padding = batch.get("padding")
        if padding is not None and bool(padding.any()):
            keep = ~padding.to(batch["raw"].device)
            batch = {k: v[keep] if k != "padding" else v[~padding] for k, v in batch.items()}
        mean_loss = self.val_loss if stage == "val" else self.test_loss
        batch_size = batch["raw"].shape[0]
        if batch_size == 0:
            mean_loss.update(torch.zeros((), device=self.device), weight=0.0)
            if self.instance_targets:  # every rank takes part in the metrics' sync, also with nothing to add
                for name in ("arand", "ap"):
                    self.instance_metrics[f"{stage}_{name}"].update(torch.zeros((), device=self.device), weight=0.0)
            self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
            return {"loss": None, "probabilities": None}
        # Validation and test run the network without gradients, as prediction does: the same kernel choice.
        with inference_context(batch["raw"].device, self.net):
            loss, logits = self._loss(batch)
        probabilities = self.final_activation(logits)
        mean_loss.update(loss.detach(), weight=batch_size)
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        target = batch["label"]
        if self.task == "regression":
            update_regression_metrics(metrics, probabilities, target, self.hparams.ignore_index)
            return {"loss": loss, "probabilities": probabilities, "batch": batch}
        metrics.update(probabilities, target if self.multiclass else target.long())
        if self.instance_targets and "instances" in batch and self.hparams.get("targets"):
            self._update_instance_metrics(probabilities, batch["instances"], stage)
        return {"loss": loss, "probabilities": probabilities, "batch": batch}

    def _update_instance_metrics(self, probabilities: Tensor, instances: Tensor, stage: str) -> None:
        """Adapted Rand error and AP@0.5 of each patch's instances (connected components of the thresholded
        prediction, see :func:`~unet3d_lightning.instances.instance_scores`); the epoch's values are their means."""
        from .instances import instance_scores  # scikit-image is needed only by instance runs

        maps, truth = probabilities.detach().float().cpu().numpy(), instances.cpu().numpy()
        for sample_maps, sample_truth in zip(maps, truth):
            arand, ap = instance_scores(sample_maps, sample_truth, self.hparams.targets)
            self.instance_metrics[f"{stage}_arand"].update(torch.tensor(arand, device=self.device))
            self.instance_metrics[f"{stage}_ap"].update(torch.tensor(ap, device=self.device))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def _log_metrics(self, metrics: MetricCollection, stage: str) -> None:
        values = metrics.compute()  # synced over ranks
        metrics.reset()
        if self.task == "regression":
            self.log(f"{stage}/psnr", values[f"{stage}/psnr"], prog_bar=True, sync_dist=True)
            self.log(f"{stage}/mse", values[f"{stage}/mse"], sync_dist=True)
            return
        per_class = values.pop(f"{stage}/dice")
        # The values are already synced (identical on every rank); sync_dist only tells Lightning so.
        self.log(f"{stage}/dice", per_class.mean(), prog_bar=True, sync_dist=True)
        others = {f"{stage}/iou": values[f"{stage}/iou"]}
        if per_class.numel() > 1:
            others.update({f"{stage}/dice_class{i}": v for i, v in enumerate(per_class)})
        if self.instance_targets:
            for name in ("arand", "ap"):
                metric = self.instance_metrics[f"{stage}_{name}"]
                others[f"{stage}/{name}"] = metric.compute()  # synced over ranks
                metric.reset()
        self.log_dict(others, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.loss_fn is not None:
            self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        if self.loss_fn is not None:
            self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Probabilities for a batch of patches, with their location passed through for the stitcher."""
        raw = batch["raw"]
        # The predict-time kernel choice (oneDNN also for batch-1 CPU convolutions) is entered per batch, so that
        # the network is plain again between batches and after an interrupted run.
        with inference_context(raw.device, self.net):
            if self.predict_tta:
                probabilities = flip_tta(lambda x: self.final_activation(self(x)), raw)
            else:
                probabilities = self.final_activation(self(raw))
        members = getattr(self, "predict_members", None)
        if members:  # prediction.ensemble: the mean of every model's probabilities
            from .prediction.ensemble import ensemble_mean

            probabilities = ensemble_mean(probabilities, members, raw, self.predict_tta)
        return {**{k: v for k, v in batch.items() if k != "raw"}, "probabilities": probabilities}

    # ----------------------------------------------------------------------------------------------- optimizers
    def _optimizer_kwargs(self) -> dict[str, float]:
        """``lr`` and ``weight_decay`` for the optimizer, from ``learning_rate`` / ``weight_decay``.

        The optimizer group's own ``lr`` / ``weight_decay`` (which the config system fills with the class defaults)
        must be left at those defaults or agree: two different learning rates in one config is a mistake.
        """
        hp = self.hparams
        ours = {"lr": hp.learning_rate, "weight_decay": hp.weight_decay}
        factory = self.optimizer_factory
        if factory is None:
            return ours
        optimizer_class = next(
            (f for f in (getattr(factory, "func", None), *getattr(factory, "args", ()))
             if isinstance(f, type) and issubclass(f, torch.optim.Optimizer)),
            None,
        )
        if optimizer_class is None:
            return ours
        parameters = inspect.signature(optimizer_class).parameters
        given = getattr(factory, "keywords", None) or {}
        names = {"lr": "learning_rate", "weight_decay": "weight_decay"}
        for key, value in ours.items():
            default = parameters[key].default if key in parameters else None
            if key in given and given[key] != default and given[key] != value:
                raise ConfigurationError(
                    f"the optimizer's init_args set {key}={given[key]} but model.{names[key]} is {value}; set it "
                    f"once, as model.{names[key]}"
                )
        return {k: v for k, v in ours.items() if k in parameters}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        else:
            optimizer = self.optimizer_factory(params, **self._optimizer_kwargs())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": hp.lr_scheduler_interval,
                "monitor": hp.lr_scheduler_monitor,
            },
        }


def _match_deep_supervision_heads(module: UNet3DModule, state_dict: dict[str, Any] | None) -> None:
    """Let a checkpoint with deep-supervision heads load into a model without them (prediction with
    ``model.deep_supervision false``: the heads' weights are dropped) and one without into a model with them
    (fine-tuning with deep supervision: the new heads keep their initial weights)."""
    if state_dict is None:
        return
    prefix = "deep_supervision."
    if module.deep_supervision is None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
    elif not any(k.startswith(prefix) for k in state_dict):
        state_dict.update({f"{prefix}{k}": v for k, v in module.deep_supervision.state_dict().items()})


def metric_mode(name: str) -> Literal["min", "max"] | None:
    """``"min"`` or ``"max"``: whether the logged metric ``name`` improves by falling (losses, errors, ``arand``)
    or rising (``dice``, ``iou``, ``ap``, ``f1``, ``accuracy``); None when the name does not say.

    The last part of the name counts, split into words at ``_``, ``-`` and ``.`` (a trailing number, as in
    ``class1`` or ``ap50``, may be dropped): ``val/dice_class1`` is ``max``,
    ``val/loss`` ``min``, ``train/loss_epoch`` ``min``; ``val/map`` is not ``ap`` (None).
    """
    tokens = [t for t in re.split(r"[_\-.]+", name.rsplit("/", 1)[-1].lower()) if t]
    words = set(tokens) | {t.rstrip("0123456789") for t in tokens}  # dice_class1 -> class; f1 stays f1
    for key, mode in _METRIC_DIRECTIONS:
        if key in words:
            return mode  # type: ignore[return-value]
    return None


def _user_error(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``function``; its ValueErrors are configuration mistakes (loss arguments), reported as such."""
    try:
        return function(*args, **kwargs)
    except ValueError as err:
        raise ConfigurationError(f"model: {err}") from None


_FORMAT_DIMS = {torch.channels_last_3d: 5, torch.channels_last: 4}


def channels_last_format(ndim: int) -> torch.memory_format | None:
    """The channels-last memory format for tensors of ``ndim`` dimensions: ``torch.channels_last_3d`` for 5D
    ``(B, C, D, H, W)``, ``torch.channels_last`` for 4D ``(B, C, H, W)``; None for any other rank."""
    return {5: torch.channels_last_3d, 4: torch.channels_last}.get(ndim)


def network_memory_format(net: torch.nn.Module) -> torch.memory_format | None:
    """The channels-last format that fits ``net``'s convolutions (3D or 2D, read from their weights' rank), or None
    for a network without convolution weights."""
    for parameter in net.parameters():
        fmt = channels_last_format(parameter.dim())
        if fmt is not None:
            return fmt
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has fast bfloat16 convolutions on this CPU: AVX-512 (bf16 computed natively with AVX-512 BF16
    or AMX, converted on the fly otherwise) or AVX2-VNNI-2. Without, bf16 autocast is many times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, Tensor) else value


def flip_tta(predict: Any, x: Tensor) -> Tensor:
    """Average of ``predict`` over the 8 flips of the three spatial axes (each flipped back before averaging); over
    the 4 flips of y and x for one-slice patches (2D models), where a z flip changes nothing."""
    total = None
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    if x.shape[2] == 1:
        flips = [dims for dims in flips if 2 not in dims]
    for dims in flips:
        out = predict(x.flip(dims) if dims else x).float()
        out = out.flip(dims) if dims else out
        total = out if total is None else total + out
    return total / len(flips)


def _plain_kernel(value: Any) -> Any:
    """A kernel setting as plain ints and lists (jsonargparse and YAML may hand over tuples or other sequences)."""
    if isinstance(value, (list, tuple)):
        return [_plain_kernel(v) for v in value]
    return value


def _model_message(err: ValueError) -> str:
    """A network's message as one line: ``model.<key> ...`` where it names a kernel or dropout setting, else
    ``model: ...``."""
    text = str(err)
    if text.startswith(("pool_kernel_size ", "conv_kernel_size ", "dropout ")):
        return "model." + text
    return f"model: {text}"
