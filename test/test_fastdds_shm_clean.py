"""The README's command after a crash on the pip route, `.venv/bin/fastdds shm clean`, run as written:
it removes the shared-memory segment a SIGKILLed ROS process left in /dev/shm (setup.sh makes the
wheel's wrapper run the venv's interpreter, which has the psutil the tool imports)."""
import os
import pathlib
import re
import signal
import subprocess
import sys

SHM = pathlib.Path('/dev/shm')
SEGMENT = re.compile(r'^fastdds_[0-9a-z]{16}$')
PUBLISHER = '''
import time
import rclpy
from std_msgs.msg import String
rclpy.init()
node = rclpy.create_node('doomed')
node.create_publisher(String, 'doomed_topic', 10)
print('ready', flush=True)
time.sleep(600)
'''


def segments_locked_by(pid: int) -> set[str]:
    """Fast DDS segments whose `_el` lock file `pid` holds (/proc/locks names the holder and the inode)."""
    inodes = set()
    for line in pathlib.Path('/proc/locks').read_text().splitlines():
        fields = line.split()
        holder = fields[4] if fields[1] != '->' else fields[5]
        device_inode = fields[5] if fields[1] != '->' else fields[6]
        if holder == str(pid):
            inodes.add(int(device_inode.rsplit(':', 1)[1]))
    owned = set()
    for path in SHM.glob('fastdds_*_el'):
        try:
            if path.stat().st_ino in inodes and SEGMENT.match(path.name[:-3]):
                owned.add(path.name[:-3])
        except FileNotFoundError:  # another process's segment went meanwhile
            continue
    return owned


def test_fastdds_shm_clean_removes_a_killed_process_segments():
    doomed = subprocess.Popen([sys.executable, '-c', PUBLISHER], stdout=subprocess.PIPE, text=True)
    try:
        assert doomed.stdout.readline().strip() == 'ready'
        segments = segments_locked_by(doomed.pid)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
    assert segments, 'the ROS process made no shared-memory segment: is Fast DDS using SHM?'
    left = [name for name in segments if (SHM / name).exists() and (SHM / f'{name}_el').exists()]
    assert sorted(left) == sorted(segments), 'SIGKILL leaves the files behind'

    # as the README writes it, with the PATH a user has (its python3 need not be the venv's)
    clean = subprocess.run([str(pathlib.Path(sys.prefix) / 'bin' / 'fastdds'), 'shm', 'clean'],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert 'zombie segments cleaned' in clean.stdout, clean.stdout
    assert not [name for name in segments if (SHM / name).exists() or (SHM / f'{name}_el').exists()]
