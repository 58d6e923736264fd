"""The method registry: every method trains, exports, and is imported by name alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medssl.models import backbones as models
from medssl.models.backbones import build_backbone
from medssl.pipeline.codedeps import PACKAGE_DIR, module_sources
from medssl.pretraining.methods import (
    METHODS,
    build_method,
    method_class,
    method_module,
    method_names,
)
from medssl.pretraining.methods.base import Method
from tests.pretraining.methods.small_methods import SMALL, SMALL_HEADS, ct_slices, make

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    return ct_slices()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_is_finite(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, build_backbone("resnet_small", 1), SMALL_HEADS.get(name, {}))
    assert isinstance(method, Method)
    # 64x64: the smallest input on which SparK's input/32 mask grid can hide and show patches.
    views = [torch.rand(4, 1, 64, 64) for _ in range(method.views_per_sample)]
    loss = method(views)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.encoder().parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    method.on_step_end(1, 10)
    assert method.encoder() is method.backbone


def test_unknown_method_lists_registered_names() -> None:
    with pytest.raises(KeyError, match="unknown method 'no-such-method'; known: ") as info:
        build_method("no-such-method", build_backbone("resnet_small", 1), {})
    assert "simclr" in str(info.value)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_few_steps_reduce_the_loss(name: str, slices: torch.Tensor) -> None:
    """Eight AdamW steps on one batch of augmented views lower the loss on that batch.

    MoCo's queue is restored before the last evaluation: otherwise it would
    hold this very batch's keys as negatives, a different loss from the first.
    """
    method = make(name)
    views = method.make_views({}, seed=0)(slices)
    buffers = {key: value.clone() for key, value in method.named_buffers() if "queue" in key}
    optimizer = torch.optim.AdamW(method.optimizer_groups(), lr=1e-3)
    losses = []
    for step in range(1, 9):
        loss = method(views)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end(step, 8)
    method.load_state_dict(buffers, strict=False)
    with torch.no_grad():
        final = method(views).item()
    assert all(np.isfinite(losses)) and np.isfinite(final)
    assert final < losses[0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_exported_encoder_loads_as_torchvision_resnet(name: str, tmp_path: Path) -> None:
    method = make(name)
    path = tmp_path / "encoder.pt"
    models.save_encoder(method.encoder(), path, "resnet_small", {"method": name})
    loaded, info = models.load_encoder(path)
    assert info["method"] == name
    expected = {k: v for k, v in method.backbone.state_dict().items() if not k.startswith("fc.")}
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


SCHEMA = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"

OWN_MODULES: dict[str, set[str]] = {
    name: {f"pretraining/methods/{module}.py"} for name, module in METHODS.items()
}
"""Each method's own source files: its module, and for SparK the sparse emulation."""
OWN_MODULES["spark"].add("pretraining/methods/sparse.py")
EVERY_METHODS_CODE = set().union(*OWN_MODULES.values())


def sources(module: str) -> set[str]:
    return {Path(p).relative_to(PACKAGE_DIR).as_posix() for p in module_sources(module)}


def test_the_pretrain_stage_reaches_no_method_module() -> None:
    """Methods are imported by name, so editing one reruns only its own jobs."""
    found = sources("pretrain")
    assert {"pretrain.py", "pretraining/recipes.py", "pretraining/methods/__init__.py"} <= found
    assert "pretraining/methods/base.py" in found
    assert not found & EVERY_METHODS_CODE


@pytest.mark.parametrize("name", method_names())
def test_a_method_module_reaches_only_its_own_code_and_shared_modules(name: str) -> None:
    found = sources(method_module(name).removeprefix("medssl."))
    assert OWN_MODULES[name] <= found
    assert not (found & EVERY_METHODS_CODE) - OWN_MODULES[name]


def test_method_names_import_neither_a_method_nor_torch() -> None:
    code = (
        "import sys; from medssl.pretraining.methods import method_names; names = method_names(); "
        "package = method_names.__module__; "
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith(package + '.')]; "
        "assert not loaded, loaded; print(','.join(names))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().split(",") == sorted(METHODS)


def test_the_schema_lists_the_registered_methods() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["pretrain"]["properties"]
    assert sorted(schema["methods"]["items"]["enum"]) == method_names()


@pytest.mark.parametrize("name", method_names())
def test_schema_defaults_of_a_method_equal_its_default_settings(name: str) -> None:
    """``pretrain.<method>`` in the schema defaults every setting as the method class does."""
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["pretrain"]["properties"][name]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    assert defaults == method_class(name).default_settings
