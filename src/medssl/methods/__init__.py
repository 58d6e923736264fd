"""Self-supervised pre-training methods.

:data:`METHODS` maps a name to its :class:`Method` class; :func:`build_method`
instantiates one. Adding a method is one new module using ``@register(name)``
plus one import line in this file (the import is what registers it).
"""

from medssl.methods import (
    simclr,  # noqa: F401  (registers "simclr")
    spark,  # noqa: F401  (registers "spark")
)
from medssl.methods.base import METHODS, Method, build_method, register

__all__ = ["METHODS", "Method", "build_method", "register"]
