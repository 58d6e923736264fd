"""Small helpers shared by the stage command lines.

Each stage is ``python -m medssl.<stage>``; Snakemake passes settings as one
JSON argument (the resolved config section), so the job's params are exactly
what the code sees.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def json_arg(text: str) -> Any:
    """argparse type: parse a JSON string, with an error that quotes it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:80]!r} ({err})") from err


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (Snakemake's ``log:`` captures it)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def set_threads(threads: int) -> None:
    """Keep torch inside the cores Snakemake gave the job."""
    import torch  # imported here so report stages need no torch

    torch.set_num_threads(max(1, threads))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit name is used as is."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"compute.device is {name!r} but no CUDA device is available")
    return torch.device(name)
