"""The package's import graph, drawn from the source with `ast`: the layering of the house style holds (losses,
analysis and deploy never reach into the engine) and no module imports, at any depth, one that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import vaqkd

SRC = Path(vaqkd.__file__).resolve().parent


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The vaqkd modules `path` imports anywhere (inside functions too; not under `if TYPE_CHECKING:`)."""
    out: set[str] = set()
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            names = []
        for n in names:
            while n and n not in modules:  # `from vaqkd.quant import x`: x may be a name, not a module
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {_module(f) for f in files}
    return {_module(f): _imports(f, modules) for f in files}


def _in(module: str, layer: str) -> bool:
    return module == f"vaqkd.{layer}" or module.startswith(f"vaqkd.{layer}.")


def test_graph_sees_imports_inside_functions():
    g = graph()
    assert "vaqkd.engine.train" in g["vaqkd.cli"]  # cli imports the engine inside its command functions
    assert "vaqkd.errors" in g["vaqkd.config"]


def test_losses_analysis_and_deploy_do_not_import_the_engine():
    g = graph()
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in g.items()
        for d in deps
        if any(_in(m, layer) for layer in ("distill", "analysis", "deploy", "rundir", "dist", "quant", "models", "data",
                                           "metrics", "config", "errors"))
        and _in(d, "engine")
    )
    assert bad == []


def test_lower_layers_do_not_import_higher_ones():
    """Nothing below the table (models, data, metrics, quant, the losses, the engine, run directories, analysis,
    deploy) imports the runner, presets, records, the launcher or the command line."""
    g = graph()
    top = ("runner", "presets", "records", "launch", "cli", "bench")
    low = ("models", "data", "metrics", "quant", "distill", "config", "errors", "dist", "engine", "rundir", "analysis",
           "deploy")
    bad = sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps
                 if any(_in(m, lo) for lo in low) and any(_in(d, t) for t in top))  # fmt: skip
    assert bad == []


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its own submodules is not a cycle between modules
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    cycles, state = [], {}

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                walk(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [])
    assert cycles == []


def test_no_data_path_is_pasted_into_toml_text():
    """The library passes a data root as a value ((key, value) overrides, `data_root=`), never as TOML text."""
    hits = [f"{f.relative_to(SRC)}:{i}" for f in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if "data.root=\"" in line.replace("'", '"')]
    assert hits == []
