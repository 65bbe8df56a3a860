"""The package layers of src/emma (docs/architecture.md, "Layers"): imports only go down.

Every module is parsed with ``ast`` and every import in it counts, at module level and inside
functions (lazy imports, ``TYPE_CHECKING`` blocks): a package may import the packages of lower layers
only, never a higher layer and never another package of its own layer. The package root (``emma``:
``__version__``) imports nothing of EMMA and anyone may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "emma"

# Lowest first. A new package must be given a layer here (and in docs/architecture.md).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("text",),
    ("io",),
    ("model",),
    ("data",),
    ("infer",),
    ("eval", "serve"),
    ("annotate", "train"),
    ("cli",),
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
ROOT = "emma"


def module_name(path: Path, src: Path = SRC) -> str:
    """``src/emma/eval/extract.py`` → ``emma.eval.extract``; a package's ``__init__.py`` → the package."""
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level package under ``emma`` (``emma.errors`` → ``errors``), ``emma`` for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def imported_modules(
    source: str, module: str, is_package: bool, top_level: set[str]
) -> list[tuple[int, str]]:
    """``(line, module)`` of every EMMA module that ``source`` imports, anywhere in the file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == ROOT:  # from emma import text → emma.text; from emma import __version__ → emma
                found += [
                    (node.lineno, f"{ROOT}.{a.name}" if a.name in top_level else ROOT) for a in node.names
                ]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == ROOT or name.startswith(ROOT + ".")]


def violations(sources: dict[str, tuple[str, bool]], top_level: set[str]) -> list[str]:
    """Every import that breaks the layers, one line each; ``sources``: module → (source, is_package)."""
    problems: list[str] = []
    for module, (source, is_package) in sorted(sources.items()):
        here = package_of(module)
        if here != ROOT and here not in RANK:
            problems.append(f"{module}: package {here!r} has no layer in LAYERS")
            continue
        for line, target in imported_modules(source, module, is_package, top_level):
            there = package_of(target)
            if there == here:
                continue
            where = f"{module}:{line} imports {target}"
            if here == ROOT:
                problems.append(f"{where}: the package root imports nothing of EMMA")
            elif there == ROOT:
                continue
            elif there not in RANK:
                problems.append(f"{where}: package {there!r} has no layer in LAYERS")
            elif RANK[there] > RANK[here]:
                problems.append(
                    f"{where}: {here} (layer {RANK[here]}) is below {there} (layer {RANK[there]})"
                )
            elif RANK[there] == RANK[here]:
                problems.append(f"{where}: {here} and {there} share a layer and must not import each other")
    return problems


def read_tree(src: Path = SRC) -> tuple[dict[str, tuple[str, bool]], set[str]]:
    sources = {
        module_name(path, src): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(src.rglob("*.py"))
    }
    top_level = {p.stem for p in src.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    return sources, top_level - {"__init__"}


def test_imports_follow_the_layers() -> None:
    sources, top_level = read_tree()
    assert len(sources) > 100 and {"errors", "text", "eval", "annotate", "cli"} <= top_level
    problems = violations(sources, top_level)
    assert not problems, "imports against the layers (docs/architecture.md):\n" + "\n".join(problems)


def test_every_package_has_a_layer() -> None:
    _, top_level = read_tree()
    assert top_level == set(RANK), "give each package of src/emma a layer (and update the docs)"


def test_the_check_catches_each_kind_of_violation() -> None:
    top = set(RANK)
    ok = {
        "emma.eval.extract": (
            "from emma.text.normalize import tokens\nfrom emma import __version__\n",
            False,
        ),
        "emma.annotate.synth": ("from emma.eval import scorers\nfrom . import runner\n", False),
        "emma.annotate.runner": ("", False),
    }
    assert violations(ok, top) == []
    cases = {
        # a module-level import up a layer
        "emma.eval.metrics": ("from emma.annotate.labeler import label_report\n", False),
        # a lazy import inside a function, between two packages of one layer
        "emma.serve.app": ("def f():\n    import emma.eval.runner\n", False),
        # a relative import that climbs out of its package and up
        "emma.text": ("from ..annotate import synth\n", True),
        # from emma import <package>
        "emma.io.load": ("from emma import model\n", False),
        # the root importing a package
        "emma": ("from emma import cli\n", True),
        # a package with no layer
        "emma.plugins.x": ("", False),
    }
    for module, source in cases.items():
        found = violations({module: source}, top | {"plugins"})
        assert len(found) == 1 and found[0].startswith(module), (module, found)
