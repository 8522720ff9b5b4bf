"""2D and 3D U-Nets for segmentation (``unet2d``, ``unet3d``): MONAI's ``UNet`` behind medfed's parameter view.

The network is ``monai.networks.nets.UNet`` (Ronneberger et al., 2015, as MONAI builds it: strided
convolutions down, transposed convolutions up, a skip connection per level; ``num_res_units=0``,
ReLU, no dropout) with ``channels`` per level and stride 2 between levels; its math is MONAI's,
unchanged. Only its modules are laid out under the registry's naming convention
(:mod:`medfed.models.registry`) so that FedBN, FedPer, DP and every aggregator run on it:

- ``body.*``: MONAI's down block and nested skip connections (``UNet.model[0:2]``), each
  normalization layer (MONAI's ``ADN.N``) renamed ``norm`` (``is_norm`` holds for them), and each
  level's blocks named by their role instead of MONAI's positions 0/1/2: ``down`` (encoder),
  ``skip`` (the skip connection around the deeper levels; the deepest holds the bottom block) and
  ``up`` (decoder): ``body.down.conv.weight``, ``body.skip.submodule.down.adn.norm.running_var``,
  ``body.skip.submodule.skip.submodule.conv.weight`` (the bottom, 3 levels),
  ``body.skip.submodule.up.conv.weight`` (``is_decoder`` holds for the ``up`` blocks and the head);
- ``head.conv.weight`` (and ``head.conv.bias`` without normalization): MONAI's last layer
  (``UNet.model[2]``), the top-level transposed convolution producing the K per-pixel class
  logits, the decoder's output (``is_head``).

``norm``: ``batch`` (BatchNorm), ``group`` (GroupNorm with ``gcd(4, *channels)`` groups: MONAI
takes one group count for every layer) or ``none``; convolutions carry a bias only without
normalization, as the other torch models. Every spatial axis must be divisible by
``2 ** (len(channels) - 1)`` (the strides), checked with a ConfigError before training.

Loss: Dice + cross-entropy (MONAI's ``DiceCELoss``, softmax over the K logits, one-hot targets,
Dice per image and class with MONAI's default smoothing 1e-5), :func:`dice_ce`. A mask may leave
voxels without a target (:data:`IGNORE`, a semi-supervised pseudo-mask's unconfident voxels): with
``ignore=True`` they weigh nothing in either term (:func:`voxel_weighted_dice_ce`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medfed.models.registry import check_unet_grid

UNETS = {"unet2d": 2, "unet3d": 3}

IGNORE = -1
"""A mask's value for a voxel without a target: no loss, no gradient (``dice_ce(..., ignore=True)``)."""


