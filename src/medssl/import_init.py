"""Stage ``import_init``: a published checkpoint to a medssl encoder file.

::

    python -m medssl.import_init --checkpoint moco_v2_800ep_pretrain.pth.tar \\
        --format moco_v2 --backbone resnet50 --stem repeat --in-channels 1 \\
        --out results/init/moco_v2_in/encoder.pt

The checkpoint is read with ``torch.load(weights_only=True)``: tensors and
plain containers only, so a file carrying pickled code is refused before
anything in it runs. Its keys are mapped by the format's row in
medssl.models.checkpoint_formats to torchvision's (ResNets, padded as the
publisher's network was) or the named timm model's, and loaded into it;
every missing and unexpected key is logged, and a missing key other than the
classifier stops the import (a silently random layer would poison every
result downstream). The stem is then adapted to the data's channels by the
chosen policy and the encoder written in the format every pre-training writes
(medssl.models.importing does the work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medssl.cli import stage_main
from medssl.models.backbones import STEM_POLICIES
from medssl.models.checkpoint_formats import format_names
from medssl.models.importing import IMPORT_DEFAULTS, import_checkpoint

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The import's options; defaults come from :data:`IMPORT_DEFAULTS`."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="the publisher's file")
    parser.add_argument(
        "--format", required=True, choices=format_names(), help="the publisher's key layout"
    )
    parser.add_argument(
        "--backbone",
        default=IMPORT_DEFAULTS["backbone"],
        help="architecture of the checkpoint",
    )
    parser.add_argument(
        "--stem",
        default=IMPORT_DEFAULTS["stem"],
        choices=STEM_POLICIES.names(),
        help="RGB stem on CT",
    )
    parser.add_argument(
        "--in-channels",
        type=int,
        default=IMPORT_DEFAULTS["in_channels"],
        help="channels of the data",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size a transformer's position embeddings are resampled to",
    )
    parser.add_argument("--out", required=True, type=Path, help="encoder file to write")


def run(args: argparse.Namespace) -> None:
    """Import the checkpoint and write the encoder (the library logs what it wrote)."""
    import_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        args.backbone,
        args.stem,
        args.in_channels,
        args.img_size,
    )


main = stage_main("import_init", DESCRIPTION, add_arguments, run, raw_help=True)


if __name__ == "__main__":
    sys.exit(main())
