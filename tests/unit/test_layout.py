"""The package keeps its shape: no hub module, a loop that reads on a few screens, batches assembled in one place."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dtrain"
MAX_PACKAGE_IMPORTS = 12


def package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at run time (an ``if TYPE_CHECKING:`` block names types only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dtrain":
            names |= {f"dtrain.{a.name}" for a in node.names} if node.module == "dtrain" else {node.module}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "dtrain"}
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_most_of_the_package(path):
    imports = package_imports(path)
    assert len(imports) <= MAX_PACKAGE_IMPORTS, f"{path.name} imports {len(imports)} dtrain modules: {sorted(imports)}"


def test_the_trainer_reads_top_to_bottom_in_under_400_lines():
    source = (PACKAGE / "trainer.py").read_text()
    assert len(source.splitlines()) < 400
    methods = re.findall(r"^    def (\w+)", source, flags=re.M)
    public = [m for m in methods if not m.startswith("_")]
    assert public == ["train", "train_step", "evaluate", "save_checkpoint", "close"]


def test_batches_are_assembled_only_by_the_loader():
    """``collate``/``collate_packed`` are called in dtrain/data/loader.py alone (the trainer, eval, the export probe and
    launch/preview.py all go through it)."""
    callers = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            # collate()/collate_packed() themselves; the loader's own ``loader.collate`` method is the way in.
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if called == "collate_packed" or (called == "collate" and isinstance(node.func, ast.Name)):
                callers.append(path.relative_to(PACKAGE.parent).as_posix())
    assert set(callers) == {"dtrain/data/loader.py"}
