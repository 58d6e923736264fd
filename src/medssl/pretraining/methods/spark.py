"""SparK (Tian et al., ICLR 2023): masked image modelling for convolutional networks.

An image is cut into patches on the grid of the encoder's final feature map
(input / 32); a random ``mask_ratio`` of them per image is hidden. The
encoder sees only the visible patches, emulated as sparse convolution
(:mod:`medssl.pretraining.methods.sparse`). Its four stage outputs are *densified*: a
sparse BatchNorm, a learned mask token at every hidden position and a
projection to the decoder's width at that scale; a light UNet decoder adds
them in as skips and reconstructs the image, scored only on the hidden patches
against per-patch normalised pixels.

The encoder is a ResNet or a timm ConvNeXt (the two families of the official
code; a transformer has no sparse-convolution form and is refused). For a
ConvNeXt the densify norm is a LayerNorm over channels, as there.

Defaults follow the official code for ResNets: ratio 0.6, decoder width 768
halving per scale, densify norm = sparse BatchNorm, a 1x1 projection at the
coarsest scale (identity when the widths already match) and 3x3 elsewhere.
Its optimiser recipe (:attr:`SparK.optim_recipe`) is the official one:
LAMB (betas 0.9/0.95), base lr 2e-4 x batch/256, 40 warm-up epochs, cosine
to 0.001 of the peak, weight decay rising from 0.04 to 0.2 by a cosine,
gradient clipping at 5. As there, the mask tokens join the biases and
normalisation parameters without weight decay (:meth:`SparK.no_decay_parameters`),
so LAMB gives them a plain Adam step. A backbone that starts from random
weights gets the official backbone recipe (:attr:`SparK.backbone_recipe`):
the last BatchNorm of every residual block zero-initialised and stochastic
depth 0.05.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from medssl.core.registry import look_up
from medssl.models import timm_backbones
from medssl.models.backbones import BACKBONES, input_channels
from medssl.pretraining import optimizers
from medssl.pretraining.methods.base import Method, register
from medssl.pretraining.methods.loss_helpers import wide
from medssl.pretraining.methods.sparse import (
    SPARSE_IMPLS,
    MaskState,
    SparseBatchNorm2d,
    sparsify,
)

DOWNSAMPLE = 32
"""Total stride of a torchvision ResNet or a ConvNeXt: the mask grid is the input / 32."""

SPARSE_FAMILIES = ("convnext",)
"""timm families SparK can pre-train, besides every torchvision ResNet."""


def spark_backbones() -> list[str]:
    """Names of the backbones SparK can pre-train (ResNets and ConvNeXts)."""
    timm_names = [
        name
        for name, spec in timm_backbones.TIMM_BACKBONES.items()
        if spec.family in SPARSE_FAMILIES
    ]
    return sorted([*BACKBONES, *timm_names])


def check_sparse_backbone(backbone: nn.Module) -> None:
    """Refuse a backbone without a sparse-convolution form (any transformer), naming the others."""
    family = timm_backbones.family_of(backbone)
    if family is None or family in SPARSE_FAMILIES:
        return
    raise ValueError(
        f"SparK needs a convolutional backbone; a {type(backbone).__name__} ({family}) has no "
        f"sparse form. Supported: {', '.join(spark_backbones())}"
    )


SPARK_AUGMENT: dict[str, Any] = {
    "crop_scale": [0.67, 1.0],
    "flip": True,
    "rotate_degrees": 0.0,
    "intensity_jitter": 0.0,
    "gamma": 0.0,
    "blur_probability": 0.0,
    "noise_std": 0.0,
}
"""SparK's augmentation: random resized crop of 67-100 % area and a flip, nothing else.

