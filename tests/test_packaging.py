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
    assert found == listed
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
