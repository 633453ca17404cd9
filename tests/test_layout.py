"""The package's layout rules, checked mechanically, and checkpoints of the old layout still loading.

Rules (see README "How it is built"): verbs are `pipeline/<verb>.py` (they call
`app.run`) and nothing imports them; no library module reads absl flags; no
import cycle between modules (imports inside functions count); no function
over 80 lines; no file over 500 lines (`models/bit.py` may be longer: one idea).
"""
import ast
import os

import keras
import numpy as np
import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "pipeline")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = {"pipeline.models.bit": 650}
DEFAULT_MAX_FILE_LINES = 500
FIXTURES = os.path.join(REPO, "tests", "fixtures", "layout_v1")


def _modules():
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path[:-3], REPO).replace(os.sep, ".").removesuffix(".__init__")
                out[name] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read()) for name, path in MODULES.items()}


def _is_verb(name):
    return "app.run(" in open(MODULES[name], encoding="utf-8").read()


def _imports(name):
    """Project modules `name` imports, at any depth of its code."""
    package = name if MODULES[name].endswith("__init__.py") else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            deps.update(s for s in subs if s in MODULES)
            if base in MODULES and any(s not in MODULES for s in subs):
                deps.add(base)
    return deps - {name}


def test_no_library_module_reads_absl_flags():
    readers = [name for name, tree in TREES.items() if not _is_verb(name) and name != "pipeline.cli" and any(
        (isinstance(n, ast.Name) and n.id == "FLAGS") or (isinstance(n, ast.Attribute) and n.attr == "FLAGS")
        for n in ast.walk(tree))]
    assert readers == []


def test_verbs_are_not_imported_by_library_code():
    verbs = {name for name in MODULES if _is_verb(name)}
    assert {"pipeline.train", "pipeline.finetune", "pipeline.export", "pipeline.report"} <= verbs
    assert all(name.count(".") == 1 for name in verbs), "verbs live at pipeline/<verb>.py"
    users = {name: sorted(_imports(name) & verbs) for name in MODULES if name not in verbs}
    assert {k: v for k, v in users.items() if v} == {}


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES}
    done, cycle = set(), []

    def visit(node, stack):
        if node in stack:
            cycle.extend(stack[stack.index(node):] + [node])
            return True
        if node in done:
            return False
        done.add(node)
        return any(visit(dep, stack + [node]) for dep in sorted(graph[node]))

    assert not any(visit(name, []) for name in sorted(MODULES)), " -> ".join(cycle)


def test_functions_and_files_are_short():
    long_functions = [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines"
                      for name, tree in TREES.items() for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_functions == []
    long_files = {name: lines for name, path in MODULES.items()
                  if (lines := sum(1 for _ in open(path, encoding="utf-8")))
                  > MAX_FILE_LINES.get(name, DEFAULT_MAX_FILE_LINES)}
    assert long_files == {}


def test_no_private_names_of_other_project_modules():
    """`module._name` across project modules: make the name public or keep the code together."""
    offenders = []
    for name, tree in TREES.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                for a in node.names:
                    if a.name.startswith("_"):
                        offenders.append(f"{name}: from {node.module} import {a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and aliases.get(node.value.id) in MODULES):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert offenders == []


# --------------------------------------------------------------------------- old checkpoints

@pytest.mark.parametrize("name", ["resnet20_w025_last", "bit_tiny", "caffe_tiny"])
def test_checkpoints_written_by_the_flat_layout_still_load(name):
    """Made by the pre-subpackage code (custom layers, a StepSchedule in the optimizer config)."""
    import pipeline.models  # noqa: F401  (registers the custom layers)
    from pipeline.training import schedules  # noqa: F401  (registers StepSchedule)
    expected = np.load(os.path.join(FIXTURES, "expected.npz"))
    path = os.path.join(FIXTURES, f"{name}.keras")
    model = keras.saving.load_model(path, compile=False, safe_mode=False)
    outputs = np.asarray(model(expected[f"{name}/inputs"], training=False))
    np.testing.assert_allclose(outputs, expected[f"{name}/outputs"], rtol=1e-5, atol=1e-6)
    if name == "resnet20_w025_last":  # with its optimizer and learning-rate schedule
        compiled = keras.saving.load_model(path, safe_mode=False)
        assert type(compiled.optimizer.learning_rate).__name__ == "StepSchedule" or float(
            compiled.optimizer.learning_rate) >= 0
