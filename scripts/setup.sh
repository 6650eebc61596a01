#!/usr/bin/env bash
# Set up zip_vlm_ros without a ROS distro: a venv with pinned dependencies (ROS 2 wheels, torch CPU,
# transformers, rosbags), our interfaces built from CMakeLists.txt into the venv, and the Python
# sources installed in place (editable). Idempotent: each step is skipped when its inputs are unchanged.
#
#   bash scripts/setup.sh            # venv at ./.venv (ZIP_VLM_VENV overrides)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ZIP_VLM_VENV:-$repo/.venv}
python_bin=${PYTHON:-python3}
cd "$repo"

say() { printf '[setup] %s\n' "$*"; }
digest() { cat "$@" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating venv $venv"
  "$python_bin" -m venv "$venv"
fi
py=$venv/bin/python
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the ROS 2 wheels need Python 3.11, found %s" % sys.version.split()[0]'

# 1. pinned dependencies
req_stamp=$venv/.zip_vlm_ros.requirements
req_digest=$(digest requirements.txt requirements-ml.txt requirements-ray.txt)
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_digest" ]; then
  say "installing pinned dependencies (requirements.txt, requirements-ml.txt, requirements-ray.txt)"
  # Ray is optional for users (vlm_replay --ray only); installed here so that its tests run in CI.
  "$py" -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-ray.txt
  echo "$req_digest" > "$req_stamp"
else
  say "dependencies up to date"
fi

# 2. our .msg/.srv, generated with the wheels' rosidl into the venv
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
iface_stamp=$venv/.zip_vlm_ros.interfaces
iface_digest=$(digest CMakeLists.txt package.xml msg/*.msg srv/*.srv action/*.action requirements.txt)
if [ "$(cat "$iface_stamp" 2>/dev/null)" != "$iface_digest" ] || [ ! -d "$site/zip_vlm_ros/msg" ]; then
  say "building interfaces (msg/, srv/, action/) into $venv"
  # The wheels' CMake exports name the include dirs of the machine they were built on; point them at
  # this interpreter's Python headers and numpy.
  py_include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_include=$("$py" -c 'import numpy; print(numpy.get_include())')
  for f in "$venv"/share/*/cmake/*rosidl_generator_pyExport.cmake; do
    sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$py_include#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_include#g" "$f"
  done
  build=$venv/build/zip_vlm_ros_interfaces
  rm -rf "$build"; mkdir -p "$build"
  export CMAKE_PREFIX_PATH=$venv AMENT_PREFIX_PATH=$venv PATH=$venv/bin:$PATH
  cmake -S "$repo" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$py" \
        -DZIP_VLM_ROS_INSTALL_PYTHON=OFF -DBUILD_TESTING=OFF > "$build.log" 2>&1 \
    && make -C "$build" -j"$(nproc)" install >> "$build.log" 2>&1 \
    || { tail -n 40 "$build.log"; say "interface build failed; full log: $build.log"; exit 1; }
  # Without __init__.py the generated folder is a namespace portion: the editable sources (a regular
  # package) are found first and zip_vlm_ros/__init__.py extends __path__ to reach msg/ and srv/.
  rm -f "$site/zip_vlm_ros/__init__.py"
  # ament_python_install_package also writes an egg-info named zip_vlm_ros; pip would take it for our
  # distribution and delete the generated folder when installing the editable sources.
  rm -rf "$site"/zip_vlm_ros-*.egg-info
  echo "$iface_digest" > "$iface_stamp"
else
  say "interfaces up to date"
fi

# 3. the sources, editable (compat mode = a plain path entry, so the namespace merge above works)
if ! "$py" -m pip show --quiet zip_vlm_ros >/dev/null 2>&1 \
   || [ "$(cat "$venv/.zip_vlm_ros.setup" 2>/dev/null)" != "$(digest setup.py setup.cfg)" ]; then
  say "installing zip_vlm_ros (editable)"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
      --config-settings editable_mode=compat -e "$repo"
  digest setup.py setup.cfg > "$venv/.zip_vlm_ros.setup"
else
  say "zip_vlm_ros installed (editable)"
fi

# 4. Fast DDS's `fastdds` tool (`fastdds shm clean` after a crash). The wheel's wrapper runs `python3`
# from PATH, which lacks the psutil (pinned in requirements-ml.txt) the tool imports: it exited 1 and
# cleaned nothing. Point it at this venv's interpreter, relative to itself so the venv can move.
fastdds_tool=$venv/tools/fastdds/fastdds.py
if [ -f "$fastdds_tool" ]; then
  cat > "$venv/bin/fastdds" <<'SH'
#!/bin/sh
# Written by zip_vlm_ros scripts/setup.sh: Fast DDS's tool, run by this venv's interpreter.
dir=$(dirname "$0")
exec "$dir/python" "$dir/../tools/fastdds/fastdds.py" "$@"
SH
  chmod +x "$venv/bin/fastdds"
fi

"$py" - <<'PY'
import zip_vlm_ros
from zip_vlm_ros.msg import VlmResult
from zip_vlm_ros.srv import Ask, AskMany, DescribeScene
from zip_vlm_ros.action import Ask as AskAction
print('[setup] ok: zip_vlm_ros from', ', '.join(zip_vlm_ros.__path__))
PY
