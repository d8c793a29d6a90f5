"""`colcon build` of the package in a ROS 2 workspace gives the ament layout, and a node runs from it.

colcon (colcon-core + colcon-ros, from PyPI) builds the ament_python package exactly as in a ROS workspace; the
test then runs the colcon-installed `sim_arm` executable (not the venv's pip install) and checks over DDS that it
publishes, with the share files (URDF, config, checkpoint) found through the colcon prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLCON = Path(sys.executable).parent / "colcon"
NODES = ("sim_arm", "context_encoder", "policy", "adaptation")
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "install", "log", "runs", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache", ".mql_cache", "*.so")


@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory) -> Path:
    if not COLCON.is_file():
        pytest.skip("colcon is not installed in this environment (pip install colcon-core colcon-ros)")
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT, ws / "src" / "mql_ros", ignore=IGNORED)
    result = subprocess.run([str(COLCON), "build"], cwd=ws, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return ws / "install" / "mql_ros"


def _colcon_env(prefix: Path) -> dict[str, str]:
    site = next(prefix.glob("lib/python3*/site-packages"))
    return {**os.environ, "AMENT_PREFIX_PATH": str(prefix), "PYTHONPATH": str(site)}


def test_colcon_build_installs_the_ament_layout(colcon_install: Path):
    share = colcon_install / "share" / "mql_ros"
    assert (colcon_install / "share" / "ament_index" / "resource_index" / "packages" / "mql_ros").is_file()
    assert (share / "package.xml").is_file()
    for name in ("launch/sim.launch.py", "launch/gazebo.launch.py", "launch/robot.launch.py", "config/mql.yaml",
                 "config/controllers.yaml", "urdf/mql_arm.urdf", "checkpoints/arm_reach.pt"):
        assert (share / name).is_file(), f"{name} missing from the colcon install"
    for node in NODES:
        exe = colcon_install / "lib" / "mql_ros" / node
        assert exe.is_file() and os.access(exe, os.X_OK), f"lib/mql_ros/{node} is not an executable"
    site = next(colcon_install.glob("lib/python3*/site-packages"))
    assert list(site.glob("mql_ros/core/_gru_kernel*.so")), "colcon did not build the C GRU kernel"


def test_colcon_installs_the_command_line_where_ros2_run_finds_it(colcon_install: Path):
    """In a ROS workspace console scripts go to lib/mql_ros (setup.cfg), not bin/: `ros2 run mql_ros mql-ros` is
    how a colcon user runs the command line, which is what `ros2 run` does with this path."""
    exe = colcon_install / "lib" / "mql_ros" / "mql-ros"
    assert exe.is_file() and os.access(exe, os.X_OK), "lib/mql_ros/mql-ros is not an executable"
    result = subprocess.run([str(exe), "train", "--help"], env=_colcon_env(colcon_install), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--family" in result.stdout, result.stdout + result.stderr


def test_colcon_installed_package_finds_its_share_files_through_the_ament_index(colcon_install: Path):
    probe = ("import mql_ros, mql_ros.core.paths as p; print(mql_ros.__file__); print(p.share_dir())")
    out = subprocess.run([sys.executable, "-c", probe], env=_colcon_env(colcon_install),
                         cwd=colcon_install, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert Path(out[0]).is_relative_to(colcon_install), f"imported {out[0]}, not the colcon install"
    assert Path(out[1]) == colcon_install / "share" / "mql_ros"


def test_colcon_installed_sim_arm_publishes_joint_states(colcon_install: Path, ros_graph):
    from rosgraph_helpers import ros_env
    from sensor_msgs.msg import JointState

    from mql_ros.nodes.common import SENSOR_QOS

    ros_graph.probe.subscribe(JointState, "/joint_states", SENSOR_QOS)
    env = {**ros_env(ros_graph.domain), **_colcon_env(colcon_install)}
    log = ros_graph.dir / "colcon_sim_arm.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(colcon_install / "lib" / "mql_ros" / "sim_arm")], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ros_graph.dir, start_new_session=True)
    try:
        ros_graph.probe.wait_for(lambda: len(ros_graph.probe.received("/joint_states")) >= 5, 60,
                                 f"/joint_states from the colcon-installed sim_arm\n{log.read_text()[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(15)