class SegmentationNetwork(nn.Module):
    """``body -> head``: per-pixel class logits ``(n, K, *spatial)``."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _norm(kind: str, channels: Sequence[int]):
    if kind == "batch":
        return "batch"
    if kind == "group":
        return ("group", {"num_groups": math.gcd(4, *channels)})
    return None


def _rename_norms(module: nn.Module) -> None:
    """MONAI's ADN blocks name their normalization ``N``; the convention's name is ``norm``.
    ADN is an ``nn.Sequential``: renaming the key, in place and in order, keeps its forward."""
    from monai.networks.blocks import ADN

    for m in module.modules():
        if isinstance(m, ADN) and "N" in m._modules:
            m._modules = OrderedDict(("norm" if k == "N" else k, v) for k, v in m._modules.items())


def _name_levels(level: nn.Sequential) -> None:
    """MONAI builds each level as ``Sequential(down, SkipConnection(deeper), up)`` (the top level's
    ``up`` is the head); name the blocks by role so that predicates on names (FedPer's decoder) can
    find them. Renaming the keys in place, in order, keeps the Sequential's forward."""
    from monai.networks.layers import SkipConnection

    level._modules = OrderedDict(zip(("down", "skip", "up"), level._modules.values()))
    inner = level._modules["skip"].submodule
    if isinstance(level._modules["skip"], SkipConnection) and isinstance(inner, nn.Sequential) and len(inner) == 3:
        _name_levels(inner)


def build_unet(arch: str, sample_shape: Sequence[int], options: Mapping, outputs: int) -> SegmentationNetwork:
    """MONAI's UNet for ``arch`` with ``outputs`` classes, laid out as :class:`SegmentationNetwork`."""
    from monai.networks.nets import UNet

    channels = tuple(options["channels"])
    check_unet_grid(arch, sample_shape, channels)
    net = UNet(UNETS[arch], int(sample_shape[0]), outputs, channels, (2,) * (len(channels) - 1), act="relu",
               norm=_norm(options["norm"], channels), bias=options["norm"] == "none")
    _rename_norms(net)
    body = nn.Sequential(net.model[0], net.model[1])
    _name_levels(body)
    return SegmentationNetwork(body, net.model[2])


def dice_ce(z: torch.Tensor, y: torch.Tensor, reduction: str, *, ignore: bool = False) -> torch.Tensor:
    """Dice + cross-entropy of logits ``z`` ``(n, K, *spatial)`` against masks ``y`` ``(n, *spatial)``
    (int64): per image (``"none"``: Dice averaged over the K classes plus cross-entropy averaged
    over the pixels), or their sum or mean. The mean is MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True)`` (a test checks it): every image has the same number of pixels.

    ``ignore``: ``y`` may hold :data:`IGNORE` voxels, which :func:`voxel_weighted_dice_ce` leaves
    out (a flag set by the caller, not read from ``y``: a data-dependent branch would not run under
    vmap, and without it the numbers are the ones above, bit for bit)."""
    from monai.losses import DiceCELoss, DiceLoss

    if ignore:
        per_image = voxel_weighted_dice_ce(z, y.clamp(min=0), (y != IGNORE).to(z.dtype))
        return per_image if reduction == "none" else per_image.sum() if reduction == "sum" else per_image.mean()
    target = _one_hot(z, y)
    if reduction == "mean":
        return DiceCELoss(softmax=True)(z, target)
    dice = DiceLoss(softmax=True, reduction="none")(z, target).flatten(1).mean(dim=1)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none").flatten(1).mean(dim=1)
    per_image = dice + ce
    return per_image if reduction == "none" else per_image.sum()


def _one_hot(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``'s classes one-hot on ``z``'s channel axis, in ``z``'s dtype."""
    # by comparison, not MONAI's in-place scatter_, so that the loss also runs under vmap (the
    # vectorized executor); an exact 0/1 encoding either way
    classes = torch.arange(z.shape[1], device=y.device).view(1, -1, *([1] * (y.dim() - 1)))
    return (y.unsqueeze(1) == classes).to(z.dtype)


def voxel_weighted_dice_ce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each image's Dice + cross-entropy with 0/1 voxel weights ``w`` ``(n, *spatial)``: a masked
    soft Dice (MONAI's, on the softmax and the one-hot target both multiplied by ``w``,
    so a weight-0 voxel is out of the intersection and of both sums, as if cut out of the image)
    plus ``sum(w * CE) / voxels``. A weight-0 voxel's class in ``y`` changes nothing, its gradient
    included (a test checks it).

    Why Dice over the weighted voxels rather than counting the others as background, or CE alone:
    a pseudo-mask's unconfident voxels tend to be the lesion's edge and its small lesions; as
    background they would teach the model its own under-segmentation, and CE alone would train
    pseudo-masked images without the class balance Dice gives the labeled ones. CE is divided by all
    the image's voxels, not the confident ones, so an image few voxels of which are confident
    weighs that much less; an image with none weighs 0 (its Dice terms are 1 - 1e-5/1e-5 = 0)."""
    from monai.losses import DiceLoss

    wc = w.unsqueeze(1)
    dice = DiceLoss(reduction="none")(torch.softmax(z, 1) * wc, _one_hot(z, y) * wc).flatten(1).mean(dim=1)
    ce = (torch.nn.functional.cross_entropy(z, y, reduction="none") * w).flatten(1).mean(dim=1)
    return dice + ce


def mean_dice_ce(z: np.ndarray, y: np.ndarray) -> float:
    """:func:`dice_ce`'s mean in float64 from numpy logits (what the model's ``loss`` reports); with
    :data:`IGNORE` voxels in ``y``, over the others."""
    y = np.asarray(y, dtype=np.int64)
    return float(dice_ce(torch.from_numpy(np.asarray(z, dtype=np.float64)), torch.from_numpy(y), "mean",
                         ignore=bool((y == IGNORE).any())))


def softmax_channels(z: np.ndarray) -> np.ndarray:
    """Per-pixel class probabilities: the softmax over axis 1 of ``(n, K, *spatial)`` logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
