"""Code identity from the source: the code a number came from, derived from the files, never kept by hand.

A result's config hash covers the code that made its numbers (runspec.RunSpec.code_identity): the engine
modules that evaluated and timed it, the policy module for streaming points, and every module of this
package that they import, transitively. An edit to positions.rotate makes stale exactly the points of the
engines that import positions; the baseline, whose engine does not, stays current. No version to bump, so
none can be forgotten.

A module counts by its syntax tree with docstrings removed, so comments, docstrings, blank lines and line
wrapping never make a result stale. The tree is serialised field by field, leaving out empty fields: a
field that a newer Python adds to its AST with an empty default (3.12's `type_params`) does not change the
identity of unchanged code, so a result made in the image (Python 3.12) is current on the host (3.11).
The files are parsed, never imported: planning and `make tex` stay torch-free.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from pathlib import Path

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent

# module -> (digest of its own code, the in-package modules it imports); filled on first use.
_modules: dict[str, tuple[str, frozenset[str]]] = {}


def identity(*roots: str) -> str:
    """sha256 over the code of `roots` (dotted in-package module names) and everything they import."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen[module], imports = _module(module)
            todo.extend(imports)
    return hashlib.sha256(json.dumps(sorted(seen.items())).encode()).hexdigest()


def _module(module: str) -> tuple[str, frozenset[str]]:
    if module not in _modules:
        path = _path(module)
        if path is None:
            raise ValueError(f"{module} is not a module of {PACKAGE}")
        tree = ast.parse(_source(path), filename=str(path))
        imports = frozenset(_imports(module, path, tree))
        _strip_docstrings(tree)
        digest = hashlib.sha256(json.dumps(_canonical(tree)).encode()).hexdigest()
        _modules[module] = digest, imports
    return _modules[module]


def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _path(module: str) -> Path | None:
    """The file of an in-package module (a package's __init__.py); None for anything else."""
    head, _, rest = module.partition(".")
    if head != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*rest.split(".")) if rest else PACKAGE_DIR
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str, path: Path, tree: ast.Module) -> set[str]:
    """The in-package modules `module` imports by name: `import streamkv.x`, `from . import x` (a module),
    `from .x import y` (x, whose attribute y is). Parent packages run on import too, but hold no code that
    computes a number (the registries), so only what is named counts."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if _path(f"{base}.{alias.name}") else base)
    return {name for name in found if _path(name) is not None}


def _strip_docstrings(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def _canonical(node):
    """A JSON-able form of a syntax tree: node type and non-empty fields; no line numbers."""
    if isinstance(node, ast.AST):
        fields = ((name, _canonical(getattr(node, name, None))) for name in node._fields)
        return [type(node).__name__, *([name, value] for name, value in fields if value not in (None, []))]
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    return repr(node)
