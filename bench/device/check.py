"""The device check's parts, each in its own process under its own time limit.

``bench/device_check.sh`` installs what is missing and calls this. Parts:

* ``throughput``: images/s and peak memory per method, fp32 and bf16
  (:mod:`throughput`, next to this file);
* ``data_wait``: the pre-training stage itself (``python -m medssl.pretrain
  --nproc 1``, the workflow's one-GPU command) on a generated HDF5 pool with
  the real loader and augmentation; its ``history.csv`` gives images/s and
  the fraction of each epoch the host spent blocked on the loader;
* ``finetune``: the fine-tune stage on a generated labelled cohort, starting
  from the encoder ``data_wait`` wrote (scratch when there is none);
* ``ddp``: the pre-training stage with ``--nproc 2 --device cpu`` (torchrun,
  gloo, DistributedDataParallel and global BatchNorm on this machine's
  PyTorch; NCCL needs a second GPU, which the device does not have);
* ``spark_sparse`` and ``peer``: ``bench/spark_throughput.py`` and
  ``bench/peer_throughput.py`` when present, with the options their
  ``--help`` lists; a missing script or option is reported, not fatal.

A part that fails or runs out of time is reported as such and the next one
starts. Results go to stdout (one summary line per part, then the goals) and,
with ``--out``, to ``device_check.json`` and ``device_check.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PARTS = (
    "throughput",
    "data_wait",
    "finetune",
    "finetune_stream",
    "families",
    "ddp",
    "spark_sparse",
    "peer",
)

BUDGET_S = {
    "throughput": 125,
    "data_wait": 75,
    "finetune": 60,
    "finetune_stream": 45,
    "families": 60,
    "ddp": 55,
    "spark_sparse": 45,
    "peer": 45,
}
"""Default seconds per part: 510 s together, so the whole check, its start-up and
the wheel install stay under 9 minutes."""

GOALS = (
    ("spark", "images_per_s", ">=", 1500.0),
    ("simclr", "images_per_s", ">=", 2500.0),
    ("moco_v2", "images_per_s", ">=", 2500.0),
    ("byol", "images_per_s", ">=", 2500.0),
    ("data_wait", "data_wait_fraction", "<", 0.05),
    ("finetune_stream", "data_wait_fraction", "<", 0.05),
)
"""The figures a GPU must reach: bf16 images/s of ResNet-50 at 224 x 224 per
method, and the data wait of the real loop."""


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one profile."""

    backbone: str
    size: int
    batch: int
    pool: int
    cohort: int
    steps: int
    epochs: int
    workers: int


PROFILES = {
    ("cuda", False): Sizes("resnet50", 224, 128, 4096, 1024, 20, 2, 8),
    ("cuda", True): Sizes("resnet50", 224, 64, 1024, 512, 8, 2, 4),
    ("cpu", False): Sizes("resnet_small", 64, 32, 256, 192, 5, 2, 2),
    ("cpu", True): Sizes("resnet_small", 64, 8, 64, 96, 2, 2, 0),
}
"""(device, quick) -> sizes. The CPU profiles rehearse the same commands in minutes."""


