"""The package layout and the import rules of DESIGN.md's layers."""
import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("orchestrator", "workers", "kernels", "dashboard")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"bnnctl." + ".".join(p.parent.relative_to(ROOT).parts)
             for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")}
    found = {"bnnctl" if name == "bnnctl.orchestrator._root" else name for name in found}  # the top package
    assert found == listed and config["package-dir"]["bnnctl"] == "orchestrator/_root"
    assert all(config["package-dir"][f"bnnctl.{layer}"] == layer for layer in LAYERS)


def test_workers_never_import_orchestration_libraries():
    forbidden = ("ray", "mlflow", "optuna", "sqlalchemy", "bnnctl.orchestrator", "bnnctl.dashboard")
    for path in (ROOT / "workers").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] in forbidden or m.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_kernels_import_nothing_of_the_project():
    for path in (ROOT / "kernels").rglob("*.py"):
        bad = [m for m in _imports(path) if m.startswith("bnnctl")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_unsafe_loading():
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            text = path.read_text()
            assert "yaml.load(" not in text and "eval(" not in text.replace("model.eval(", "").replace(".eval()", "")


def test_the_wheel_ships_templates_static_files_and_kernel_sources(tmp_path):
    """A non-editable install must find the dashboard's pages and the kernels' C/CUDA sources."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("bnnctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("dashboard/templates", "*.html"), ("dashboard/static", "*"), ("kernels", "*.c"),
                            ("kernels", "*.cu"), ("orchestrator/templates", "*")):
        files = [p for p in (ROOT / folder).glob(pattern) if p.is_file()]
        assert files
        for p in files:
            assert f"bnnctl/{p.relative_to(ROOT)}" in names, p


LAYERS = {"kernels": set(), "workers": {"kernels"}, "orchestrator": {"workers", "kernels"},
          "dashboard": {"orchestrator", "workers", "kernels"}}
#: the one place a lower layer starts a higher one: `bnnctl dashboard` serves the dashboard app
ENTRY_POINTS = {"orchestrator/cli/dashboard.py": {"dashboard"}}
HEAVY = ("ray", "mlflow", "optuna", "sqlalchemy")


def test_layers_import_only_downwards_and_workers_import_no_orchestration_library():
    """dashboard -> orchestrator -> workers -> kernels, read from every module's imports (lazy ones too)."""
    import ast

    for layer, allowed in LAYERS.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.ImportFrom):  # relative: resolved against the module's package
                    package = ["bnnctl", *path.relative_to(ROOT).parent.parts]
                    base = package[:len(package) - (node.level - 1)]
                    names = [".".join(base + ([node.module] if node.module else []))]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "bnnctl" and len(parts) > 1 and parts[1] != layer:
                        assert parts[1] in allowed | ENTRY_POINTS.get(rel, set()), f"{rel} imports {name}"
                    if layer in ("workers", "kernels"):
                        assert parts[0] not in HEAVY, f"{rel} imports {name}"


#: A function longer than this reads as several steps: name them (STYLE.md; issue 18).
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    """Also the command for the lengths: every function over MAX_FUNCTION_LINES, longest first."""
    long = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append((lines, f"{path.relative_to(ROOT)}:{node.name}"))
    assert sorted(long, reverse=True) == []


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore is its module's own: another module that needs it gets a
    public name (the seams between modules are what a reader of one module can rely on)."""
    found = []
    for layer in ("orchestrator", "workers", "kernels", "dashboard"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                project = node.level > 0 or (node.module or "").startswith("bnnctl")
                for alias in node.names:
                    if project and alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    assert found == []


def _module_name(path: Path) -> str:
    parts = ["bnnctl", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_import_nodes(tree: ast.AST):
    """Import statements that run (lazy ones inside functions too), not those under
    ``if TYPE_CHECKING:`` (annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from pkg import mod`` is an import of the
    module ``pkg.mod``)."""
    files = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in _runtime_import_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    """Modules import one way: no set of project modules imports itself round (lazy imports in
    functions count; ``if TYPE_CHECKING:`` annotations do not)."""
    graph = import_graph()
    assert len(graph) > 80 and graph["bnnctl.workers.fused"] >= {"bnnctl.workers.blocks", "bnnctl.workers.layers"}
    assert find_cycles(graph) == []
    # the check itself: the cycle the fused-inference refactor removed is found when put back
    graph["bnnctl.workers.layers"] = graph["bnnctl.workers.layers"] | {"bnnctl.workers.fused"}
    assert find_cycles(graph) == [["bnnctl.workers.blocks", "bnnctl.workers.fused", "bnnctl.workers.layers"]]
