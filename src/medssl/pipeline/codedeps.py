"""Which source files a stage runs, for Snakemake's rerun triggers.

Rules call ``python -m medssl.<stage>``, which Snakemake's code trigger cannot
see into. Listing the stage's module files as rule inputs makes an edit to
``finetune.py`` rerun the fine-tunes (and what follows) and nothing upstream.
The list is found statically, by following ``medssl`` imports with ``ast``:
it costs milliseconds at parse time and never goes stale by hand.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = "medssl"


def _module_file(module: str) -> Path | None:
    """File of a ``medssl.x.y`` module (package ``__init__`` or plain module)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    if base.is_dir() and (base / "__init__.py").is_file():
        return base / "__init__.py"
    file = base.with_suffix(".py")
    return file if file.is_file() else None


def _module_name(file: Path) -> str:
    rel = file.relative_to(PACKAGE_DIR).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(file: Path) -> set[str]:
    """Absolute names of the medssl modules ``file`` imports."""
    tree = ast.parse(file.read_text(), filename=str(file))
    own = _module_name(file)
    package = own if file.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # ``from medssl import finetune`` imports a submodule, not a name.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


@functools.cache
def module_sources(module: str) -> tuple[str, ...]:
    """Sorted source files reached from ``medssl.<module>`` through medssl imports.

    Parent packages' ``__init__.py`` files are included, since importing a
    submodule runs them.
    """
    start = _module_file(f"{PACKAGE}.{module}")
    if start is None:
        raise KeyError(f"no module {PACKAGE}.{module} in {PACKAGE_DIR}")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        parent = file.parent
        while parent != PACKAGE_DIR.parent and (parent / "__init__.py").is_file():
            todo.append(parent / "__init__.py")
            parent = parent.parent
        for name in _imports(file):
            target = _module_file(name)
            if target is not None:
                todo.append(target)
    return tuple(sorted(str(f) for f in seen))


def code_digest(module: str) -> str:
    """SHA-256 over the sources :func:`module_sources` lists, to tell code versions apart."""
    digest = hashlib.sha256()
    for file in module_sources(module):
        digest.update(Path(file).relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()
