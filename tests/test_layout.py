"""Project layout rules: entry scripts are thin, documented, and never import each other."""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("data_gen", "train", "eval", "bench")
SCRIPTS = sorted(p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py"))


def test_script_dirs_are_not_packages():
    assert len(SCRIPTS) >= 4
    for d in SCRIPT_DIRS:
        assert not (ROOT / d / "__init__.py").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_latentsim_and_libraries(script):
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree)
    assert doc and (f"{script.parent.name}/{script.name}" in doc or script.parent.name == "bench"), \
        "the docstring must show the command"
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert name.split(".")[0] not in SCRIPT_DIRS, f"{script.name} imports {name}"


def test_latentsim_never_imports_heavy_gpu_packages_at_module_level():
    for path in (ROOT / "src" / "latentsim").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("vllm", "deepspeed") for m in mods), path.name


def test_unknown_launch_verb_prints_usage_and_exits_2():
    result = subprocess.run([str(ROOT / "launch.sh"), "no-such-verb"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "./launch.sh quickstart" in result.stdout and "./launch.sh test" in result.stdout
