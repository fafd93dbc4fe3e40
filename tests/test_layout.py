"""The code's layout: scripts are leaves, docstring examples run, every function has one home."""
import ast
import doctest
import importlib
import re
import shlex

import pytest

from conftest import ROOT

SCRIPTS = ["train_landmarks.py", "train_severity.py", "infer.py", "synthetic.py", "real_stenosis.py"]
MODULES = ["data", "tables", "cache", "inputs", "models", "losses", "training", "viz", "phantom"]


def imported_modules(path):
    """Top-level names of every module a Python file imports (import x / from x import y), anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def script_imports(root):
    """{script: [other scripts it imports]} for the entry scripts under root."""
    stems = {s[:-3] for s in SCRIPTS}
    return {script: sorted(imported_modules(root / script) & (stems - {script[:-3]})) for script in SCRIPTS}


def test_no_script_imports_another_script():
    offending = {script: others for script, others in script_imports(ROOT).items() if others}
    assert not offending, f"scripts must be leaves; move the shared piece into a module: {offending}"


def test_the_import_check_catches_a_script_importing_a_script(tmp_path):
    for script in SCRIPTS:
        (tmp_path / script).write_text("import data\n")
    (tmp_path / "infer.py").write_text("import numpy as np\nfrom train_landmarks import predict_sagittal\n")
    (tmp_path / "train_severity.py").write_text("def f():\n    import infer\n")
    assert script_imports(tmp_path) == {"train_landmarks.py": [], "train_severity.py": ["infer"], "infer.py": ["train_landmarks"],
                                        "synthetic.py": [], "real_stenosis.py": []}


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, verbose=False)
    assert failures == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_docstring_commands_parse(script):
    """Every `python <script> ...` line of a script's docstring names flags the script accepts."""
    module = importlib.import_module(script[:-3])
    commands = re.findall(rf"^\s*python {re.escape(script)} (.+)$", module.__doc__, flags=re.M)
    assert commands, f"{script}: no runnable example in its docstring"
    for command in commands:
        module.parse_args(shlex.split(command))


def test_readme_files_table_lists_every_python_file():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", readme, flags=re.M))
    present = {p.name for p in ROOT.glob("*.py")}
    assert listed == present, f"README Files table: missing {present - listed}, stale {listed - present}"


def test_no_function_but_main_is_longer_than_about_fifty_lines():
    long = []
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name != "main" and node.end_lineno - node.lineno + 1 > 55:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_readme_inference_recipe_copies_exactly_what_infer_py_imports():
    local = {p.stem for p in ROOT.glob("*.py")}
    needed, todo = set(), ["infer"]
    while todo:  # the project files infer.py reaches through imports, transitively
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += sorted(imported_modules(ROOT / f"{name}.py") & local)
    copy_line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("cp ") and "code/" in line)
    copied = {word[:-3] for word in copy_line.split()[1:] if word.endswith(".py")}
    assert copied == needed, f"README inference recipe: missing {needed - copied}, not needed {copied - needed}"
