"""The package's architecture, read from its source with ast: import arrows point one way, no module
reaches into another's private names, and the engine side never imports ROS.

Layers, lowest first (a module imports its own subpackage and lower layers only):

    errors < reducers < models < engine < node < client < replay, tools < bench

``replay`` and ``tools`` share a rank and import neither each other. ``engine``, ``models``, ``reducers``
and ``errors`` import no ROS code at all (rclpy, message packages, rosbags, our generated interfaces).
Every import counts, also one inside a function: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

PACKAGE = 'zip_vlm_ros'
SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {'errors': 0, 'reducers': 1, 'models': 2, 'engine': 3, 'node': 4, 'client': 5, 'replay': 6, 'tools': 6,
          'bench': 7}
ROS_FREE = {'errors', 'reducers', 'models', 'engine'}
ROS_TOP_LEVEL = {'rclpy', 'rosbags', 'builtin_interfaces', 'rosidl_runtime_py', 'launch', 'launch_ros'}
GENERATED = {'msg', 'srv', 'action'}  # rosidl output that shares the package name
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 60  # body lines after the docstring


@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    line: int
    target: str          # the imported module (a name of the package's source tree, or an outside one)
    names: tuple = ()    # names taken from it by `from target import ...`

    def __str__(self) -> str:
        taken = f" import {', '.join(self.names)}" if self.names else ''
        return f'{self.module}:{self.line}: from {self.target}{taken}'


def find_modules(root: pathlib.Path, package: str = PACKAGE) -> dict[str, pathlib.Path]:
    """Dotted module names of the package's source files under `root`."""
    modules = {}
    for path in sorted((root / package).rglob('*.py')):
        parts = path.relative_to(root).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        modules['.'.join(parts)] = path
    return modules


def read_imports(modules: dict[str, pathlib.Path]) -> list[Import]:
    """Every import statement of every module, resolved to module names (relative imports included)."""
    found = []
    for module, path in modules.items():
        is_package = path.name == '__init__.py'
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(module, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = module.split('.')[:len(module.split('.')) - node.level + is_package]
                    base = '.'.join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    submodule = f'{base}.{alias.name}'
                    if submodule in modules:  # `from package import module`
                        found.append(Import(module, node.lineno, submodule))
                    else:
                        found.append(Import(module, node.lineno, base, (alias.name,)))
    return found


def group_of(module: str) -> str:
    """The top-level room of a module: 'engine' for zip_vlm_ros.engine.prompts, 'client' for zip_vlm_ros.client."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def import_cycles(modules: dict[str, pathlib.Path], imports: list[Import]) -> list[list[str]]:
    """Cycles among the package's modules, each as the list of modules around it."""
    graph = {module: set() for module in modules}
    for item in imports:
        if item.target in modules and item.target != item.module:
            graph[item.module].add(item.target)
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = 'open'
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 'open':
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def private_imports(modules: dict[str, pathlib.Path], imports: list[Import]) -> list[str]:
    """Private names (``_x``) one module takes from another: imported by name, or read as ``module._x``."""
    problems = [f'{item} (private name)' for item in imports
                if item.target.startswith(PACKAGE) and item.target != item.module
                and any(name.startswith('_') for name in item.names)]
    for module, path in modules.items():
        aliases = {}
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    dotted = alias.name if isinstance(node, ast.Import) else f'{node.module}.{alias.name}'
                    if dotted in modules and dotted != module:
                        aliases[alias.asname or alias.name.split('.')[-1]] = dotted
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith('_') and not node.attr.startswith('__')):
                problems.append(f'{module}:{node.lineno}: {aliases[node.value.id]}.{node.attr} (private name)')
    return problems


def layer_violations(imports: list[Import]) -> list[str]:
    """Imports that point up the layers, across rooms of one rank, or into ROS from the ROS-free rooms."""
    problems = []
    for item in imports:
        group = group_of(item.module)
        target_top = item.target.split('.')[0]
        is_ros = (target_top in ROS_TOP_LEVEL or target_top.endswith('_msgs')
                  or (target_top == PACKAGE and group_of(item.target) in GENERATED))
        if group in ROS_FREE and is_ros:
            problems.append(f'{item} (the {group} layer imports no ROS code)')
            continue
        if target_top != PACKAGE or is_ros:
            continue
        target_group = group_of(item.target)
        if target_group == group or not target_group or group not in LAYERS:
            continue
        if target_group not in LAYERS:
            problems.append(f'{item} (unknown room {target_group!r}: add it to LAYERS)')
        elif LAYERS[target_group] >= LAYERS[group]:
            problems.append(f'{item} ({group} may not import {target_group})')
    return problems


