"""Self-supervised pre-training methods.

:data:`METHODS` maps a name to its :class:`Method` class; :func:`build_method`
instantiates one. Adding a method is one new module using ``@register(name)``
plus one import line in this file (the import is what registers it).
"""

# Each import registers its module's method under the module's name.
from medssl.pretraining.methods import barlow_twins, byol, moco_v2, simclr, spark, swav  # noqa: F401
from medssl.pretraining.methods.base import METHODS, Method, build_method, register

__all__ = ["METHODS", "Method", "build_method", "register"]
