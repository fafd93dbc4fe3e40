"""The code's layout: scripts are leaves, docstring examples run, every function has one home."""
import ast
import inspect
import textwrap
import doctest
import importlib
import re
import shlex

import pytest

from conftest import ROOT

SCRIPTS = [
    "train_landmarks.py",
    "train_severity.py",
    "infer.py",
    "datasets/synthetic.py",
    "datasets/real_stenosis.py",
    "tools/audit.py",
]
MODULES = ["data", "tables", "cache", "inputs", "models", "predict", "losses", "training", "viz",
           "phantom"]


def imported_modules(path):
    """Top-level names of every module a Python file imports (import x / from x import y),
    anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def stem(script):
    """'datasets/synthetic.py' -> 'synthetic': the name it is imported by."""
    return script.rsplit("/", 1)[-1][:-3]


def script_imports(root):
    """{script: [other scripts it imports]} for the entry scripts under root."""
    stems = {stem(s) for s in SCRIPTS}
    return {
        script: sorted(imported_modules(root / script) & (stems - {stem(script)}))
        for script in SCRIPTS
    }


def test_no_script_imports_another_script():
    offending = {script: others for script, others in script_imports(ROOT).items() if others}
    assert (
        not offending
    ), f"scripts must be leaves; move the shared piece into a module: {offending}"


def test_the_import_check_catches_a_script_importing_a_script(tmp_path):
    for script in SCRIPTS:
        (tmp_path / script).parent.mkdir(exist_ok=True)
        (tmp_path / script).write_text("import data\n")
    (tmp_path / "infer.py").write_text(
        "import numpy as np\nfrom train_landmarks import predict_sagittal\n"
    )
    (tmp_path / "train_severity.py").write_text("def f():\n    import infer\n")
    assert script_imports(tmp_path) == {"train_landmarks.py": [], "train_severity.py": ["infer"],
                                        "infer.py": ["train_landmarks"],
                                        "datasets/synthetic.py": [],
                                        "datasets/real_stenosis.py": [], "tools/audit.py": []}


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples_run(name):
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, verbose=False)
    assert failures == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_docstring_commands_parse(script):
    """Every `python <script> ...` line of a script's docstring names flags the script accepts."""
    module = importlib.import_module(stem(script))
    commands = re.findall(rf"^\s*python {re.escape(script)} (.+)$", module.__doc__, flags=re.M)
    assert commands, f"{script}: no runnable example in its docstring"
    for command in commands:
        module.parse_args(shlex.split(command))


def test_readme_files_table_lists_every_python_file():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", readme, flags=re.M))
    present = {str(p.relative_to(ROOT)) for p in project_files(ROOT)}
    assert (
        listed == present
    ), f"README Files table: missing {present - listed}, stale {listed - present}"


def project_files(root):
    """The pipeline at the root, the dataset builders and the tools."""
    return sorted(root.glob("*.py")) + sorted(root.glob("datasets/*.py")) + sorted(
        root.glob("tools/*.py"))


def python_files(root):
    return project_files(root) + sorted((root / "tests").glob("*.py"))


def test_no_function_but_main_and_the_training_loops_is_longer_than_about_fifty_lines():
    """main() wires the script and parse_args() lists its flags; train() holds a training loop,
    which reads best in one piece (the step in view, as in nanoGPT's train.py)."""
    long = []
    for path in project_files(ROOT):
        for node in ast.walk(ast.parse(path.read_text())):
            limits = {"main": None, "parse_args": None, "train": 105}
            limit = limits.get(getattr(node, "name", ""), 55)
            length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef) and limit and length > limit:
                long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def long_lines(paths, limit=100):
    """['file:line (length)'] of every line longer than limit characters (a Markdown table row
    cannot be wrapped, so those are left out)."""
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            table_row = path.suffix == ".md" and line.startswith("|")
            if len(line) > limit and not table_row:
                found.append(f"{path.name}:{number} ({len(line)})")
    return found


def test_no_line_is_longer_than_100_characters():
    paths = python_files(ROOT) + [ROOT / "README.md", ROOT / "EXPERIMENTS.md"]
    assert not long_lines(paths), long_lines(paths)


