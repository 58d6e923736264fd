"""medssl: which pre-training should you start from when you have few labels?

Each pipeline stage is a module runnable as ``python -m medssl.<stage>``.
"""

__version__ = "0.1.0"
