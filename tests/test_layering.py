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
    assert "vaqkd.engine.train" in g["vaqkd.cli.commands"]  # the commands import the engine inside their functions
    assert "vaqkd.errors" in g["vaqkd.config.schema"]


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


def _top_level_names(tree: ast.Module) -> set[str]:
    """What a module defines itself (def, class, assignment, also under a top-level if/try); not what it imports."""
    out: set[str] = set()
    for node in tree.body:
        for n in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(n.name)
            elif isinstance(n, ast.Assign | ast.AnnAssign):
                for target in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    out |= {x.id for x in ast.walk(target) if isinstance(x, ast.Name)}
    return out


def test_names_are_imported_from_the_module_that_defines_them():
    """`from vaqkd.m import name` only where m defines name (a package's __init__ may re-export): a module's own
    imports are not an interface, so moving a name never leaves old import paths alive by accident."""
    defines = {_module(f): _top_level_names(ast.parse(f.read_text()))
               for f in SRC.rglob("*.py") if f.name != "__init__.py"}  # fmt: skip
    roots = [SRC] + [SRC.parents[1] / d for d in ("tests", "benchmarks", "scripts") if (SRC.parents[1] / d).is_dir()]
    wrong = [f"{f.name}:{node.lineno} {node.module}.{a.name}"
             for root in roots for f in sorted(root.rglob("*.py"))
             for node in ast.walk(ast.parse(f.read_text()))
             if isinstance(node, ast.ImportFrom) and not node.level and node.module in defines
             for a in node.names
             if a.name not in defines[node.module] and f"{node.module}.{a.name}" not in defines]  # fmt: skip
    assert wrong == []
    # what a module imports is not what it defines: engine.setup imports load_weights (and uses it), defines none
    assert "resolve_device" in defines["vaqkd.engine.setup"] and "load_weights" not in defines["vaqkd.engine.setup"]
