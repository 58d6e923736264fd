"""Stage ``config``: check a config file by hand, as the workflow does before any job.

``python -m medssl.config config.yaml [override.yaml ...] [--print]``
"""

from __future__ import annotations

import argparse
import sys

import yaml

from medssl.cli import stage_main
from medssl.pipeline.config import load_config

DESCRIPTION = "Check a medssl config file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config YAML")
    parser.add_argument("overrides", nargs="*", help="further YAML files merged on top")
    parser.add_argument("--print", action="store_true", help="print the resolved config")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    if args.print:
        yaml.safe_dump(config, sys.stdout, sort_keys=False)
    else:
        print(f"{args.config}: valid")


main = stage_main("config", DESCRIPTION, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
