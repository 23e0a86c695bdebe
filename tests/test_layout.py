"""The package's layout rules (docs/ARCHITECTURE.md), checked from the source: imports between modules form no circle,
``attention/`` and ``memory/`` import neither transformers nor ``integrations/``, no module imports another's
``_private`` name, and no module is over 420 lines.

    python tests/test_layout.py    # prints the floors: each module above everything it imports

Every import counts, at module level or inside a function (a lazy import is still a dependency).
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "easy_context"
MAX_LINES = 420


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: pathlib.Path, known) -> list[tuple[str, list[str]]]:
    """``[(imported module, [names taken from it]), ...]``: absolute names, package modules and third-party ones."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from . import facts` names a module; `from .x import y` a name of x
                sub = f"{base}.{a.name}"
                out.append((sub, []) if sub in known else (base, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for mod, _ in imports(name, path, known):
            while mod and mod not in known and "." in mod:
                mod = mod.rpartition(".")[0]
            if mod in known and mod != name and not name.startswith(mod + "."):
                targets.add(mod)  # a package's own __init__ is not an edge of its submodules (Python runs it first)
        edges[name] = targets
    return edges


def floors(edges) -> dict[str, int]:
    """Each module's floor: 1 + the highest floor among what it imports (1 for a module importing nothing)."""
    memo: dict[str, int] = {}

    def floor(m, path=()):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + (m,)))
        if m not in memo:
            memo[m] = 1 + max((floor(t, path + (m,)) for t in edges[m]), default=0)
        return memo[m]

    for m in edges:
        floor(m)
    return memo


def test_no_import_circle():
    floors(graph())


def test_attention_and_memory_import_neither_transformers_nor_integrations():
    known = modules()
    bad = [(name, mod) for name, path in known.items() if name.split(".")[1:2] in (["attention"], ["memory"])
           for mod, _ in imports(name, path, known)
           if mod.split(".")[0] == "transformers" or mod.startswith("easy_context.integrations")]
    assert not bad, bad


def test_no_private_name_of_another_module_is_imported():
    known = modules()
    bad = [(name, mod, n) for name, path in known.items() for mod, names in imports(name, path, known)
           if mod.startswith("easy_context") for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


if __name__ == "__main__":
    by_floor: dict[int, list[str]] = {}
    for m, f in floors(graph()).items():
        by_floor.setdefault(f, []).append(m.removeprefix("easy_context.") or "easy_context")
    for f in sorted(by_floor, reverse=True):
        print(f"floor {f}: {' '.join(sorted(by_floor[f]))}")
