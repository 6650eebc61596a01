"""pip route (no ROS distro): installs the Python package and console scripts.

A colcon build does not use this file: CMakeLists.txt installs the package with ament_cmake_python
next to the generated interfaces. scripts/setup.sh runs `pip install -e .` in compat mode after
building the interfaces into the venv.
"""
from glob import glob

from setuptools import find_packages, setup

package_name = 'zip_vlm_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=[package_name, package_name + '.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
    ],
    install_requires=[],  # pinned in requirements.txt; scripts/setup.sh installs them
    zip_safe=False,
    maintainer='zip_vlm_ros maintainers',
    maintainer_email='maintainers@zip-vlm-ros.dev',
    description='LLaVA + VisionZip vision-language node for ROS 2',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'vlm_node = zip_vlm_ros.node.vlm_node:main',
            'vlm_bench = zip_vlm_ros.bench.cli:main',
            'vlm_replay = zip_vlm_ros.replay:main',
            'vlm_tiny_model = zip_vlm_ros.tools.tiny_model:main',
            'vlm_published_replica = zip_vlm_ros.tools.published_replica:main',
            'vlm_make_sample_bag = zip_vlm_ros.tools.sample_bag:main',
            'vlm_demo = zip_vlm_ros.tools.demo:main',
        ],
    },
)
