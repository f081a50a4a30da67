"""No import cycles in the packages: a module imports only modules that do not, directly or through others, import it.

The graph is read from the source with `ast`, not by importing, so every import counts: module level, inside
functions (a lazy import is still a dependency) and under `if TYPE_CHECKING:`. An edge goes to the module imported:
`from pkg import name` is an edge to `pkg.name` when that is a module of the packages, else to `pkg`; relative
imports are resolved against the importing module's package. Imports of modules outside the packages are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "embedder", "prompts", "data_schemas")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the packages (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` (source at `path`) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # Level 1 is the module's own package, each further level one package up.
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return (found & known) - {module}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports."""
    modules = module_files(root, packages)
    return {module: imported_modules(module, path, set(modules)) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a module chain that starts and ends with the same module, or None when the graph has none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Depth-first, iteratively: `path` is the chain from `start` to the module being explored.
        path = [start]
        on_path = {start}
        pending = [iter(sorted(graph[start]))]
        while pending:
            following = next(pending[-1], None)
            if following is None:
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if following in on_path:
                return [*path[path.index(following) :], following]
            if following not in done:
                path.append(following)
                on_path.add(following)
                pending.append(iter(sorted(graph.get(following, ()))))
    return None


def test_the_packages_have_no_import_cycle():
    graph = import_graph(REPOSITORY, PACKAGES)
    assert {module.split(".")[0] for module in graph} == set(PACKAGES)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_through_a_lazy_relative_submodule_import_is_found(tmp_path):
    _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/a.py": "from toy.b import helper\n",
        "toy/b.py": "def helper():\n    from . import c\n",
        "toy/sub/__init__.py": "",
        "toy/c.py": "import toy.sub.d\n",
        "toy/sub/d.py": "from ..a import something\n",
    })
    graph = import_graph(tmp_path, ("toy",))
    assert graph["toy.b"] == {"toy.c"}
    assert graph["toy.sub.d"] == {"toy.a"}
    assert find_cycle(graph) == ["toy.a", "toy.b", "toy.c", "toy.sub.d", "toy.a"]


def test_an_acyclic_package_passes(tmp_path):
    _write(tmp_path, {
        "toy/__init__.py": "from toy.a import run\n",
        "toy/a.py": "import json\nfrom toy import b\n",
        "toy/b.py": "from toy.c import VALUE\n",
        "toy/c.py": "VALUE = 1\n",
    })
    graph = import_graph(tmp_path, ("toy",))
    assert graph == {"toy": {"toy.a"}, "toy.a": {"toy.b"}, "toy.b": {"toy.c"}, "toy.c": set()}
    assert find_cycle(graph) is None
