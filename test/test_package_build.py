"""The ROS 2 distro route, as far as it can run without a distro: the same CMakeLists.txt that
`colcon build` uses, configured with the Python install on, lays out a package `ros2 run` and
`ros2 launch` can use, and the installed Python package holds both our sources and the interfaces."""
import os
import pathlib
import shutil
import subprocess
import sys

from conftest import REPO_ROOT

PACKAGE_FILES = ['CMakeLists.txt', 'package.xml', 'resource', 'msg', 'srv', 'action', 'bin', 'zip_vlm_ros',
                 'launch', 'config']
EXECUTABLES = ['vlm_node', 'vlm_bench', 'vlm_replay', 'vlm_tiny_model', 'vlm_published_replica', 'vlm_make_sample_bag',
               'vlm_demo']


def test_cmake_install_layout_matches_a_colcon_install(tmp_path):
    venv = pathlib.Path(sys.prefix)
    source = tmp_path / 'src' / 'zip_vlm_ros'
    source.mkdir(parents=True)
    # A copy outside the repository: the venv lives inside it, and CMake refuses exported include
    # paths under the source tree.
    for name in PACKAGE_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(src, source / name)
    build, prefix = tmp_path / 'build', tmp_path / 'install'
    env = dict(os.environ, CMAKE_PREFIX_PATH=str(venv), AMENT_PREFIX_PATH=str(venv),
               PATH=f'{venv / "bin"}:{os.environ["PATH"]}')
    configure = subprocess.run(
        ['cmake', '-S', str(source), '-B', str(build), f'-DCMAKE_INSTALL_PREFIX={prefix}',
         f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF'],
        env=env, capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    make = subprocess.run(['make', '-C', str(build), f'-j{os.cpu_count()}', 'install'],
                          env=env, capture_output=True, text=True)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]

    for exe in EXECUTABLES:  # where `ros2 run zip_vlm_ros <exe>` looks
        assert os.access(prefix / 'lib' / 'zip_vlm_ros' / exe, os.X_OK), exe
    share = prefix / 'share' / 'zip_vlm_ros'
    assert (share / 'launch' / 'vlm.launch.py').is_file()
    assert (share / 'config' / 'vlm.yaml').is_file()
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'zip_vlm_ros').is_file()

    site = prefix / 'lib' / f'python{sys.version_info.major}.{sys.version_info.minor}' / 'site-packages'
    probe = subprocess.run(
        [sys.executable, '-c',
         'import zip_vlm_ros, zip_vlm_ros.msg, zip_vlm_ros.srv, zip_vlm_ros.reducers.visionzip as v;'
         'print(zip_vlm_ros.__path__[0]); print(zip_vlm_ros.msg.__file__); print(v.__file__);'
         'from zip_vlm_ros.srv import Ask; from zip_vlm_ros.action import Ask as AskAction;'
         'print(Ask.Request().question == "" and AskAction.Feedback().delta == "")'],
        env=dict(os.environ, PYTHONPATH=str(site)), cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    package_dir, msg_init, visionzip_file, ok = probe.stdout.split()
    for path in (package_dir, msg_init, visionzip_file):
        assert pathlib.Path(path).is_relative_to(site), path
    assert ok == 'True'
