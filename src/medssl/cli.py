"""The one stage runner: every ``python -m medssl.<stage>`` goes through :func:`run_stage`.

A stage module declares a :class:`Stage`: its arguments and a ``run`` function
that reads, calls the library and writes. The runner owns everything the stages
share, so they cannot drift apart:

* the shared options: ``-v/--verbose`` always, ``--threads`` and ``--device``
  for stages that run torch, ``--settings`` (one JSON object) where asked for;
* one logging set-up (stderr, which Snakemake's ``log:`` captures);
* one exit policy: a failure prints one line, ``error: <stage>: <message>``,
  and the stage exits 1 without a traceback (``--verbose`` adds it); argparse's
  usage errors exit 2 as usual; 0 means every output was written.

Snakemake passes each stage its settings as one JSON argument (the resolved
config section), so a job's params are exactly what the code sees.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("medssl")

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, OSError, RuntimeError)
"""Failures caused by the input (bad file, bad setting, full disk, diverged training):
reported as one line. Anything else is a bug and says so, still in one line."""


@dataclass(frozen=True)
class Stage:
    """What a stage module tells the runner.

    ``add_arguments`` adds the stage's own options; ``run`` does the work and
    raises on failure (the runner turns the exception into the exit status).
    """

    name: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    uses_torch: bool = False
    epilog: str | None = None
    raw_help: bool = False
    fromfile_prefix_chars: str | None = None


def json_arg(text: str) -> Any:
    """argparse type: parse a JSON string, with an error that quotes it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:80]!r} ({err})") from err


def json_object(text: str) -> dict[str, Any]:
    """argparse type of every ``--settings``: a JSON object (a config section)."""
    value = json_arg(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:80]!r}")
    return value


def add_settings_argument(
    parser: argparse.ArgumentParser, help: str, *, required: bool = False
) -> None:
    """``--settings '<json object>'``: the resolved config section the stage reads."""
    kwargs: dict[str, Any] = {"required": True} if required else {"default": {}}
    parser.add_argument("--settings", type=json_object, help=help, **kwargs)


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    """The stage's parser: its own options plus the shared ones."""
    parser = argparse.ArgumentParser(
        prog=f"python -m medssl.{stage.name}",
        description=stage.description,
        epilog=stage.epilog,
        formatter_class=(
            argparse.RawDescriptionHelpFormatter if stage.raw_help else argparse.HelpFormatter
        ),
        fromfile_prefix_chars=stage.fromfile_prefix_chars,
    )
    stage.add_arguments(parser)
    if stage.uses_torch:
        parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks on failure"
    )
    return parser


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (Snakemake's ``log:`` captures it)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def error_line(stage: str, err: BaseException) -> str:
    """The one line a failure prints; an unexpected exception type is named as such."""
    message = str(err) or type(err).__name__
    if not isinstance(err, EXPECTED_ERRORS):
        message = f"{type(err).__name__}: {message} (an internal error; --verbose shows where)"
    return f"error: {stage}: {message}"


def stage_main(
    name: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    **options: Any,
) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv)`` of a stage module: :func:`run_stage` bound to its :class:`Stage`
    (``options`` are the other fields of :class:`Stage`)."""
    stage = Stage(name, description, add_arguments, run, **options)

    def main(argv: Sequence[str] | None = None) -> int:
        return run_stage(stage, argv)

    main.__doc__ = f"``python -m medssl.{stage.name}``; returns the exit status."
    return main


def add_output_argument(
    parser: argparse.ArgumentParser, help: str, *, provenance: bool = False
) -> None:
    """``--out`` (and, for tables, ``--no-provenance``: skip the sidecar)."""
    parser.add_argument("--out", required=True, help=help)
    if provenance:
        parser.add_argument(
            "--no-provenance",
            action="store_true",
            help="do not write the <out>.provenance.json sidecar",
        )


def add_table_arguments(
    parser: argparse.ArgumentParser, source: str, out_help: str, settings_help: str
) -> None:
    """A table stage's options: ``--<source>`` (the CSV it reads), ``--settings``,
    ``--out`` and ``--no-provenance`` (``stats`` and ``efficiency`` read runs.csv)."""
    parser.add_argument(f"--{source}", required=True, help=f"{source}.csv to read")
    add_settings_argument(parser, settings_help)
    add_output_argument(parser, out_help, provenance=True)


def run_stage(stage: Stage, argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging and threads, run; returns the exit status."""
    parser = build_parser(stage)
    command_line = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(command_line)
    # The arguments as given, for a stage that restarts itself (pretrain --nproc).
    args.command_line = command_line
    setup_logging(args.verbose)
    try:
        if stage.uses_torch:
            set_threads(args.threads)
        stage.run(args)
    except Exception as err:  # the exit policy: every failure becomes one line and status 1
        if args.verbose:
            log.exception("%s failed", stage.name)
        log.error("%s", error_line(stage.name, err))
        return 1
    return 0


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
