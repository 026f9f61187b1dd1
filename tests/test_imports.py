"""The house rules on imports, read from the source with `ast` (nothing is imported).

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`, because
each one is a dependency a reader has to follow, whenever Python happens to run it.

- No circle between the modules of `cluster/`, `trainer/`, `dataloader/` and `ops/`.
- The layers (DESIGN.md): imports flow `cluster -> trainer -> {dataloader, ops}`;
  `dataloader` and `ops` import neither `trainer` nor `cluster`; `trainer` never imports
  `ray` (the same training function runs under Ray, `torchrun` and in one process).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "trainer", "dataloader", "ops")
# package -> top-level names its modules must never import
FORBIDDEN = {
    "trainer": {"cluster", "ray"},
    "dataloader": {"trainer", "cluster"},
    "ops": {"trainer", "cluster"},
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file of the four packages."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module name `path` imports, absolute, with its line: `import a.b` gives `a.b`;
    `from a import b` gives `a` and `a.b` (`b` may be a name of `a` or a submodule:
    `project_graph` decides); relative imports are resolved against `module`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        found
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for found in imported_names_of(node, module, path)
    ]


def imported_names_of(
    node: ast.Import | ast.ImportFrom, module: str, path: Path
) -> list[tuple[str, int]]:
    """`imported_names` of one import statement; for `from`, the base module comes first."""
    if isinstance(node, ast.Import):
        return [(alias.name, node.lineno) for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        drop = node.level - 1 if path.name == "__init__.py" else node.level
        anchor = anchor[: len(anchor) - drop] if drop else anchor
        base = ".".join([*anchor, base] if base else anchor)
    return [(base, node.lineno)] + [(f"{base}.{a.name}", node.lineno) for a in node.names]


def project_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line of the first such import}.

    `import a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`; those are not edges
    here (they are empty), only the module named is."""
    files = module_files(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = [n for n, _ in imported_names_of(node, module, path)]
            if isinstance(node, ast.ImportFrom):
                # `from a import b, c`: the submodules a.b, a.c where they exist, else `a`
                base, members = names[0], names[1:]
                subs = [n for n in members if n in files]
                names = subs if len(subs) == len(members) else [base, *subs]
            for name in names:
                if name in files and name != module and name not in PACKAGES:
                    graph[module].setdefault(name, node.lineno)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    edges = [
        f"{m} -> {n} (line {line})"
        for m in component
        for n, line in sorted(graph[m].items())
        if n in inside
    ]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_no_import_circle():
    graph = project_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(_describe(c, graph) for c in found)


def layer_violations(root: Path = ROOT) -> list[str]:
    """`file:line imports name` for every import the layer rule forbids, sorted."""
    broken: dict[str, str] = {}
    for module, path in module_files(root).items():
        banned = FORBIDDEN.get(module.split(".")[0], set())
        for name, line in imported_names(path, module):
            if name.split(".")[0] in banned:
                # `from a import b` yields `a` first: one entry per import statement
                broken.setdefault(f"{path.relative_to(root)}:{line}", name)
    return sorted(f"{where} imports {name}" for where, name in broken.items())


def test_layers():
    broken = layer_violations()
    assert not broken, "layer rule broken:\n" + "\n".join(broken)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_finds_a_circle_through_function_level_and_type_checking_imports(tmp_path):
    # The checker itself: a circle hidden in a function body and a TYPE_CHECKING block is
    # still a circle; an import of a name (not a module) is not an edge.
    root = _tree(
        tmp_path,
        {
            "cluster/a.py": "def f():\n    from cluster.b import g\n",
            "cluster/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from cluster import c\n"
                "from trainer.x import name_not_module\n"
            ),
            "cluster/c.py": "from . import a\n",
            "trainer/x.py": "import os\n",
        },
    )
    graph = project_graph(root)
    assert graph["cluster.a"] == {"cluster.b": 2}
    assert graph["cluster.b"] == {"cluster.c": 3, "trainer.x": 4}
    assert graph["cluster.c"] == {"cluster.a": 1}
    assert circles(graph) == [["cluster.a", "cluster.b", "cluster.c"]]


def test_relative_imports_resolve_in_packages_and_modules(tmp_path):
    root = _tree(
        tmp_path,
        {
            "trainer/sub/__init__.py": "from .leaf import x\nfrom .. import top\n",
            "trainer/sub/leaf.py": "from ..top import y\nfrom . import other\n",
            "trainer/sub/other.py": "",
            "trainer/top.py": "",
        },
    )
    graph = project_graph(root)
    assert graph["trainer.sub"] == {"trainer.sub.leaf": 1, "trainer.top": 2}
    assert graph["trainer.sub.leaf"] == {"trainer.top": 1, "trainer.sub.other": 2}
    assert circles(graph) == []


@pytest.mark.parametrize(
    ("rel", "text"),
    [
        ("trainer/t.py", "def f():\n    import ray\n"),
        ("trainer/t.py", "from cluster.launch import main\n"),
        ("ops/o.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainer\n"),
        ("dataloader/d.py", "from cluster import x\n"),
    ],
)
def test_layer_check_sees_a_forbidden_import(tmp_path, rel, text):
    root = _tree(tmp_path, {rel: text, "cluster/fine.py": "import ray\nimport trainer.t\n"})
    broken = layer_violations(root)
    assert len(broken) == 1 and broken[0].startswith(f"{rel}:")
