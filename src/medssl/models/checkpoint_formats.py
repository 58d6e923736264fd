"""How each publisher released its checkpoint: one declarative table.

Every entry says where the backbone's state dict sits inside the file
(``containers``), which key prefix marks the backbone (``prefix``: only keys
carrying it are kept, with it stripped), which leftover keys are heads to
drop (``drop``), which keys need renaming (``renames``), which layouts are
refused (``refuse``), which architectures the publisher released and how
the publisher's network padded (``padding``, see :mod:`medssl.models.padding`).
:func:`map_state_dict` applies an entry; nothing about a format lives outside
this table (one format, DINOv2, also needs a whole-dict step, named by
``convert``), so adding a format is one new row.

ResNet formats map to torchvision's keys. The formats of modern encoders
(ConvNeXt, ViT, DeiT, Swin, DINOv2, BiomedCLIP, SAM) map to the keys of the
timm model the backbone names (``timm.create_model(name, num_classes=0)``).

The classifier (torchvision's ``fc.*``, timm's ``head.weight``/``head.bias``,
``head.fc.*`` and ``head_dist.*``) is never imported: an encoder file has
none, and publishers' heads differ in shape (MoCo's 128-d MLP, iNat's 10,000
classes).

Facts each row relies on are written beside it; they come from the
publishers' own loading code (linear-evaluation scripts, converters). The
module imports torch only when mapping, so the config check can read the
table while the Snakefile is parsed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medssl.core.registry import Registry

if TYPE_CHECKING:
    import torch

CLASSIFIER = re.compile(r"^(fc|head\.fc|head_dist)\.|^head\.(weight|bias)$")
"""The classifiers of torchvision and timm; dropped from every import.

timm's ConvNeXt keeps its final norm in the head (``head.norm.*``): that is
backbone, and kept."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How to find torchvision ResNet keys inside one publisher's checkpoint file."""

    description: str
    architectures: tuple[str, ...] = ("resnet50",)
    containers: tuple[str, ...] = ()
    """Keys tried in order; the first present holds the state dict. None present: the
    file itself is the state dict (a container-less file is accepted for every format)."""
    prefix: str = ""
    """When set, only keys starting with it are the backbone (others are ignored)."""
    optional_prefix: str = ""
    """Stripped where present (a ``DataParallel`` save), kept otherwise."""
    drop: tuple[str, ...] = ()
    """Regular expressions of mapped keys that are heads, not backbone."""
    renames: tuple[tuple[str, str], ...] = field(default=())
    """``(pattern, replacement)`` regex substitutions applied after stripping."""
    inner_prefix: str = ""
    """Stripped where present after ``optional_prefix`` (DINO's ``backbone.``)."""
    refuse: tuple[tuple[str, str], ...] = ()
    """``(pattern, reason)``: a mapped key matching ``pattern`` stops the import with ``reason``."""
    convert: str = ""
    """A whole-dict step of :data:`CONVERSIONS` run last, for what renames cannot say."""
    padding: str = "torch"
    """How the publisher's own network padded (a :data:`medssl.models.padding.PADDINGS` name)."""

    def releases(self, backbone: str) -> bool:
        """Whether ``backbone`` is one of ``architectures`` (shell-style patterns)."""
        return any(fnmatch.fnmatchcase(backbone, p) for p in self.architectures)