@dataclass
class Part:
    """What one part measured, or why it did not."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def descendants(root: int) -> list[int]:
    """Every process below ``root``, from the parent ids in ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_command(argv: list[str], budget: float, log: Path) -> tuple[str, float, str]:
    """Run ``argv`` for at most ``budget`` s; (status, seconds, stdout). Output goes to ``log``.

    The command gets its own process group, so a part stopped at its limit
    takes its children (torchrun's ranks, loader workers) with it.
    """
    started = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"$ {' '.join(argv)}\n")
        stream.flush()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stream, text=True, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = process.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            # torchrun starts its ranks in sessions of their own, out of the
            # group's reach: find every descendant first, then kill them all.
            stragglers = descendants(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            for pid in stragglers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, _ = process.communicate()
            stream.write(out)
            return "timeout", time.perf_counter() - started, out
        stream.write(out)
    status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
    return status, time.perf_counter() - started, out


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``text``'s lines (other lines are ignored)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def pretrain_settings(sizes: Sizes, method: str, epochs: int) -> dict[str, Any]:
    """A ``pretrain`` section for the stage: the method's own recipe, short schedule."""
    return {
        "backbone": sizes.backbone,
        "epochs": epochs,
        "batch_size": sizes.batch,
        "warmup_epochs": 0,
        "checkpoint_every": 1000,
        "max_samples": None,
        "precision": "auto",
        "augment": {},
        method: {},
    }


def pretrain_argv(
    python: str, method: str, data: Path, work: Path, settings: dict, extra: list[str]
) -> list[str]:
    """``python -m medssl.pretrain`` writing into ``work``."""
    return [
        python, "-m", "medssl.pretrain", "--method", method, "--data", str(data),
        "--settings", json.dumps(settings), "--seed", "0", "--out", str(work / "encoder.pt"),
        "--checkpoint-dir", str(work / "checkpoints"), *extra,
    ]  # fmt: skip


def last_epoch(work: Path) -> dict[str, Any]:
    """The last row of the stage's ``history.csv``."""
    with (work / "checkpoints" / "history.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{work / 'checkpoints' / 'history.csv'} has no epochs")
    return {key: float(value) for key, value in rows[-1].items()}


class Check:
    """The parts of one device check, sharing the generated data and the log."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.python = sys.executable
        self.sizes = PROFILES[(args.device, args.quick)]
        self.budget = {**BUDGET_S, **args.budget}
        self.log = (args.out or Path(tempfile.gettempdir())) / "device_check.log"
        self.data: dict[str, str] = {}

    def generate(self) -> None:
        """The pool and cohort, written once for every part."""
        s = self.sizes
        argv = [self.python, str(HERE / "data.py"), "--root", str(self.work / "data")]
        argv += ["--n", str(s.pool), "--cohort", str(s.cohort), "--size", str(s.size)]
        status, _, out = run_command(argv, 120, self.log)
        if status != "ok":
            raise RuntimeError(f"generating the data failed ({status}); see {self.log}")
        self.data = json_lines(out)[-1]

    def throughput(self, part: Part) -> None:
        s = self.sizes
        argv = [self.python, str(HERE / "throughput.py"), "--device", self.args.device]
        argv += ["--backbone", s.backbone, "--size", str(s.size), "--batch", str(s.batch)]
        argv += ["--steps", str(s.steps), "--warmup", "2" if s.steps > 2 else "1"]
        # Twelve figures share the budget; the rest is start-up and warm-up.
        argv += ["--seconds", f"{max(self.budget['throughput'] / 24, 1.0):.1f}"]
        if self.args.quick:
            argv.append("--quick")
        part.status, part.seconds, out = run_command(argv, self.budget["throughput"], self.log)
        part.rows = json_lines(out)

    def data_wait(self, part: Part) -> None:
        s = self.sizes
        work = self.work / "pretrain"
        settings = pretrain_settings(s, "simclr", s.epochs)
        extra = ["--device", self.args.device, "--threads", str(self.args.threads)]
        extra += ["--num-workers", str(s.workers), "--nproc", "1"]
        argv = pretrain_argv(self.python, "simclr", Path(self.data["pool"]), work, settings, extra)
        part.status, part.seconds, _ = run_command(argv, self.budget["data_wait"], self.log)
        if part.status == "ok":
            epoch = last_epoch(work)
            part.rows = [
                {
                    "method": "simclr",
                    "images_per_s": round(epoch["images_per_s"], 1),
                    "data_wait_fraction": round(epoch["data_wait_fraction"], 4),
                    "workers": s.workers,
                    "batch": s.batch,
                }
            ]

    def finetune(self, part: Part) -> None:
        s = self.sizes
        encoder = self.work / "pretrain" / "encoder.pt"
        task = {"name": "square", "dataset": "device", "column": "square", "type": "binary"}
        settings = {"epochs": s.epochs, "batch_size": s.batch, "lr": 1e-3, "optimizer": "adam"}
        out = self.work / "finetune" / "metrics.json"
        argv = [self.python, "-m", "medssl.finetune", "--data", self.data["h5"]]
        argv += ["--partition", self.data["partition"], "--subsets", self.data["subsets"]]
        argv += ["--fraction", "1.0", "--seed", "0", "--task", json.dumps(task)]
        argv += ["--settings", json.dumps(settings), "--backbone", s.backbone]
        argv += ["--device", self.args.device, "--threads", str(self.args.threads)]
        if encoder.exists():
            argv += ["--init", "simclr", "--encoder", str(encoder)]
        else:
            argv += ["--init", "scratch"]
        argv += ["--out", str(out)]
        part.status, part.seconds, _ = run_command(argv, self.budget["finetune"], self.log)
        if part.status == "ok":
            metrics = json.loads(out.read_text())
            part.rows = [
                {
                    "init": metrics["init"],
                    "seconds": round(part.seconds, 1),
                    "n_train": metrics["n_train"],
                    "epochs": s.epochs,
                    "test_auc": metrics["test"].get("auc"),
                    "device": metrics["provenance"]["settings"].get("device"),
                }
            ]

    def finetune_stream(self, part: Part) -> None:
        """One streamed fine-tuning epoch of the backbone on the cohort, with its data wait."""
        s = self.sizes
        argv = [self.python, str(HERE / "finetune_wait.py"), "--data", self.data["h5"]]
        argv += ["--partition", self.data["partition"], "--subsets", self.data["subsets"]]
        argv += ["--device", self.args.device, "--backbone", s.backbone]
        argv += ["--batch", str(s.batch), "--workers", str(s.workers)]
        part.status, part.seconds, out = run_command(argv, self.budget["finetune_stream"], self.log)
        part.rows = json_lines(out) if part.status == "ok" else []

    def ddp(self, part: Part) -> None:
        work = self.work / "ddp"
        work.mkdir(parents=True, exist_ok=True)
        pool = work / "pool.h5"
        run_command(
            [self.python, str(HERE / "data.py"), "--root", str(work), "--n", "64", "--cohort",
             "32", "--size", "64"], 60, self.log,
        )  # fmt: skip
        small = Sizes("resnet_small", 64, 16, 64, 32, 2, 2, 0)
        settings = pretrain_settings(small, "simclr", 1)
        extra = ["--device", "cpu", "--threads", "1", "--nproc", "2"]
        argv = pretrain_argv(self.python, "simclr", pool, work, settings, extra)
        part.status, part.seconds, _ = run_command(argv, self.budget["ddp"], self.log)
        if part.status == "ok":
            epoch = last_epoch(work)
            part.rows = [{"world": 2, "backend": "gloo", "loss": round(epoch["loss"], 4)}]

    def external(self, part: Part, script: str) -> None:
        """Run a bench script with the options its ``--help`` lists; report what is missing."""
        path = REPO / "bench" / script
        if not path.exists():
            part.status, part.note = "missing", f"bench/{script} does not exist"
            return
        status, _, text = run_command([self.python, str(path), "--help"], 60, self.log)
        if status != "ok":
            part.status, part.note = "broken", f"bench/{script} --help: {status}"
            return
        s = self.sizes
        wanted = {
            "--device": self.args.device,
            "--backbone": s.backbone,
            "--size": str(s.size),
            "--batch": str(s.batch),
            "--steps": str(s.steps),
        }
        if self.args.device == "cuda" and "--device" not in text:
            part.status, part.note = "skipped", f"bench/{script} has no --device option"
            return
        argv = [self.python, str(path)]
        for option, value in wanted.items():
            if option in text:
                argv += [option, value]
        if self.args.quick and "--quick" in text:
            argv.append("--quick")
        part.status, part.seconds, out = run_command(argv, self.budget[part.name], self.log)
        part.rows = json_lines(out) or [
            {"line": line} for line in out.strip().splitlines()[-5:] if line.strip()
        ]
        if not part.rows and part.status == "ok":
            part.note = "printed nothing"

    def families(self, part: Part) -> None:
        """Fine-tuning images/s and peak memory per backbone family: base sizes at 224 on a
        GPU, the tiny ones on a CPU (bench/finetune_families.py)."""
        on_gpu = self.args.device == "cuda"
        argv = [self.python, str(REPO / "bench" / "finetune_families.py")]
        argv += ["--device", self.args.device, "--steps", "3" if self.args.quick else "10"]
        argv += ["--sizes", "base", "--size", "224", "--batch", "32"] if on_gpu else []
        part.status, part.seconds, out = run_command(argv, self.budget["families"], self.log)
        rows = []
        for line in out.splitlines():
            cells = line.split()
            if len(cells) == 5 and cells[1].isdigit():
                name, px, cls_rate, seg_rate, peak = cells
                rows.append(
                    {"backbone": name, "px": int(px), "cls_images_per_s": float(cls_rate)}
                    | {"seg_images_per_s": float(seg_rate), "peak_mb": float(peak)}
                )
        part.rows = rows
        if part.status == "ok" and not rows:
            part.note = "printed no table"

    def run(self, names: list[str]) -> list[Part]:
        self.generate()
        parts = []
        for name in names:
            part = Part(name)
            print(f"# {name} (budget {self.budget[name]} s) ...", flush=True)
            try:
                if name == "spark_sparse":
                    self.external(part, "spark_throughput.py")
                elif name == "peer":
                    self.external(part, "peer_throughput.py")
                else:
                    getattr(self, name)(part)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                part.status, part.note = "error", str(err)[:300]
            print(summary_line(part), flush=True)
            parts.append(part)
        return parts


def summary_line(part: Part) -> str:
    """One line per part: status, seconds and its figures."""
    figures = "; ".join(
        ", ".join(f"{key}={value}" for key, value in row.items()) for row in part.rows
    )
    note = f" ({part.note})" if part.note else ""
    return f"{part.name}: {part.status} in {part.seconds:.1f} s{note}: {figures or 'no figures'}"


def goal_results(parts: list[Part], device: str) -> list[dict[str, Any]]:
    """Each goal with the measured value and pass/fail (no figure: fail, value None)."""
    by_name = {part.name: part for part in parts}
    results = []
    for subject, key, sign, target in GOALS:
        if subject in ("data_wait", "finetune_stream"):
            rows = by_name.get(subject, Part(subject)).rows
        else:
            rows = [
                row
                for row in by_name.get("throughput", Part("throughput")).rows
                if row.get("method") == subject and row.get("precision") == "bf16"
            ]
        value = rows[0].get(key) if rows else None
        passed = value is not None and (value >= target if sign == ">=" else value < target)
        results.append(
            {"goal": f"{subject} {key} {sign} {target:g}", "value": value, "pass": passed,
             "device": device}
        )  # fmt: skip
    return results


def write_results(out: Path, parts: list[Part], goals: list[dict], facts: dict) -> None:
    """``device_check.json`` (everything) and ``device_check.csv`` (one row per figure)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **facts,
        "parts": [part.__dict__ for part in parts],
        "goals": goals,
    }
    (out / "device_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    with (out / "device_check.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["part", "status", "seconds", "row", "key", "value"])
        for part in parts:
            for index, row in enumerate(part.rows or [{}]):
                for key, value in row.items() or [("", "")]:
                    writer.writerow(
                        [part.name, part.status, f"{part.seconds:.1f}", index, key, value]
                    )
        for goal in goals:
            writer.writerow(["goal", "pass" if goal["pass"] else "fail", "", "", goal["goal"],
                             goal["value"]])  # fmt: skip


