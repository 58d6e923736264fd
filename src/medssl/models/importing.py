"""A published checkpoint as a medssl encoder: read safely, map its keys, adapt the stem.

The checkpoint is read with ``torch.load(weights_only=True)``: tensors and
plain containers only, so a file carrying pickled code is refused before
anything in it runs. Its keys are mapped to torchvision's (ResNets) or to the
named timm model's (ConvNeXt, ViT, DeiT, Swin, DINOv2, SAM) by the format's row
in :mod:`medssl.models.checkpoint_formats` and loaded into that network
(position embeddings resampled to the input size first); every
missing and unexpected key is logged, and a missing key other than the
classifier stops the import (a silently random layer would poison every
result downstream). The stem is then adapted to the data's channels by the
chosen policy (:func:`medssl.models.backbones.adapt_stem`), a ResNet takes the
padding of the publisher's network (:mod:`medssl.models.padding`), and the encoder written by
:func:`medssl.models.backbones.save_encoder`, the same file every pre-training writes.
The stage ``python -m medssl.import_init`` is the command line of :func:`import_checkpoint`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medssl.core import provenance
from medssl.core.registry import UnknownNameError
from medssl.models import backbones as models
from medssl.models.checkpoint_formats import (
    FORMATS,
    CheckpointFormat,
    CheckpointFormatError,
    Mapped,
    map_state_dict,
)
from medssl.models.padding import set_padding

log = logging.getLogger(__name__)

IMPORT_DEFAULTS: dict[str, Any] = {"backbone": "resnet50", "stem": "repeat", "in_channels": 1}
"""What an import assumes when not told: the one place the stage's and the functions'
defaults come from (most publishers released a ResNet-50; CT has one channel)."""

SAFE_GLOBALS: list[Any] = [argparse.Namespace]
"""Non-tensor objects allowed in a checkpoint besides what ``weights_only`` allows.

PyContrast and other research code save their ``argparse`` options next to
the weights; a Namespace only holds attributes and runs no code when unpickled.
"""


class CheckpointImportError(ValueError):
    """The checkpoint cannot become an encoder; the message names the file."""


def read_checkpoint(path: str | Path) -> Any:
    """The checkpoint's content, loaded without executing pickled code.

    Raises :class:`CheckpointImportError` naming the file for a file with pickled code
    (or any object outside tensors, containers and :data:`SAFE_GLOBALS`), and
    for a file that is not a torch checkpoint at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: checkpoint file does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's message spans many lines; the one naming the refused global is the useful one.
        refused = next((ln for ln in lines if "global" in ln.lower()), None)
        if refused is None:
            detail = next((ln for ln in lines if "unpickler error" in ln.lower()), lines[-1:])
            raise CheckpointImportError(
                f"{path}: not a readable torch checkpoint ({detail})"
            ) from None
        raise CheckpointImportError(
            f"{path}: refused: the file holds pickled objects other than tensors and plain "
            "containers, which could run code when loaded; only weights are imported "
            "(torch.load weights_only=True). If you trust the file, re-save its state dict "
            f"with torch.save(state_dict, ...). Detail: {refused}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointImportError(f"{path}: not a readable torch checkpoint ({err})") from None


def _released_format(checkpoint: str | Path, fmt: str, backbone: str) -> CheckpointFormat:
    """The format's row, checked to cover ``backbone`` before the (large) file is read."""
    try:
        spec = FORMATS[fmt]
    except UnknownNameError as err:
        raise UnknownNameError(f"{checkpoint}: {err}") from None
    if not spec.releases(backbone):
        raise CheckpointImportError(
            f"{checkpoint}: format {fmt!r} is released for {list(spec.architectures)}, "
            f"not {backbone!r}"
        )
    return spec


def is_resnet(backbone: str) -> bool:
    """Whether ``backbone`` is one of medssl's torchvision-layout ResNets (else a timm name)."""
    return backbone in models.BACKBONES.names() and backbone.startswith("resnet")


def _empty_timm_backbone(backbone: str, img_size: int | None) -> torch.nn.Module:
    """The timm network ``backbone`` with random weights, no classifier, RGB input.

    A backbone medssl builds comes from :func:`medssl.models.backbones.build_backbone`;
    another timm name that a format releases (DINO's patch-8 ViTs, SAM ViT-L/H)
    is built by timm the same way, so it imports, though no stage trains it.
    ``img_size`` (transformers only) sets the size the position tables are made for.
    """
    if models.is_timm_backbone(backbone):
        return models.build_backbone(backbone, 3, img_size=img_size)
    import timm

    if not timm.is_model(backbone):
        raise UnknownNameError(f"unknown backbone {backbone!r}: neither medssl's nor timm's")
    sized = {"img_size": img_size} if img_size is not None else {}
    return timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=3, **sized)


