"""Launch vlm_node (node zip_vlm) with parameters from a YAML file.

    ros2 launch zip_vlm_ros vlm.launch.py model:=/models/llava-1.5-7b-hf image_topic:=/camera/image_raw

Equivalent without `ros2 launch` (the pip route has no launch tools):

    vlm_node --ros-args --params-file config/vlm.yaml -p model:=/models/llava-1.5-7b-hf \
        -r image_raw:=/camera/image_raw

`model`, `device` and `token_budget` override the params file only when given.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# The default (first) camera's topic in config/vlm.yaml; `image_topic` remaps it.
DEFAULT_CAMERA_TOPIC = 'image_raw'
# Launch arguments that override the params file when not empty, and how to read them.
OVERRIDES = {'model': str, 'device': str, 'token_budget': int}


def _node(context, *args, **kwargs):
    """The Node action, built once the arguments are known so that empty ones override nothing."""
    overrides = {}
    for name, parse in OVERRIDES.items():
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = parse(value)
    parameters = [LaunchConfiguration('params_file').perform(context)]
    if overrides:
        parameters.append(overrides)
    return [Node(
        package='zip_vlm_ros',
        executable='vlm_node',
        name='zip_vlm',
        namespace=LaunchConfiguration('namespace'),
        parameters=parameters,
        remappings=[(DEFAULT_CAMERA_TOPIC, LaunchConfiguration('image_topic'))],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory('zip_vlm_ros'), 'config', 'vlm.yaml')
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file', default_value=default_params,
            description='YAML file with the node parameters (/**: ros__parameters:)'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='namespace of the node; its services and topics move with it'),
        DeclareLaunchArgument(
            'model', default_value='',
            description='LLaVA checkpoint directory or hub id (empty: the params file value)'),
        DeclareLaunchArgument(
            'device', default_value='',
            description='auto, cpu, cuda or cuda:N (empty: the params file value)'),
        DeclareLaunchArgument(
            'token_budget', default_value='',
            description='visual tokens per image, 1..576 for LLaVA-1.5, 1..2928 for LLaVA-NeXT-7B (empty: the params file value)'),
        DeclareLaunchArgument(
            'image_topic', default_value=DEFAULT_CAMERA_TOPIC,
            description='image topic of the default (first) camera, remapped from image_raw'),
        OpaqueFunction(function=_node),
    ])
