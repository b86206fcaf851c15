"""The project's own import graph, read from the source (ast), for the architecture and dvc.yaml tests."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "table2text", "bench")


def module_file(name: str) -> Path | None:
    """stages.train -> stages/train.py; table2text.data -> table2text/data/__init__.py; None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module of this project that `path` imports (at any depth of the file, lazily or not), with the
    packages whose __init__.py each import runs."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if module_file(".".join(parts[:i])):
                found.add(".".join(parts[:i]))
    return found


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def closure(path: Path) -> set[Path]:
    """The project files `path` runs when imported, itself included (transitively)."""
    seen, todo = set(), [path.resolve()]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += [module_file(m).resolve() for m in imported_modules(p)]
    return seen


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports, for every .py file of the packages."""
    return {module_name(p): imported_modules(p) - {module_name(p)}
            for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}
