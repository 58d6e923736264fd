"""Self-supervised pre-training methods, each imported only when it is built.

:data:`METHODS` maps a method's config name to the module implementing it, and
:func:`build_method` imports that one module by name. Nothing here imports a
method module (nor torch): the code a pre-training job runs, found by following
static imports (:func:`medssl.pipeline.codedeps.module_sources`), is then the
shared code plus its own method's module, so an edit to SwAV reruns the SwAV
jobs and no other. :func:`method_names` lists the methods without importing any.

Adding a method is one module in this package whose
:class:`~medssl.pretraining.methods.base.Method` subclass carries
``@register(name)``, and one entry in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medssl.core.registry import Registry

if TYPE_CHECKING:
    from torchvision.models.resnet import ResNet

    from medssl.pretraining.methods.base import Method

METHODS: Registry[str] = Registry(
    "method",
    {
        "barlow_twins": "barlow_twins",
        "byol": "byol",
        "moco_v2": "moco_v2",
        "simclr": "simclr",
        "spark": "spark",
        "swav": "swav",
    },
)
"""Method name -> its module in this package (imported by :func:`method_class`)."""


def method_names() -> list[str]:
    """The registered method names, sorted; imports no method module and no torch."""
    return METHODS.names()


def method_module(name: str) -> str:
    """Dotted name of the module implementing method ``name`` (``medssl.pretraining.methods.swav``).

    Drop the leading ``medssl.`` for :func:`medssl.pipeline.codedeps.code_digest`.
    """
    return f"{__name__}.{METHODS[name]}"


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass of ``name``, importing its module on first use."""
    module = method_module(name)
    importlib.import_module(module)
    from medssl.pretraining.methods.base import METHOD_CLASSES

    return METHOD_CLASSES[name]


def build_method(name: str, backbone: ResNet, settings: Mapping[str, Any] | None = None) -> Method:
    """Instantiate the method registered as ``name`` around ``backbone``.

    ``settings`` overrides the method's ``default_settings`` (the config's
    ``pretrain.<name>`` sub-dict). An unknown name raises
    :class:`medssl.core.registry.UnknownNameError` with the known names.
    """
    return method_class(name)(backbone, settings)


__all__ = ["METHODS", "build_method", "method_class", "method_module", "method_names"]
