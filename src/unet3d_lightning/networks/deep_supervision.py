"""Deep supervision for the U-Net (``model.deep_supervision``): auxiliary 1×1 heads on the decoder levels, read
through forward hooks, and the loss over all resolutions, for training only.

Source: nnU-Net (F. Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 203–211, 2021): every decoder resolution gets a 1×1 convolution to the output
channels; its logits are compared with the target downsampled to that resolution, and the losses are summed with
weights halving per level, normalised to sum to 1:

.. math::

    \\mathcal{L} = \\sum_{k=0}^{K} \\frac{2^{-k}}{\\sum_{j=0}^{K} 2^{-j}}\\, \\ell\\left(x_k, \\downarrow_k y\\right)

with ``k = 0`` the network's own output at full resolution and ``k = 1 .. K`` the decoder levels below it, from
finer to coarser (``K`` = the U-Net's ``num_levels - 2``).

The network itself is left alone: the heads live outside it (the LightningModule holds them), and the decoder
levels' outputs are caught by forward hooks that exist only during a training forward pass. Prediction,
validation, export and the network's state dict are therefore exactly those of a network trained without deep
supervision (validation losses are those of the full-resolution output only). Imports neither Lightning nor h5py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DeepSupervision", "decoder_levels", "downsample_target", "level_weights"]


def decoder_levels(net: nn.Module) -> list[nn.Module]:
    """The decoder levels of ``net`` (its ``decoders``, coarsest first), whose outputs the heads read."""
    decoders = getattr(net, "decoders", None)
    if decoders is None or len(decoders) == 0:
        raise ValueError(f"{type(net).__name__} has no decoder levels (a 'decoders' list) to supervise")
    return list(decoders)


def _out_channels(module: nn.Module) -> int:
    """The output channels of ``module``: those of its last convolution."""
    convolutions = [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))]
    if not convolutions:
        raise ValueError(f"{type(module).__name__} has no convolution to read its output channels from")
    return convolutions[-1].out_channels


def level_weights(levels: int) -> list[float]:
    """``levels`` loss weights ``2^-k / Σ_j 2^-j``, ``k = 0 .. levels - 1`` (full resolution first); they sum to 1."""
    raw = [2.0**-k for k in range(levels)]
    total = sum(raw)
    return [w / total for w in raw]


def _nearest_indices(size_in: int, size_out: int, device: torch.device) -> Tensor:
    # F.interpolate(mode="nearest")'s rule, floor(i * in / out), computed on integers (no float round trip of ids).
    return (torch.arange(size_out, device=device) * size_in) // size_out


def downsample_target(target: Tensor, size: tuple[int, ...], binary: bool, ignore_index: int | None = None) -> Tensor:
    """``target`` brought to the spatial ``size`` of a coarser output.

    Class ids ``(B, D, H, W)`` (``binary=False``) and per-voxel weights take the nearest voxel (``F.interpolate``'s
    nearest rule, computed on indices, so ids keep their exact values and ``ignore_index`` stays ignored). Binary
    masks ``(B, C, D, H, W)`` are max-pooled over each coarse voxel's window (``adaptive_max_pool``: a coarse voxel
    is foreground when any fine voxel is, as nnU-Net does for region targets); a coarse voxel whose window holds
    ``ignore_index`` is ``ignore_index``.
    """
    spatial = tuple(target.shape[-len(size):])
    if spatial == tuple(size):
        return target
    if not binary:
        out = target
        for axis, (n_in, n_out) in enumerate(zip(spatial, size)):
            dim = target.dim() - len(size) + axis
            out = out.index_select(dim, _nearest_indices(n_in, n_out, target.device))
        return out
    pool = F.adaptive_max_pool3d if len(size) == 3 else F.adaptive_max_pool2d
    values = target.float()
    if ignore_index is None:
        return pool(values, size)
    ignored = values == ignore_index
    pooled = pool(torch.where(ignored, torch.zeros_like(values), values), size)
    return torch.where(pool(ignored.float(), size) > 0, torch.full_like(pooled, float(ignore_index)), pooled)


class DeepSupervision(nn.Module):
    """The auxiliary heads of ``net``'s decoder levels but the last (whose output the network's own final 1×1
    convolution turns into the logits), and the hooks that catch those levels' outputs.

    Args:
        net: the U-Net (any network with a ``decoders`` list of levels, coarsest first).
        out_channels: the logits' channels (the network's ``out_channels``).
        spatial_dims: 3, or 2 for a network applied slice by slice. Default 3.
    """

    def __init__(self, net: nn.Module, out_channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        levels = decoder_levels(net)[:-1]
        if not levels:
            raise ValueError(
                "deep supervision needs a U-Net of at least 3 levels (a decoder level below the full resolution)"
            )
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        # heads[k - 1] reads the level k steps below full resolution: finer first, as the loss weights are ordered.
        self.heads = nn.ModuleList(conv(_out_channels(level), out_channels, kernel_size=1) for level in levels[::-1])
        self.weights = level_weights(len(self.heads) + 1)

    @contextlib.contextmanager
    def capture(self, net: nn.Module) -> Iterator[list[Tensor]]:
        """Within the block, every forward of ``net`` appends the outputs of the supervised decoder levels (finer
        first) to the yielded list; the hooks are removed on leaving it."""
        features: list[Tensor] = []
        levels = decoder_levels(net)[:-1][::-1]
        caught: dict[int, Tensor] = {}

        def hook(index: int) -> Callable:
            def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
                caught[index] = output
                if len(caught) == len(levels):
                    features.extend(caught[i] for i in range(len(levels)))
                    caught.clear()
            return keep

        handles = [level.register_forward_hook(hook(i)) for i, level in enumerate(levels)]
        try:
            yield features
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """The heads' logits for the decoder outputs ``features`` (finer first)."""
        return [head(f) for head, f in zip(self.heads, features)]
