"""Presets for the studies' public datasets in their released layouts.

A config names a preset and the release's root folder; the preset finds the
images, reads the release's own label files and official split, and returns
a :class:`~medssl.datasets.presets.base.Manifest` for the ``convert`` stage
(and masks for the ``masks`` stage). One module per release or family; each
module's docstring says where it is published, what to download and the
tree it expects (also in docs/datasets.md)::

    from medssl.datasets.presets import look_up_preset
    manifest = look_up_preset("chexpert").scan(Path("/data"), uncertainty="u_zeros")
"""

from __future__ import annotations

from medssl.core.registry import Registry
from medssl.datasets.presets.base import Manifest, Preset, PresetError
from medssl.datasets.presets.chestxray14 import ChestXray14
from medssl.datasets.presets.chexpert import CheXpert
from medssl.datasets.presets.covid_ct import CovidCt
from medssl.datasets.presets.drive import Drive
from medssl.datasets.presets.lidc import Lidc
from medssl.datasets.presets.organsmnist import OrganSMnist
from medssl.datasets.presets.rsna_pe import RsnaPe
from medssl.datasets.presets.siim import Siim
from medssl.datasets.presets.tuberculosis import Montgomery, Shenzhen

__all__ = ["PRESETS", "Manifest", "Preset", "PresetError", "look_up_preset"]

PRESETS: Registry[Preset] = Registry(
    "dataset preset",
    {
        preset.name: preset
        for preset in (
            ChestXray14(),
            CheXpert(),
            Shenzhen(),
            Montgomery(),
            Drive(),
            Siim(),
            RsnaPe(),
            CovidCt(),
            OrganSMnist(),
            Lidc(),
        )
    },
)
"""Per ``preset`` name in the config: the release's preset."""


def look_up_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the known ones and the closest."""
    return PRESETS[name]
