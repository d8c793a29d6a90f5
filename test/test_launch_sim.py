"""launch_testing check of sim.launch.py: the whole graph comes up, closes the loop and shuts down cleanly.

Runs where launch_testing is installed (a ROS 2 workspace: `colcon test` or `launch_test`); skipped on
machines without it. test_nodes_*.py covers the same behaviour with node processes started by pytest.
"""

import os
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_testing")
pytest.importorskip("launch_ros")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from std_msgs.msg import Float32MultiArray, Float64MultiArray  # noqa: E402

from mql_ros.core.robot import RobotSpec  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "sim.launch.py"


@pytest.mark.launch_test
def generate_test_description():
    sim = launch.actions.IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                                  launch_arguments={"archive_dir": os.path.join(
                                                      os.environ.get("TMPDIR", "/tmp"), "mql_launch_test")}.items())
    return launch.LaunchDescription([sim, launch_testing.actions.ReadyToTest()])


class TestGraphClosesTheLoop(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("mql_launch_test_probe")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def wait_for(self, topic, msg_type, count, timeout=30.0):
        received = []
        sub = self.node.create_subscription(msg_type, topic, received.append, 10)
        try:
            end = time.monotonic() + timeout
            while len(received) < count and time.monotonic() < end:
                rclpy.spin_once(self.node, timeout_sec=0.1)
        finally:
            self.node.destroy_subscription(sub)
        return received

    def test_context_is_published(self):
        self.assertGreaterEqual(len(self.wait_for("/mql/context", Float32MultiArray, 5)), 5)

    def test_arm_commands_stay_within_joint_limits(self):
        robot = RobotSpec.from_urdf()
        commands = self.wait_for("/arm_controller/commands", Float64MultiArray, 10)
        self.assertGreaterEqual(len(commands), 10)
        for msg in commands:
            self.assertEqual(len(msg.data), robot.n_arm)
            for value, lo, hi in zip(msg.data, robot.arm_lower, robot.arm_upper, strict=True):
                self.assertTrue(lo - 1e-9 <= value <= hi + 1e-9, (value, lo, hi))


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_node_exits_cleanly(self, proc_info):
        # SIGINT from the launch service: rclpy nodes exit 0, or -2/-15 if the signal ends the process.
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
