"""Which code a job runs, and a digest of it that changes only when the code does.

Rules call ``python -m medssl.<stage>``, which Snakemake's code trigger cannot
see into. Each rule carries :func:`code_digest` of the modules its job runs as
a param, so an edit to the fine-tuning loop reruns the fine-tunes (and what
follows) and nothing upstream. Two choices make reruns follow the real change:

* the module list is found statically, by following ``medssl`` imports with
  ``ast`` (milliseconds at parse time, never stale by hand); a pre-training
  job adds its one method module (:mod:`medssl.pretraining.methods` imports
  its methods by name at run time), so editing SwAV reruns SwAV only;
* the digest is over each file's syntax tree with docstrings removed, not its
  bytes: comments, docstrings and formatting do not change what runs, so an
  edit that touches only them reruns nothing, while any change to code does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from medssl.core.registry import UnknownNameError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
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
        raise UnknownNameError(f"no module {PACKAGE}.{module} in {PACKAGE_DIR}")
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


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """Drop the docstring of the module and of every class and function in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                # An empty body is not valid Python; ``pass`` keeps the tree well formed.
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(file: str | Path) -> str:
    """SHA-256 of what a source file does: its syntax tree without docstrings.

    ``ast.dump`` without line and column attributes is the same for two files
    that differ only in comments, docstrings, blank lines or layout.
    """
    stat = Path(file).stat()
    return _fingerprint(str(file), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _fingerprint(file: str, mtime_ns: int, size: int) -> str:
    """:func:`code_fingerprint`, cached while the file's time stamp and size stay."""
    path = Path(file)
    tree = _without_docstrings(ast.parse(path.read_text(), filename=str(path)))
    dumped = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(dumped.encode()).hexdigest()


def code_digest(*modules: str) -> str:
    """SHA-256 over the code of every source reached from ``modules`` (``finetune``,
    ``pretraining.methods.swav``...), to tell code versions apart."""
    files = sorted({file for module in modules for file in module_sources(module)})
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(code_fingerprint(file).encode())
    return digest.hexdigest()
