"""Project layout rules: entry scripts are thin, documented, never import each other, and tests run them only
through `main` (their helpers would be library code)."""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("data_gen", "train", "eval", "bench")
SCRIPTS = sorted(p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py"))
# TRL's scripts/sft.py shape (parse -> call the library -> save), as `ruff format` lays it out.
MAX_SCRIPT_LINES = 170
SCRIPT_ATTRIBUTES = {"main", "DATACLASSES"}  # all a test may take from an entry script


def test_script_dirs_are_not_packages():
    assert len(SCRIPTS) >= 4
    for d in SCRIPT_DIRS:
        assert not (ROOT / d / "__init__.py").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_latentsim_and_libraries(script):
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree)
    assert doc and (f"{script.parent.name}/{script.name}" in doc or script.parent.name == "bench"), (
        "the docstring must show the command"
    )
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            assert name.split(".")[0] not in SCRIPT_DIRS, f"{script.name} imports {name}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_are_thin(script):
    n = len(script.read_text().splitlines())
    assert n <= MAX_SCRIPT_LINES, f"{script.name} has {n} lines; move library code into src/latentsim/"


def script_attributes_used_by(test_file: Path) -> list[str]:
    """Attributes taken from `load_script(...)` results in a test file (directly or through a variable)."""
    tree = ast.parse(test_file.read_text())
    is_load = lambda n: isinstance(n, ast.Call) and getattr(n.func, "id", None) == "load_script"  # noqa: E731
    names = {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and is_load(n.value)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    return [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and (is_load(n.value) or (isinstance(n.value, ast.Name) and n.value.id in names))
    ]


def test_tests_use_only_main_of_entry_scripts():
    test_files = sorted((ROOT / "tests").glob("*.py"))
    used = {f.name: script_attributes_used_by(f) for f in test_files}
    assert sum(len(v) for v in used.values()) >= 10  # the checker sees the smoke tests
    for name, attrs in used.items():
        assert set(attrs) <= SCRIPT_ATTRIBUTES, (
            f"{name} uses {sorted(set(attrs) - SCRIPT_ATTRIBUTES)} of a script"
        )


def test_latentsim_never_imports_heavy_gpu_packages_at_module_level():
    paths = sorted((ROOT / "src" / "latentsim").rglob("*.py"))
    assert len(paths) >= 20 and any(p.parent.name == "config" for p in paths)
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("vllm", "deepspeed") for m in mods), path.name


def test_unknown_launch_verb_prints_usage_and_exits_2():
    result = subprocess.run([str(ROOT / "launch.sh"), "no-such-verb"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "./launch.sh quickstart" in result.stdout and "./launch.sh test" in result.stdout


def latentsim_imports() -> dict[str, set[str]]:
    """{module: the latentsim modules it imports, at module level or inside a function}, e.g.
    `latentsim.sweep` -> {`latentsim.simulators`, ...}; `from latentsim import x` counts as importing x."""
    src = ROOT / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "latentsim").rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentsim"):
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("latentsim")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_package_imports_form_no_circle():
    """Read top to bottom: scripts -> stages (sweep, whole_layer, ...) -> simulators -> prompts, models,
    io."""
    graph = latentsim_imports()
    assert len(graph) > 40

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(
            m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen)) for m in graph[start]
        )

    # A package's __init__ re-exports its own modules: an edge into it from inside is not a circle.
    inside = lambda a, b: b == a.rpartition(".")[0]  # noqa: E731
    circles = [
        (a, b) for a, targets in graph.items() for b in targets if not inside(a, b) and reaches(b, a, {b})
    ]
    assert not circles, f"import circles through {sorted(circles)[:6]}"


def test_stages_reach_simulators_only_through_the_factory():
    """whole_layer, rewrite and generation import no sweep module; only latentsim.simulators constructs
    scorers."""
    graph = latentsim_imports()
    for stage in ("latentsim.whole_layer", "latentsim.rewrite", "latentsim.generation", "latentsim.patching"):
        assert "latentsim.sweep" not in graph[stage], stage
    scorer_classes = {
        "HFScorer",
        "DenseScorer",
        "VLLMScorer",
        "FakeScorer",
        "FeatureReference",
        "LexicalReader",
    }
    for path in sorted((ROOT / "src" / "latentsim").rglob("*.py")) + SCRIPTS:
        if path.parent.name == "simulators":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                assert name not in scorer_classes and name != "create", f"{path.name} builds a scorer"