def machine_facts(device: str) -> dict[str, Any]:
    """Versions and the GPU's name, for the record beside the figures."""
    import torch

    facts: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


def budget_item(text: str) -> tuple[str, float]:
    """argparse type: ``part=seconds``."""
    name, _, seconds = text.partition("=")
    if name not in PARTS:
        raise argparse.ArgumentTypeError(f"unknown part {name!r}; parts: {', '.join(PARTS)}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a number") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="smallest sizes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--budget", type=budget_item, nargs="*", default=[], help="part=seconds overrides"
    )
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads per stage")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON, CSV and log")
    args = parser.parse_args()
    args.budget = dict(args.budget)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medssl-device-") as directory:
        check = Check(args, Path(directory))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        parts = check.run(args.parts)
    goals = goal_results(parts, args.device)
    print(
        "# goals"
        + (" (set for the GPU; a CPU run does not reach them)" if args.device == "cpu" else "")
    )
    for goal in goals:
        print(f"{'PASS' if goal['pass'] else 'FAIL'} {goal['goal']}: {goal['value']}")
    facts = {**machine_facts(args.device), "quick": args.quick,
             "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(f"# {json.dumps(facts)}")
    if args.out:
        write_results(args.out, parts, goals, facts)
        print(f"# wrote {args.out / 'device_check.json'}, device_check.csv, device_check.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
