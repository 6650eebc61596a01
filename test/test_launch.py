"""config/vlm.yaml and launch/vlm.launch.py against the parameters vlm_node really declares.

`ros2 launch` (launch, launch_ros) is not on PyPI, so the launch file is checked through its AST
here, and through launch_ros only where that is importable (a colcon workspace).
"""
import ast
import importlib.util

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.node import Node

from conftest import REPO_ROOT
from zip_vlm_ros.node.vlm_node import NODE_PARAMETERS, VlmNode, camera_parameter_specs, declared_parameter_names

CONFIG = REPO_ROOT / 'config' / 'vlm.yaml'
LAUNCH = REPO_ROOT / 'launch' / 'vlm.launch.py'
LAUNCH_ARGUMENTS = {'params_file', 'namespace', 'model', 'device', 'token_budget', 'image_topic'}


def flatten(tree, prefix=''):
    """{'camera': {'front': {'topic': 'x'}}} -> {'camera.front.topic': 'x'} (how ROS reads YAML)."""
    flat = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(flatten(value, name + '.'))
        else:
            flat[name] = value
    return flat


@pytest.fixture(scope='module')
def yaml_parameters():
    document = yaml.safe_load(CONFIG.read_text())
    assert list(document) == ['/**'] and list(document['/**']) == ['ros__parameters']
    return flatten(document['/**']['ros__parameters'])


@pytest.fixture(scope='module')
def node_from_yaml():
    """VlmNode built in this process from config/vlm.yaml (autostart is not run: no model load)."""
    context = Context()
    # Own namespace: this node's endpoints must not pass for a later test's node process.
    rclpy.init(args=['--ros-args', '-r', '__ns:=/launch_test', '--params-file', str(CONFIG)], context=context)
    node = VlmNode(context=context)
    plain = Node('plain_reference_node', context=context)
    rclpy_own = set(plain.list_parameters([], 0).names)
    yield node, set(node.list_parameters([], 0).names) - rclpy_own
    plain.destroy_node()
    node.destroy_node()
    rclpy.shutdown(context=context)
    context.destroy()


def test_yaml_lists_exactly_the_parameters_the_node_declares(yaml_parameters, node_from_yaml):
    node, declared = node_from_yaml
    assert set(yaml_parameters) == declared
    assert declared == declared_parameter_names(yaml_parameters['cameras'])


def test_yaml_values_are_the_node_defaults(yaml_parameters, node_from_yaml):
    """The file documents the defaults: running with or without it is the same node."""
    node, _ = node_from_yaml
    defaults = {spec.name: spec.default for spec in NODE_PARAMETERS}
    for index, camera in enumerate(yaml_parameters['cameras']):
        defaults.update({spec.name: spec.default for spec in camera_parameter_specs(camera, index)})
    for name, value in yaml_parameters.items():
        assert value == pytest.approx(defaults[name]), name  # approx: 0.84375 written for 54/64
        assert node.get_parameter(name).value == pytest.approx(value), name


def test_every_parameter_is_described(node_from_yaml):
    node, declared = node_from_yaml
    for name in declared:
        description = node.describe_parameter(name).description
        assert len(description) > 20, f'{name} has no useful description: {description!r}'
        assert 'at runtime' in description, name


def test_every_yaml_parameter_has_a_comment():
    lines = CONFIG.read_text().splitlines()
    for index, line in enumerate(lines):
        key, _, value = line.strip().partition(':')
        if not value.strip() or line.lstrip().startswith('#') or key in ('/**', 'ros__parameters'):
            continue  # comments, blank lines and groups (camera:, front:)
        assert lines[index - 1].lstrip().startswith('#'), f'config/vlm.yaml: {key} has no comment above it'


def launch_calls(name):
    tree = ast.parse(LAUNCH.read_text())
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == name]


def keyword(call, name):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def test_launch_arguments_are_declared_with_descriptions():
    arguments = launch_calls('DeclareLaunchArgument')
    names = [call.args[0].value for call in arguments]
    assert sorted(names) == sorted(LAUNCH_ARGUMENTS)
    for call in arguments:
        description = keyword(call, 'description')
        assert isinstance(description, ast.Constant) and len(description.value) > 15, call.args[0].value
        assert keyword(call, 'default_value') is not None
    assert launch_calls('get_package_share_directory'), 'params_file must default to the installed config'


def test_launch_node_action_matches_the_package():
    """The Node action runs the registered console script under the node's own name, remaps the
    default camera topic, and overrides only parameters that exist."""
    [node] = launch_calls('Node')
    assert keyword(node, 'package').value == 'zip_vlm_ros'
    assert keyword(node, 'executable').value == 'vlm_node'
    assert keyword(node, 'name').value == 'zip_vlm'
    assert "'vlm_node = zip_vlm_ros.node.vlm_node:main'" in (REPO_ROOT / 'setup.py').read_text()
    module = ast.parse(LAUNCH.read_text())
    constants = {target.id: statement.value for statement in module.body if isinstance(statement, ast.Assign)
                 for target in statement.targets if isinstance(target, ast.Name)}
    assert constants['DEFAULT_CAMERA_TOPIC'].value == camera_parameter_specs('front', 0)[0].default
    overrides = constants['OVERRIDES']  # {'model': str, ...}: parameter name -> how to parse it
    specs = {spec.name: spec for spec in NODE_PARAMETERS}
    for name, parse in zip(overrides.keys, overrides.values):
        assert name.value in specs, name.value
        assert type(specs[name.value].default).__name__ == parse.id, name.value


def test_launch_description_with_launch_ros(monkeypatch):
    """Where launch_ros exists: the description yields the expected Node with the model override."""
    launch = pytest.importorskip('launch', reason='launch is not on PyPI: needs a ROS 2 install')
    launch_ros = pytest.importorskip('launch_ros', reason='launch_ros is not on PyPI: needs a ROS 2 install')
    spec = importlib.util.spec_from_file_location('vlm_launch', LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, 'get_package_share_directory', lambda package: str(REPO_ROOT))
    description = module.generate_launch_description()
    arguments = [entity for entity in description.entities
                 if isinstance(entity, launch.actions.DeclareLaunchArgument)]
    assert {argument.name for argument in arguments} == LAUNCH_ARGUMENTS
    context = launch.LaunchContext()
    for argument in arguments:
        argument.execute(context)
    context.launch_configurations['model'] = '/models/llava'
    [opaque] = [entity for entity in description.entities
                if isinstance(entity, launch.actions.OpaqueFunction)]
    [node] = opaque.execute(context)
    assert isinstance(node, launch_ros.actions.Node)
    assert (node.node_package, node.node_executable) == ('zip_vlm_ros', 'vlm_node')
    assert context.launch_configurations['params_file'].endswith('config/vlm.yaml')