Masked modelling needs no invariance to photometric changes; reconstructing
pixels that noise or blur have altered would only teach the noise."""


def stage_widths(backbone: nn.Module) -> list[int]:
    """Output channels of the four stages (a ResNet's read from their last BatchNorm)."""
    if timm_backbones.family_of(backbone) is not None:
        return timm_backbones.feature_channels(backbone)
    widths = []
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
        widths.append(int(norms[-1].num_features))
    return widths


def stage_features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the four stages (strides 4, 8, 16, 32), finest first."""
    if timm_backbones.family_of(backbone) is not None:
        return timm_backbones.feature_maps(backbone, x)
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    features = []
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        x = stage(x)
        features.append(x)
    return features


def random_mask(
    n: int, grid_h: int, grid_w: int, ratio: float, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``(n, 1, grid_h, grid_w)``, True = visible, drawn independently per image.

    The number hidden is ``round(cells * ratio)`` clamped to [1, cells - 1]:
    with nothing hidden there is no loss, with nothing visible the sparse
    BatchNorm has no statistics. Uses torch's global generator, whose state
    the trainer checkpoints, so resumed runs draw the same masks.
    """
    cells = grid_h * grid_w
    if cells < 2:
        raise ValueError(
            f"a {grid_h}x{grid_w} mask grid cannot hide and show patches; use inputs >= 64"
        )
    hidden = min(max(round(cells * ratio), 1), cells - 1)
    order = torch.rand(n, cells).argsort(dim=1)
    active = torch.ones(n, cells, dtype=torch.bool)
    active.scatter_(1, order[:, :hidden], False)
    return active.view(n, 1, grid_h, grid_w).to(device)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, C, H, W)`` to ``(N, L, patch*patch*C)``, L patches in row-major grid order."""
    n, c, h, w = images.shape
    grid = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), -1)


def masked_patch_loss(
    target: torch.Tensor, reconstruction: torch.Tensor, active: torch.Tensor, patch: int
) -> torch.Tensor:
    """Mean over hidden patches of the per-patch MSE against per-patch normalised pixels.

    Each target patch becomes ``(x - mean) / sqrt(var + 1e-6)`` with its own
    mean and (unbiased, as in the official code) variance, so the loss asks for
    local structure rather than absolute intensity. Visible patches do not count.
    """
    target_patches = patchify(target, patch)
    mean = target_patches.mean(dim=-1, keepdim=True)
    var = target_patches.var(dim=-1, keepdim=True)
    normalised = (target_patches - mean) / torch.sqrt(var + 1e-6)
    per_patch = (patchify(reconstruction, patch) - normalised).pow(2).mean(dim=-1)
    hidden = (~active).flatten(1).to(per_patch.dtype)
    return (per_patch * hidden).sum() / hidden.sum()


class UpBlock(nn.Sequential):
    """2x upsampling by transposed convolution, then two 3x3 conv-BN layers (ReLU6 between)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(cin, cin, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )


