"""The one stage runner: shared options, one exit policy, one error line."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import subprocess
import sys

import pytest

from medssl.cli import Stage, build_parser, json_object, run_stage


def _stage(run) -> Stage:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", required=True)

    return Stage(name="demo", description="A demo stage.", add_arguments=add_arguments, run=run)


def test_success_is_status_zero() -> None:
    seen = {}
    assert run_stage(_stage(lambda args: seen.update(out=args.out)), ["--out", "x"]) == 0
    assert seen == {"out": "x"}


def test_bad_input_is_one_error_line_and_status_one(caplog: pytest.LogCaptureFixture) -> None:
    def fail(args: argparse.Namespace) -> None:
        raise ValueError(f"{args.out}: column 'label' is missing")

    with caplog.at_level(logging.ERROR):
        assert run_stage(_stage(fail), ["--out", "t.csv"]) == 1
    assert caplog.messages == ["error: demo: t.csv: column 'label' is missing"]
    assert all(record.exc_info is None for record in caplog.records)


def test_verbose_adds_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def fail(args: argparse.Namespace) -> None:
        raise OSError("cannot write t.csv: the disk is full")

    with caplog.at_level(logging.ERROR):
        assert run_stage(_stage(fail), ["--out", "t.csv", "--verbose"]) == 1
    assert any(record.exc_info for record in caplog.records)
    assert caplog.messages[-1] == "error: demo: cannot write t.csv: the disk is full"


def test_an_internal_error_says_so(caplog: pytest.LogCaptureFixture) -> None:
    def fail(args: argparse.Namespace) -> None:
        raise TypeError("unsupported operand")

    with caplog.at_level(logging.ERROR):
        assert run_stage(_stage(fail), ["--out", "t"]) == 1
    assert "TypeError: unsupported operand (an internal error" in caplog.messages[-1]


def test_torch_stages_get_threads_and_device() -> None:
    stage = Stage("demo", "d", lambda parser: None, lambda args: None, uses_torch=True)
    args = build_parser(stage).parse_args(["--threads", "3", "--device", "cpu", "-v"])
    assert (args.threads, args.device, args.verbose) == (3, "cpu", True)


def test_settings_must_be_a_json_object() -> None:
    assert json_object('{"lr": 0.1}') == {"lr": 0.1}
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object"):
        json_object("[1, 2]")
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        json_object("{lr: 0.1}")


def test_a_stage_from_the_shell_fails_in_one_line_without_traceback(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medssl.subsample",
            "--partition",
            str(tmp_path / "missing.csv"),
            "--seed",
            "0",
            "--out",
            str(tmp_path / "out.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: subsample:" in lines[0] and "missing.csv" in lines[0]
    assert not (tmp_path / "out.csv").exists()


STAGE_OPTIONS = {
    "synth": "--labels --masks-dir --out-dir --settings",
    "convert": "--compression --dicom-dir --dtype --gap-policy --gap-tolerance --image-size"
    " --max-reject-fraction --modalities --out --policy --pseudonym-key-env --rejects"
    " --settings --threads --tilt-policy --window",
    "masks": "--data --dicom-dir --format --out --source --structure",
    "split": "--data --labels --out --task",
    "subsample": "--out --partition --seed",
    "pretrain": "--checkpoint-dir --data --device --gpus --init-encoder --method --nproc"
    " --num-workers --out --seed --settings --threads",
    "import_init": "--backbone --checkpoint --format --in-channels --out --stem",
    "finetune": "--backbone --data --device --encoder --export-encoder --fraction --init"
    " --masks --out --partition --seed --settings --subsets --task --threads",
    "aggregate": "--no-provenance --out --partial --root",
    "stats": "--no-provenance --out --runs --settings",
    "tables": "--csv --decimals --init-order --latex --metric-order --out --settings"
    " --summary --task",
    "efficiency": "--no-provenance --out --runs --settings",
    "plots": "--metric --out --settings --summary --task",
    "figures": "--fraction --metric --metrics --out --settings --table --task",
    "config": "--print",
}
"""Every option each stage's command line has: scripts that call a stage keep working."""


@pytest.mark.parametrize("stage", sorted(STAGE_OPTIONS))
def test_every_stage_keeps_its_options(stage: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"medssl.{stage}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m medssl.{stage}")
    for option in [*STAGE_OPTIONS[stage].split(), "--verbose", "-v"]:
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), (stage, option)