def long_functions(modules: dict[str, pathlib.Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions whose body, docstring excluded, is longer than `limit` lines."""
    problems = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str) and len(body) > 1):
                    body = body[1:]
                length = body[-1].end_lineno - body[0].lineno + 1
                if length > limit:
                    problems.append(f'{module}:{node.lineno}: {node.name} has {length} lines')
    return problems


# ---------------------------------------------------------------------------------------- the package

@pytest.fixture(scope='module')
def package():
    modules = find_modules(SOURCE_ROOT)
    assert f'{PACKAGE}.engine.vlm_engine' in modules, f'no sources found under {SOURCE_ROOT}'
    return modules, read_imports(modules)


def test_no_import_cycle(package):
    modules, imports = package
    cycles = import_cycles(modules, imports)
    assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(cycle) for cycle in cycles)


def test_no_private_name_crosses_modules(package):
    problems = private_imports(*package)
    assert not problems, '\n'.join(problems)


def test_arrows_point_down_the_layers(package):
    modules, imports = package
    unknown = sorted({group_of(module) for module in modules} - set(LAYERS) - {''})
    assert not unknown, f'rooms without a layer: {unknown}; add them to LAYERS'
    problems = layer_violations(imports)
    assert not problems, '\n'.join(problems)


def test_modules_and_functions_stay_readable(package):
    modules, _ = package
    too_long = [f'{module}: {len(path.read_text().splitlines())} lines' for module, path in modules.items()
                if len(path.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not too_long, f'modules over {MAX_MODULE_LINES} lines:\n' + '\n'.join(too_long)
    problems = long_functions(modules)
    assert not problems, f'functions over {MAX_FUNCTION_LINES} lines:\n' + '\n'.join(problems)


def test_the_engine_imports_without_ros(package):
    """What the checks promise, run for real: the engine's import pulls in no ROS module."""
    import subprocess
    import sys

    code = ('import sys, zip_vlm_ros.engine, zip_vlm_ros.reducers;'
            'ros = sorted(m for m in sys.modules if m.split(".")[0] in {"rclpy", "rosbags"}'
            ' or m.split(".")[0].endswith("_msgs") or m.startswith(("zip_vlm_ros.node", "zip_vlm_ros.msg")));'
            'print(ros); sys.exit(1 if ros else 0)')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- the checker

def write_tree(root: pathlib.Path, files: dict[str, str]) -> dict[str, pathlib.Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return find_modules(root)


def test_checker_names_a_cycle(tmp_path):
    modules = write_tree(tmp_path, {
        f'{PACKAGE}/__init__.py': '',
        f'{PACKAGE}/engine/__init__.py': '',
        f'{PACKAGE}/engine/a.py': 'def f():\n    from zip_vlm_ros.engine.b import g\n',
        f'{PACKAGE}/engine/b.py': 'from . import a\n',
    })
    cycles = import_cycles(modules, read_imports(modules))
    assert cycles == [[f'{PACKAGE}.engine.a', f'{PACKAGE}.engine.b', f'{PACKAGE}.engine.a']]


def test_checker_names_private_imports(tmp_path):
    modules = write_tree(tmp_path, {
        f'{PACKAGE}/__init__.py': '',
        f'{PACKAGE}/engine/__init__.py': '',
        f'{PACKAGE}/engine/a.py': '_secret = 1\n',
        f'{PACKAGE}/engine/b.py': 'from zip_vlm_ros.engine.a import _secret\n',
        f'{PACKAGE}/engine/c.py': 'from zip_vlm_ros.engine import a\nvalue = a._secret\n',
    })
    problems = private_imports(modules, read_imports(modules))
    assert len(problems) == 2
    assert problems[0].startswith(f'{PACKAGE}.engine.b:1: from {PACKAGE}.engine.a import _secret')
    assert problems[1] == f'{PACKAGE}.engine.c:2: {PACKAGE}.engine.a._secret (private name)'


def test_checker_names_upward_and_ros_imports(tmp_path):
    modules = write_tree(tmp_path, {
        f'{PACKAGE}/__init__.py': '',
        f'{PACKAGE}/models/__init__.py': '',
        f'{PACKAGE}/models/m.py': 'from zip_vlm_ros.engine.e import thing\nimport rclpy\n',
        f'{PACKAGE}/engine/__init__.py': '',
        f'{PACKAGE}/engine/e.py': 'from zip_vlm_ros.models.m import x\nfrom zip_vlm_ros.msg import VlmResult\n',
        f'{PACKAGE}/replay/__init__.py': '',
        f'{PACKAGE}/replay/r.py': 'from zip_vlm_ros.tools.t import y\nfrom zip_vlm_ros.engine import e\n',
        f'{PACKAGE}/tools/__init__.py': '',
        f'{PACKAGE}/tools/t.py': '',
    })
    problems = layer_violations(read_imports(modules))
    assert problems == [
        f'{PACKAGE}.engine.e:2: from {PACKAGE}.msg import VlmResult (the engine layer imports no ROS code)',
        f'{PACKAGE}.models.m:1: from {PACKAGE}.engine.e import thing (models may not import engine)',
        f'{PACKAGE}.models.m:2: from rclpy (the models layer imports no ROS code)',
        f'{PACKAGE}.replay.r:1: from {PACKAGE}.tools.t import y (replay may not import tools)',
    ]


def test_checker_measures_function_bodies(tmp_path):
    body = '\n'.join(f'    x{index} = {index}' for index in range(MAX_FUNCTION_LINES + 1))
    modules = write_tree(tmp_path, {
        f'{PACKAGE}/__init__.py': '',
        f'{PACKAGE}/long.py': f'def fits():\n    """Doc."""\n{body[:body.rindex(chr(10))]}\n\ndef too_long():\n{body}\n',
    })
    assert long_functions(modules) == [f'{PACKAGE}.long:{MAX_FUNCTION_LINES + 4}: too_long has '
                                       f'{MAX_FUNCTION_LINES + 1} lines']