FORMATS: Registry[CheckpointFormat] = Registry(
    "checkpoint format",
    {
        # torchvision's model zoo: a plain state dict with torchvision's key names.
        "torchvision": CheckpointFormat(
            "torchvision ResNet state dict (e.g. resnet50-0676ba61.pth)",
            architectures=("resnet18", "resnet50"),
        ),
        # timm's ResNet uses torchvision's module names (conv1, bn1, layer1-4, fc);
        # its ConvNeXt, ViT, DeiT and Swin keys are the timm model's own. Hub
        # weights are plain state dicts with the classifier; timm's train.py
        # saves {'state_dict', 'state_dict_ema', 'optimizer', 'arch', ...}
        # ('module.' after DDP; 'state_dict' is read, the EMA copy only when it
        # is alone), and other trainers wrap it as 'model'.
        "timm": CheckpointFormat(
            "timm state dict or training checkpoint (ResNet, ConvNeXt, ViT, DeiT, Swin)",
            architectures=("resnet18", "resnet50", "convnext_*", "vit_*", "deit_*", "swin_*"),
            containers=("state_dict", "model", "state_dict_ema"),
            optional_prefix="module.",
        ),
        # facebookresearch/moco main_moco.py saves {'epoch', 'arch', 'state_dict',
        # 'optimizer'}; the query encoder is 'module.encoder_q.*' (its fc is the
        # 128-d head: Linear in v1, an MLP fc.0/fc.2 in v2); 'module.encoder_k.*',
        # 'module.queue' and 'module.queue_ptr' are ignored. Its main_lincls.py
        # keeps exactly the encoder_q keys, as here.
        "moco_v1": CheckpointFormat(
            "MoCo v1 (facebookresearch/moco moco_v1_200ep_pretrain.pth.tar)",
            containers=("state_dict",),
            prefix="module.encoder_q.",
        ),
        "moco_v2": CheckpointFormat(
            "MoCo v2 (facebookresearch/moco moco_v2_800ep_pretrain.pth.tar)",
            containers=("state_dict",),
            prefix="module.encoder_q.",
        ),
        # salesforce/PCL is built on the MoCo code base and saves the same layout.
        "pcl_v1": CheckpointFormat(
            "PCL v1 (salesforce/PCL)",
            containers=("state_dict",),
            prefix="module.encoder_q.",
        ),
        "pcl_v2": CheckpointFormat(
            "PCL v2 (salesforce/PCL)",
            containers=("state_dict",),
            prefix="module.encoder_q.",
        ),
        # facebookresearch/swav releases (also DeepCluster-v2 and SeLa-v2 from the
        # same repository) are a bare state dict with 'module.' on every key plus
        # 'module.projection_head.*' and 'module.prototypes.weight'; its
        # eval_linear.py also accepts a {'state_dict': ...} training checkpoint.
        "swav": CheckpointFormat(
            "SwAV (facebookresearch/swav swav_800ep_pretrain.pth.tar)",
            containers=("state_dict",),
            optional_prefix="module.",
            drop=(r"^projection_head\.", r"^prototypes\."),
        ),
        "deepcluster_v2": CheckpointFormat(
            "DeepCluster-v2 (facebookresearch/swav deepclusterv2_800ep_pretrain.pth.tar)",
            containers=("state_dict",),
            optional_prefix="module.",
            drop=(r"^projection_head\.", r"^prototypes\d*\."),
        ),
        "sela_v2": CheckpointFormat(
            "SeLa-v2 (facebookresearch/swav selav2_400ep_pretrain.pth.tar)",
            containers=("state_dict",),
            optional_prefix="module.",
            drop=(r"^projection_head\.", r"^prototypes\d*\."),
        ),
        # facebookresearch/barlowtwins resnet50.pth: the torchvision backbone alone
        # (torch.hub loads it with strict=False; only fc.* is missing).
        "barlow_twins": CheckpointFormat(
            "Barlow Twins (facebookresearch/barlowtwins resnet50.pth)"
        ),
        # BYOL's official weights are JAX/Haiku pickles; the usual PyTorch
        # conversions (ajtejankar/byol-convert) write a torchvision ResNet-50
        # state dict, bare or under 'state_dict'. Haiku pads every convolution
        # and the max-pool 'SAME', and the converter's ResNet does the same, so
        # the network is rebuilt with that padding.
        "byol": CheckpointFormat(
            "BYOL converted to a torchvision ResNet-50 state dict",
            containers=("state_dict",),
            optional_prefix="module.",
            padding="tf_same",
        ),
        # SimCLR's official weights are TensorFlow checkpoints; the usual v1
        # converter (tonylins/simclr-converter) builds a torchvision-layout
        # ResNet-50 and saves {'state_dict': model.state_dict()} including the
        # supervised head as fc. SimCLR's TensorFlow ResNet (v1 and v2) pads its
        # strided convolutions symmetrically (fixed_padding) but its max-pool
        # 'SAME', so the network is rebuilt with that padding.
        "simclr_v1": CheckpointFormat(
            "SimCLR v1 converted to torchvision layout ({'state_dict': ...})",
            containers=("state_dict",),
            padding="tf_fixed",
        ),
        # Separius/SimCLRv2-Pytorch convert.py saves {'resnet': ..., 'head': ...}:
        # 'net.0' is the stem (conv 'net.0.0', BatchNorm 'net.0.1.0'), 'net.1'-'net.4'
        # the stages, each 'net.<s>.blocks.<b>' a bottleneck whose 'net' Sequential
        # holds conv/BN pairs at 0/1.0, 2/3.0, 4/5.0 and whose first block has a
        # 'projection' (conv 'shortcut', BatchNorm 'bn.0'); 'fc' is the supervised
        # head. Selective-kernel networks (*_sk1) have a three-conv stem, split
        # convolutions and average-pooled shortcuts: no torchvision equivalent.
        # A torchvision-named {'state_dict': ...} conversion is read as for v1.
        "simclr_v2": CheckpointFormat(
            "SimCLR v2 r50_1x_sk0 (Separius/SimCLRv2-Pytorch {'resnet': ...} or "
            "torchvision layout {'state_dict': ...})",
            containers=("resnet", "state_dict"),
            renames=(
                (r"^net\.0\.0\.", "conv1."),
                (r"^net\.0\.1\.0\.", "bn1."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.0\.", r"layer\1.\2.conv1."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.1\.0\.", r"layer\1.\2.bn1."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.", r"layer\1.\2.conv2."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.3\.0\.", r"layer\1.\2.bn2."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.4\.", r"layer\1.\2.conv3."),
                (r"^net\.([1-4])\.blocks\.(\d+)\.net\.5\.0\.", r"layer\1.\2.bn3."),
                (
                    r"^net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.",
                    r"layer\1.\2.downsample.0.",
                ),
                (
                    r"^net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.",
                    r"layer\1.\2.downsample.1.",
                ),
            ),
            refuse=(
                (
                    r"(main_conv|mixing_conv|projection\.shortcut\.2)\.|^net\.0\.[2-6]\.",
                    "a selective-kernel SimCLR v2 network (*_sk1): its split convolutions, "
                    "three-convolution stem and pooled shortcuts have no torchvision ResNet "
                    "equivalent; use an *_sk0 release",
                ),
            ),
            padding="tf_fixed",
        ),
        # HobbitLong/PyContrast (which released InsDis, PIRL and InfoMin ResNet-50s)
        # saves {'model': ..., 'model_ema': ..., ...}; 'model' holds the
        # DataParallel network whose backbone is 'module.encoder.*' in torchvision
        # naming, next to 'module.head.*' (and 'module.head_jig.*' for PIRL).
        # Its detection converter reads the same prefix.
        "insdis": CheckpointFormat(
            "InsDis (HobbitLong/PyContrast)",
            containers=("model",),
            prefix="module.encoder.",
        ),
        "pirl": CheckpointFormat(
            "PIRL (HobbitLong/PyContrast)",
            containers=("model",),
            prefix="module.encoder.",
        ),
        "infomin": CheckpointFormat(
            "InfoMin (HobbitLong/PyContrast InfoMin_800.pth)",
            containers=("model",),
            prefix="module.encoder.",
        ),
        # facebookresearch/dino dino_resnet50_pretrain.pth: the teacher backbone
        # as a torchvision state dict without fc (DINO replaces it by Identity);
        # its ViT backbones (dino_deitsmall16_pretrain.pth, ...) use timm's ViT
        # key names. A full training checkpoint (main_dino.py) holds
        # {'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'}; the
        # teacher is 'backbone.*' plus the DINO head 'head.*', with 'module.' in
        # front when DDP-wrapped (ResNets, whose BatchNorms are synchronised).
        # DINO's own eval code reads 'teacher' and strips both prefixes.
        "dino": CheckpointFormat(
            "DINO backbone (dino_resnet50_pretrain.pth, dino_deitsmall16_pretrain.pth) "
            "or training checkpoint (its teacher)",
            architectures=(
                "resnet50",
                "vit_small_patch16_224",
                "vit_small_patch8_224",
                "vit_base_patch16_224",
                "vit_base_patch8_224",
            ),
            containers=("teacher",),
            optional_prefix="module.",
            inner_prefix="backbone.",
            drop=(r"^head\.",),
        ),
        # visipedia/newt iNat2021 supervised ResNet-50s: {'state_dict': ...} in
        # torchvision naming with a 10,000-class fc; the from-scratch variants
        # carry 'module.' (newt's pt_resnet_feature_extractor.py strips it).
        "inat2021": CheckpointFormat(
            "iNat2021 supervised ResNet-50 (visipedia/newt)",
            containers=("state_dict",),
            optional_prefix="module.",
        ),
        # keyu-tian/SparK resnet50_1kpretrained_timm_style.pth: a bare state dict
        # for timm's resnet50 (= torchvision names), loaded with strict=False in
        # SparK's downstream code; no fc.
        "spark": CheckpointFormat(
            "SparK (keyu-tian/SparK resnet50_1kpretrained_timm_style.pth)",
            architectures=("resnet18", "resnet50"),
        ),
        # RadImageNet's PyTorch ResNet-50 (BMEII-AI/RadImageNet): a torchvision
        # resnet50 cut before fc as nn.Sequential(*children()[:-1]), saved either
        # as that Sequential ('0.weight' = conv1, '1.*' = bn1, '4'-'7' = layer1-4)
        # or inside a module holding it as 'backbone' ('backbone.0.weight', ...);
        # conversions in torchvision names read as they are.
        "radimagenet": CheckpointFormat(
            "RadImageNet PyTorch ResNet-50 (nn.Sequential of torchvision children, "
            "'backbone.<i>.*' or '<i>.*')",
            containers=("state_dict", "model"),
            optional_prefix="module.",
            inner_prefix="backbone.",
            renames=(
                (r"^0\.", "conv1."),
                (r"^1\.", "bn1."),
                (r"^4\.", "layer1."),
                (r"^5\.", "layer2."),
                (r"^6\.", "layer3."),
                (r"^7\.", "layer4."),
            ),
        ),
        # facebookresearch/dinov2 hub files (dinov2_vits14_pretrain.pth,
        # dinov2_vits14_reg4_pretrain.pth, ...): a bare state dict of its
        # DinoVisionTransformer: cls_token, pos_embed for 518 px (37 x 37 + 1),
        # mask_token (masked modelling only, dropped), register_tokens in the
        # _reg4_ files, patch_embed.proj, blocks.N.{norm1,attn,ls1.gamma,norm2,
        # mlp,ls2.gamma} (mlp.w12/w3 in the SwiGLU giant), norm. timm's names are
        # the same but for reg_token and fc1/fc2; its register models add no
        # position to the cls or register tokens (see CONVERSIONS).
        "dinov2": CheckpointFormat(
            "DINOv2 hub backbone (dinov2_vit*14[_reg4]_pretrain.pth)",
            architectures=("vit_*_patch14_dinov2", "vit_*_patch14_reg4_dinov2"),
            drop=(r"^mask_token$",),
            renames=(
                (r"^register_tokens$", "reg_token"),
                (r"(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1."),
                (r"(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2."),
            ),
            convert="dinov2",
        ),
        # microsoft BiomedCLIP open_clip_pytorch_model.bin: an open_clip CLIP whose
        # vision tower is a TimmModel, 'visual.trunk.*' a timm vit_base_patch16_224
        # without classifier, 'visual.head.proj.*' the projection to the joint
        # space; 'text.*' (PubMedBERT) and 'logit_scale' are ignored.
        "biomedclip": CheckpointFormat(
            "BiomedCLIP vision trunk (open_clip_pytorch_model.bin)",
            architectures=("vit_base_patch16_224",),
            containers=("state_dict",),
            prefix="visual.trunk.",
        ),
        # facebookresearch/segment-anything sam_vit_b_01ec64.pth and MedSAM's
        # medsam_vit_b.pth: the whole SAM, the image encoder under
        # 'image_encoder.*' (patch_embed.proj, pos_embed NHWC for 1024 px,
        # blocks.N.attn.{qkv,proj,rel_pos_h,rel_pos_w}, mlp.lin1/lin2, neck.0-3);
        # prompt_encoder.* and mask_decoder.* are ignored. timm's samvit names
        # the MLP fc1/fc2 and keeps the rest. MedSAM training checkpoints keep
        # the same dict under 'model'.
        "sam": CheckpointFormat(
            "SAM / MedSAM image encoder (sam_vit_b_01ec64.pth, medsam_vit_b.pth)",
            architectures=("samvit_base_patch16", "samvit_large_patch16", "samvit_huge_patch16"),
            containers=("model", "state_dict"),
            prefix="image_encoder.",
            renames=((r"\.mlp\.lin([12])\.", r".mlp.fc\1."),),
        ),
    },
)
"""The formats by name (``inits.<name>.format`` in the config); torch-free to read."""


class CheckpointFormatError(ValueError):
    """A checkpoint does not have the layout its format promises."""


def format_names() -> list[str]:
    """Every registered format (the schema's enum is kept equal by a test)."""
    return FORMATS.names()


@dataclass
class Mapped:
    """The backbone state dict extracted from a checkpoint, and what was left out."""

    state: dict[str, torch.Tensor]
    container: str | None
    ignored: list[str]
    dropped: list[str]


def _dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 with registers to timm's ``no_embed_class`` ViT.

    DINOv2 adds ``pos_embed[:, 0]`` to the cls token and inserts the registers
    after the position embedding; timm's register models embed patches only.
    The cls token therefore takes its position in, and the position table
    loses its first row: the same sum reaches the first block. Without
    registers both networks embed the cls token alike and nothing changes.
    """
    if "reg_token" not in state or "pos_embed" not in state or "cls_token" not in state:
        return state
    out = dict(state)
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


CONVERSIONS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "dinov2": _dinov2,
}
"""Whole-dict steps named by a format's ``convert``, run after its renames and drops."""


def _unwrap(raw: object, fmt: CheckpointFormat) -> tuple[Mapping, str | None]:
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(f"holds a {type(raw).__name__}, not a dict of tensors")
    for key in fmt.containers:
        if key in raw and isinstance(raw[key], Mapping):
            return raw[key], key
    return raw, None


def map_state_dict(raw: object, name: str) -> Mapped:
    """Apply format ``name`` to a loaded checkpoint: torchvision keys, no classifier.

    Raises :class:`~medssl.core.registry.UnknownNameError` for a format that
    does not exist and :class:`CheckpointFormatError` when the file's keys
    cannot be of that format (no tensor at all, or no key with the format's prefix).
    """
    import torch

    fmt = FORMATS[name]
    source, container = _unwrap(raw, fmt)
    drops = [re.compile(p) for p in fmt.drop] + [CLASSIFIER]
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    dropped: list[str] = []
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            ignored.append(str(key))
            continue
        new = str(key)
        if fmt.prefix:
            if not new.startswith(fmt.prefix):
                ignored.append(new)
                continue
            new = new[len(fmt.prefix) :]
        for optional in (fmt.optional_prefix, fmt.inner_prefix):
            if optional and new.startswith(optional):
                new = new[len(optional) :]
        for pattern, replacement in fmt.renames:
            new = re.sub(pattern, replacement, new)
        _refuse(fmt, name, str(key))
        if any(p.search(new) for p in drops):
            dropped.append(new)
            continue
        state[new] = value
    if not state:
        where = f" under {fmt.prefix!r}" if fmt.prefix else ""
        expected = f" inside {list(fmt.containers)}" if fmt.containers else ""
        raise CheckpointFormatError(
            f"no backbone tensor found{where}{expected}; is this a {name!r} checkpoint "
            f"({fmt.description})? first keys: {[str(k) for k in list(source)[:5]]}"
        )
    if fmt.convert:
        state = CONVERSIONS[fmt.convert](state)
    return Mapped(state=state, container=container, ignored=ignored, dropped=dropped)


def _refuse(fmt: CheckpointFormat, name: str, key: str) -> None:
    """Stop at a key of a layout the format knows it cannot map (before any renaming)."""
    for pattern, reason in fmt.refuse:
        if re.search(pattern, key):
            raise CheckpointFormatError(f"key {key!r} is {reason} (format {name!r})")