def _fit_positions(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Position tables resampled to ``model``'s input size where their shapes differ.

    A ViT's ``pos_embed`` (prefix rows kept, the square patch grid
    interpolated bicubically, timm's resampler), SAM's NHWC ``pos_embed``
    (the same, timm's NHWC resampler) and SAM's relative position tables
    ``rel_pos_h``/``rel_pos_w`` of global-attention blocks (linearly along
    the distance axis, as SAM itself interpolates them at run time).
    """
    from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

    expected = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        target = expected.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key == "pos_embed" and value.ndim == 3:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            grid = list(model.patch_embed.grid_size)
            out[key] = resample_abs_pos_embed(value, grid, num_prefix_tokens=prefix)
        elif key == "pos_embed" and value.ndim == 4:
            out[key] = resample_abs_pos_embed_nhwc(value, list(target.shape[1:3]))
        elif key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and value.ndim == 2:
            table = F.interpolate(value.T[None], size=target.shape[0], mode="linear")
            out[key] = table[0].T.contiguous()
    return out


def _empty_backbone(
    checkpoint: str | Path, mapped: Mapped, backbone: str, img_size: int | None = None
) -> torch.nn.Module:
    """A ``backbone`` whose stem takes the checkpoint's channels, every tensor shape checked.

    A ResNet keeps a classifier slot, so that ``fc.*`` reads as missing
    rather than as a surprise in the load report. A timm model has none (its
    classifier is dropped by the format); its position tables are resampled
    to ``img_size`` in ``mapped`` first.
    """
    state = mapped.state
    if is_resnet(backbone):
        rgb_channels = int(state["conv1.weight"].shape[1]) if "conv1.weight" in state else 3
        model = models.build_backbone(backbone, rgb_channels)
        model.fc = torch.nn.Linear(model.feature_dim, 1)
    else:
        model = _empty_timm_backbone(backbone, img_size)
        mapped.state = state = _fit_positions(state, model)
    expected = model.state_dict()
    wrong_shape = [
        f"{key} {tuple(value.shape)} != {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if wrong_shape:
        raise CheckpointImportError(
            f"{checkpoint}: {len(wrong_shape)} tensor(s) do not fit a {backbone}: {wrong_shape[:5]}"
        )
    return model


def _load_reported(
    checkpoint: str | Path, model: torch.nn.Module, mapped: Mapped, fmt: str, backbone: str
) -> dict[str, Any]:
    """Load ``mapped`` into ``model``, log what was left out, refuse anything but a missing head."""
    result = model.load_state_dict(mapped.state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    report = {
        "format": fmt,
        "container": mapped.container,
        "n_tensors": len(mapped.state),
        "ignored": mapped.ignored,
        "dropped": mapped.dropped,
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
    }
    log.info(
        "%s: %d tensors from %s; ignored %d keys, dropped %d head keys; missing %s; unexpected %s",
        checkpoint,
        len(mapped.state),
        f"container {mapped.container!r}" if mapped.container else "the top level",
        len(mapped.ignored),
        len(mapped.dropped),
        result.missing_keys,
        result.unexpected_keys,
    )
    if missing or result.unexpected_keys:
        raise CheckpointImportError(
            f"{checkpoint}: does not fill a {backbone} as format {fmt!r}: "
            f"{len(missing)} missing key(s) besides the classifier {missing[:8]}, "
            f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:8]}"
        )
    return report


def import_encoder(
    checkpoint: str | Path,
    fmt: str,
    backbone: str = IMPORT_DEFAULTS["backbone"],
    stem: str = IMPORT_DEFAULTS["stem"],
    in_channels: int = IMPORT_DEFAULTS["in_channels"],
    img_size: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``checkpoint`` of format ``fmt`` into a ``backbone`` adapted to ``in_channels``.

    A ResNet is padded as the publisher's network was (the format's
    ``padding``); ``img_size`` sizes the position embeddings of a
    transformer. Returns the network and a report (container, ignored,
    dropped, missing and unexpected keys, padding). Raises
    :class:`~medssl.core.registry.UnknownNameError` for an unknown format and
    :class:`CheckpointImportError` when anything but the classifier is
    missing, or a key is unexpected or has the wrong shape.
    """
    spec = _released_format(checkpoint, fmt, backbone)
    raw = read_checkpoint(checkpoint)
    try:
        mapped = map_state_dict(raw, fmt)
    except CheckpointFormatError as err:
        raise CheckpointImportError(f"{checkpoint}: {err}") from None
    model = _empty_backbone(checkpoint, mapped, backbone, img_size)
    report = _load_reported(checkpoint, model, mapped, fmt, backbone)
    models.adapt_stem(model, in_channels, stem)
    if is_resnet(backbone):
        model.fc = torch.nn.Identity()
        set_padding(model, spec.padding)  # last: it hooks the adapted stem
        report["padding"] = spec.padding
    return model, report


def _sha256(path: Path) -> str:
    """The file's digest, recorded so a result names the exact bytes it started from."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    backbone: str = IMPORT_DEFAULTS["backbone"],
    stem: str = IMPORT_DEFAULTS["stem"],
    in_channels: int = IMPORT_DEFAULTS["in_channels"],
    img_size: int | None = None,
) -> dict[str, Any]:
    """Import ``checkpoint`` and write the encoder and its sidecar to ``out``.

    Returns the facts the sidecar adds about the import (source file and its
    digest, load report, provenance), so a caller can log or check them. A
    TensorFlow-padded network's sidecar says ``"padding"`` (written by
    :func:`~medssl.models.backbones.save_encoder`, as a transformer's input size).
    """
    checkpoint = Path(checkpoint)
    if backbone not in models.backbone_names():
        raise CheckpointImportError(
            f"{checkpoint}: {backbone!r} is not a backbone of medssl.models.backbones, so its "
            f"encoder file could not be read back; import_encoder loads it in memory"
        )
    model, report = import_encoder(checkpoint, fmt, backbone, stem, in_channels, img_size)
    settings = {"format": fmt, "backbone": backbone, "stem": stem, "in_channels": in_channels}
    if img_size is not None:
        settings["img_size"] = img_size
    info = {
        "method": f"import:{fmt}",
        "source": {"checkpoint": str(checkpoint), "sha256": _sha256(checkpoint)},
        "import_report": {k: v for k, v in report.items() if k not in ("ignored", "dropped")}
        | {"n_ignored": len(report["ignored"]), "n_dropped": len(report["dropped"])},
        "provenance": provenance.record("import_init", settings),
    }
    models.save_encoder(model, out, backbone, info)
    log.info("wrote %s (%s, stem %s, %d input channel(s))", out, backbone, stem, in_channels)
    return info
