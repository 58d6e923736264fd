"""How each publisher released its ResNet checkpoint: one declarative table.

Every entry says where the backbone's state dict sits inside the file
(``containers``), which key prefix marks the backbone (``prefix``: only keys
carrying it are kept, with it stripped), which leftover keys are heads to
drop (``drop``), which keys need renaming (``renames``) and which
architectures the publisher released. :func:`map_state_dict` applies an
entry; nothing about a format lives outside this table, so adding a format
is one new row.

The classifier (``fc.*``) is never imported: an encoder file has none, and
publishers' heads differ in shape (MoCo's 128-d MLP, iNat's 10,000 classes).

Facts each row relies on are written beside it; they come from the
publishers' own loading code (linear-evaluation scripts, converters). The
module imports torch only when mapping, so the config check can read the
table while the Snakefile is parsed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medssl.core.registry import Registry

if TYPE_CHECKING:
    import torch

CLASSIFIER = re.compile(r"^fc\.")
"""The torchvision classifier; dropped from every import."""


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


FORMATS: Registry[CheckpointFormat] = Registry(
    "checkpoint format",
    {
        # torchvision's model zoo: a plain state dict with torchvision's key names.
        "torchvision": CheckpointFormat(
            "torchvision ResNet state dict (e.g. resnet50-0676ba61.pth)",
            architectures=("resnet18", "resnet50"),
        ),
        # timm's ResNet uses torchvision's module names (conv1, bn1, layer1-4, fc);
        # hub weights are plain state dicts, timm's own training checkpoints keep
        # them under 'state_dict' (the EMA copy under 'state_dict_ema' is not
        # read: re-save it bare to import it), with 'module.' after DDP.
        "timm": CheckpointFormat(
            "timm ResNet state dict or timm training checkpoint",
            architectures=("resnet18", "resnet50"),
            containers=("state_dict",),
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
        # conversions write a torchvision ResNet-50 state dict, bare or under
        # 'state_dict'.
        "byol": CheckpointFormat(
            "BYOL converted to a torchvision ResNet-50 state dict",
            containers=("state_dict",),
            optional_prefix="module.",
        ),
        # SimCLR's official weights are TensorFlow checkpoints; the usual
        # converter (tonylins/simclr-converter) builds a torchvision-layout
        # ResNet-50 and saves {'state_dict': model.state_dict()} including the
        # supervised head as fc. SimCLR v2 1x (no selective kernels) has the same
        # layout once converted to torchvision key names.
        "simclr_v1": CheckpointFormat(
            "SimCLR v1 converted to torchvision layout ({'state_dict': ...})",
            containers=("state_dict",),
        ),
        "simclr_v2": CheckpointFormat(
            "SimCLR v2 r50_1x_sk0 converted to torchvision layout ({'state_dict': ...})",
            containers=("state_dict",),
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
        # as a torchvision state dict without fc (DINO replaces it by Identity).
        "dino": CheckpointFormat("DINO ResNet-50 backbone (dino_resnet50_pretrain.pth)"),
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
        if fmt.optional_prefix and new.startswith(fmt.optional_prefix):
            new = new[len(fmt.optional_prefix) :]
        for pattern, replacement in fmt.renames:
            new = re.sub(pattern, replacement, new)
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
    return Mapped(state=state, container=container, ignored=ignored, dropped=dropped)