class LightDecoder(nn.Module):
    """Five :class:`UpBlock` s from stride 32 to 1, width halving each, and a 1x1 output conv.

    The densified stage features (coarsest first) are added before the first
    four blocks, UNet-style; the output has ``out_channels`` (the input's).
    """

    def __init__(self, width: int, out_channels: int, levels: int = 5) -> None:
        super().__init__()
        widths = [width // 2**i for i in range(levels + 1)]
        if widths[-1] < 1:
            raise ValueError(f"decoder width {width} is too small for {levels} halvings")
        self.blocks = nn.ModuleList(
            UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Conv2d(widths[-1], out_channels, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode from the coarsest skip; ``skips`` are coarsest first."""
        x = skips[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(skips):
                x = x + skips[i]
            x = block(x)
        return self.head(x)


@register("spark")
class SparK(Method):
    """Sparse masked encoder, per-scale densify layers and a light UNet decoder.

    Settings: ``mask_ratio`` (fraction of grid cells hidden per image),
    ``decoder_width`` (decoder channels at stride 32, halved per scale; 768
    is the official width, 128 makes the small CPU backbone's steps several
    times faster), ``sparse_impl`` (how the sparse BatchNorm finds the visible
    positions, :data:`~medssl.pretraining.methods.sparse.SPARSE_IMPLS`: equal
    values, ``dense_masked`` never synchronises with a GPU) and ``augment``
    (keys overriding :data:`SPARK_AUGMENT`).
    """

    views_per_sample: ClassVar[int] = 1
    default_settings: ClassVar[dict[str, Any]] = {
        "mask_ratio": 0.6,
        "decoder_width": 768,
        "sparse_impl": "dense_masked",
        "augment": {},
    }
    # keyu-tian/SparK pretrain/utils/arg_util.py and lr_control.py.
    optim_recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lamb",
        "lr": 2e-4,
        "lr_scaling": "linear",
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "warmup_epochs": 40,
        "final_lr_fraction": 0.001,
        "grad_clip": 5.0,
    }
    # keyu-tian/SparK pretrain/models/__init__.py: timm ResNets, whose blocks
    # zero-initialise their last BatchNorm, with drop_path_rate 0.05 for
    # ResNet-50, spread over the blocks by timm's linear rule.
    backbone_recipe: ClassVar[dict[str, Any]] = {
        "zero_init_residual": True,
        "drop_path": 0.05,
    }
    """Backbone options (:func:`medssl.models.backbones.resolve_backbone_options`)
    for a backbone built from random weights; an imported one keeps its own."""

    def __init__(self, backbone: ResNet, settings: Mapping[str, Any] | None = None) -> None:
        check_sparse_backbone(backbone)
        super().__init__(backbone, settings)
        ratio = float(self.settings["mask_ratio"])
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"spark.mask_ratio must be in (0, 1), got {ratio}")
        impl = str(self.settings["sparse_impl"])
        look_up("spark.sparse_impl", impl, SPARSE_IMPLS)
        self.mask_state = MaskState(impl=impl)
        self._hooks = sparsify(self.backbone, self.mask_state)
        width = int(self.settings["decoder_width"])
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        # Coarsest scale first, as the decoder consumes them.
        for level, channels in enumerate(reversed(stage_widths(self.backbone))):
            token = nn.Parameter(torch.zeros(1, channels, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(self._densify_norm(channels))
            decoder_channels = width // 2**level
            if level == 0 and channels == decoder_channels:
                self.densify_projs.append(nn.Identity())
            else:
                kernel = 1 if level == 0 else 3
                self.densify_projs.append(
                    nn.Conv2d(channels, decoder_channels, kernel, padding=kernel // 2)
                )
        self.decoder = LightDecoder(width, input_channels(self.backbone))

    def _densify_norm(self, channels: int) -> nn.Module:
        """Sparse BatchNorm for a ResNet; for a ConvNeXt a channel LayerNorm, as officially.

        A LayerNorm acts on each position alone, so it needs no sparse form:
        the masked positions it fills are replaced by mask tokens next.
        """
        if timm_backbones.family_of(self.backbone) == "convnext":
            from timm.layers import LayerNorm2d

            return LayerNorm2d(channels)
        return SparseBatchNorm2d(channels, self.mask_state)

    def augment_overrides(self) -> dict[str, Any]:
        """SparK's crop-and-flip recipe, with ``spark.augment`` keys on top."""
        return {**SPARK_AUGMENT, **dict(self.settings["augment"])}

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """The mask tokens, exempt from weight decay by name in the official code.

        With decay and LAMB's trust ratio a token's step is scaled by its own
        tiny norm (initialised within +-0.02), so it would barely move.
        """
        return list(self.mask_tokens)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The usual weight and bias/norm groups with :meth:`no_decay_parameters` exempt."""
        return optimizers.exempt_from_decay(super().optimizer_groups(), self.no_decay_parameters())

    def densify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Coarsest-first decoder inputs: sparse BN, mask tokens at hidden positions, projection.

        Runs inside the forward pass's mask context.
        """
        dense = []
        for level, feature in enumerate(reversed(features)):
            normed = self.densify_norms[level](feature)
            visible = self.mask_state.at(feature.shape[-2], feature.shape[-1])
            filled = torch.where(visible, normed, self.mask_tokens[level].to(normed.dtype))
            dense.append(self.densify_projs[level](filled))
        return dense

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruction loss on the hidden patches of one view per image."""
        if len(views) != 1:
            raise ValueError(f"SparK takes 1 view per sample, got {len(views)}")
        images = views[0]
        n, _, height, width = images.shape
        if height % DOWNSAMPLE or width % DOWNSAMPLE:
            raise ValueError(
                f"SparK needs input sides divisible by {DOWNSAMPLE}, got {height}x{width}"
            )
        active = random_mask(
            n,
            height // DOWNSAMPLE,
            width // DOWNSAMPLE,
            float(self.settings["mask_ratio"]),
            images.device,
        )
        # One mask context for encoder and densify layers, so each resolution's
        # mask is built once per step.
        with self.mask_state.masking(active):
            visible_pixels = self.mask_state.at(height, width)
            features = stage_features(self.backbone, images * visible_pixels)
            dense = self.densify(features)
        reconstruction = self.decoder(dense)
        return masked_patch_loss(images, wide(reconstruction), active, DOWNSAMPLE)