def test_the_line_check_catches_a_long_line(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" + "y = '" + "z" * 95 + "'\n")
    assert long_lines([tmp_path / "a.py"]) == ["a.py:2 (101)"]


def dense_statements(path):
    """['file:line what'] of a lambda bound to a name, a tuple of calls as a statement, or a
    function of more than 6 parameters."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        values = [node.value] if isinstance(node, ast.Assign) else []
        if values and isinstance(node.value, ast.Tuple):  # a, f = 1, lambda x: x
            values = node.value.elts
        if any(isinstance(value, ast.Lambda) for value in values):
            found.append(f"{where} lambda bound to a name")
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
            found.append(f"{where} tuple of calls as a statement")
        if isinstance(node, ast.FunctionDef):
            arguments = node.args
            names = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
            count = len([a for a in names if a.arg != "self"])
            count += bool(arguments.vararg) + bool(arguments.kwarg)
            if count > 6:
                found.append(f"{where} {node.name} takes {count} parameters")
    return found


def test_statements_are_plain_and_functions_take_at_most_six_parameters():
    """The pipeline's files; the synthetic-data generators (synthetic.py, phantom.py) describe
    anatomy with more knobs and are exempt from the parameter count."""
    found = []
    for path in project_files(ROOT):
        generator = path.name in ("synthetic.py", "phantom.py")
        found += [f for f in dense_statements(path) if not (generator and "parameters" in f)]
    assert not found, found


def test_the_statement_check_catches_each_kind(tmp_path):
    code = "f = lambda x: x\nprint(1), print(2)\ndef g(a, b, c, d, e, f, h):\n    pass\n"
    (tmp_path / "a.py").write_text(code)
    assert dense_statements(tmp_path / "a.py") == [
        "a.py:1 lambda bound to a name", "a.py:2 tuple of calls as a statement",
        "a.py:3 g takes 7 parameters"]


def test_readme_inference_recipe_copies_exactly_what_infer_py_imports():
    local = {p.stem for p in ROOT.glob("*.py")}
    needed, todo = set(), ["infer"]
    while todo:  # the project files infer.py reaches through imports, transitively
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += sorted(imported_modules(ROOT / f"{name}.py") & local)
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    copy_line = next(line for line in readme.splitlines()
                     if line.startswith("cp ") and "code/" in line)
    copied = {word[:-3] for word in copy_line.split()[1:] if word.endswith(".py")}
    assert (
        copied == needed
    ), f"README inference recipe: missing {needed - copied}, not needed {copied - needed}"


def readme_commands(text):
    """[(script, [flags])] of every `python <script>.py ...` command in the README's bash blocks,
    continued lines joined and `&&` chains split."""
    blocks = re.findall(r"```bash\n(.*?)```", text.replace("\\\n", " "), flags=re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        for part in line.split("&&"):
            words = shlex.split(part.split("#")[0])
            if len(words) > 1 and words[0] == "python" and words[1].endswith(".py"):
                commands.append((words[1], words[2:]))  # the script's path, its flags
    return commands


def test_every_readme_command_names_flags_its_script_accepts():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert {"datasets/synthetic.py", "train_landmarks.py", "train_severity.py", "infer.py"} <= {
        script for script, _ in commands}
    for script, flags in commands:
        assert (ROOT / script).is_file(), f"README runs {script}, which is not there"
        module = importlib.import_module(stem(script))
        module.parse_args([flag.replace("$k", "0") for flag in flags])
    fake = "```bash\npython infer.py --data-dir d \\\n  --no-such-flag && python x.py\n```\n"
    with pytest.raises(SystemExit):  # the check itself can fail
        for script, flags in readme_commands(fake):
            importlib.import_module(stem(script)).parse_args(flags)


def resolve(dotted):
    """The object a README name `module.function` (or `module.Class.method`) names, or None when
    it is not defined where the name says."""
    module_name, *attributes = dotted.split(".")
    try:
        obj = importlib.import_module(module_name)
    except ImportError:
        return None
    for attribute in attributes:
        obj = getattr(obj, attribute, None)
        if obj is None:
            return None
    defined_in = getattr(obj, "__module__", module_name)
    return obj if defined_in == module_name else None


def names_used(function):
    """Every name and attribute read in a function's body, its docstring left out."""
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    used = set()
    for statement in body:
        for child in ast.walk(statement):
            if isinstance(child, ast.Name):
                used.add(child.id)
            elif isinstance(child, ast.Attribute):
                used.add(child.attr)
    return used


def reading_order_calls(text):
    """[(caller, callee)] of every `a` -> `b`, `c` in the README's reading order: after an arrow,
    each name up to the next arrow is called by the name before the arrow; ';' ends a chain."""
    section = text.split("## Reading order")[1].split("\n## ")[0]
    calls = []
    for clause in re.split(r";|\n\d+\. ", section):
        tokens = re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`|(->)", clause)
        caller, callees = None, []
        for name, arrow in tokens:
            if arrow:
                caller = callees[-1] if callees else caller
                callees = []
            elif caller is not None:
                calls.append((caller, name))
                callees.append(name)
            else:
                callees = [name]
    return calls


def project_names(text):
    """Every backticked `module.name...` of the README whose module is a project module."""
    modules = {p.stem for p in project_files(ROOT)}
    return sorted({name for name in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", text)
                   if name.split(".")[0] in modules and not name.endswith(".py")})


def test_every_name_the_readme_gives_exists_where_it_says():
    names = project_names((ROOT / "README.md").read_text())
    assert len(names) > 20
    missing = [name for name in names if resolve(name) is None]
    assert not missing, f"README names what the code does not hold there: {missing}"
    assert resolve("predict.crop_2p5d") is None  # the check can fail: that lives in inputs


def wrong_calls(calls):
    """The (caller, callee) pairs where the caller's body never names the callee."""
    return [(a, b) for a, b in calls if b.split(".")[-1] not in names_used(resolve(a))]


def test_the_reading_orders_arrows_are_calls_in_the_code():
    calls = reading_order_calls((ROOT / "README.md").read_text())
    assert ("predict.predict_sagittal", "predict.separate_levels") in calls
    assert ("predict.separate_levels", "predict.decode_heatmaps") in calls
    assert ("infer.report_scores", "losses.mean_of_terms") in calls
    assert not wrong_calls(calls), f"README reading order: not calls: {wrong_calls(calls)}"
    # the check can fail: the chain an older README gave (predict_sagittal reaches
    # decode_heatmaps only through separate_levels)
    old = "## Reading order\n5. `predict.predict_sagittal` -> `predict.decode_heatmaps`\n"
    assert wrong_calls(reading_order_calls(old)) == [("predict.predict_sagittal",
                                                      "predict.decode_heatmaps")]
