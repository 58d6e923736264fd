"""metrics.json files as the fine-tuning stage writes them, for the aggregation tests."""

from __future__ import annotations

import json
from pathlib import Path


def payload(init: str, task: str, fraction: float, seed: int, **test: float) -> dict:
    return {
        "init": init,
        "task": task,
        "task_type": "binary",
        "fraction": fraction,
        "seed": seed,
        "n_train": int(400 * fraction),
        "n_val": 60,
        "n_test": 60,
        "best_epoch": 3 + seed,
        "val": {"auc": 0.5, "accuracy": 0.5},
        "test": test or {"auc": 0.8, "accuracy": 0.7, "f1": 0.6},
        "history": [{"epoch": 1, "train_loss": 0.6, "val_auc": 0.7}],
        "settings": {},
        "provenance": {},
    }


def write_metrics(root: Path, payload: dict) -> Path:
    path = (
        root
        / payload["init"]
        / payload["task"]
        / f"frac{payload['fraction']}"
        / f"seed{payload['seed']}"
        / "metrics.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Plain json.dumps: a test may write what medssl.core.files.write_json never would (NaN).
    path.write_text(json.dumps(payload))
    return path


def write_sweep(root: Path) -> list[Path]:
    """Two inits x two fractions x two seeds of one task, written out of order."""
    paths = []
    for init in ("simclr", "scratch"):
        for fraction in (0.5, 0.1):
            for seed in (1, 0):
                score = 0.7 + 0.1 * (init == "simclr") + 0.01 * seed + 0.1 * fraction
                paths.append(
                    write_metrics(
                        root,
                        payload(init, "nodule", fraction, seed, auc=score, accuracy=score - 0.1),
                    )
                )
    return paths
