"""The simulated arm node as hardware: named state at sim_rate, episode events, commands, reset, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rosgraph_helpers import diagnostic_values  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS  # noqa: E402

pytestmark = pytest.mark.ros
ROBOT = RobotSpec.from_urdf()


def watch_sim(probe) -> None:
    probe.subscribe(JointState, "joint_states", SENSOR_QOS)
    probe.subscribe(JointState, "gripper/joint_states", SENSOR_QOS)
    probe.subscribe(Float64, "mql/reward", RELIABLE_QOS)
    probe.subscribe(String, "mql/episode", LATCHED_QOS)
    probe.subscribe(DiagnosticArray, "/diagnostics", 10)


def events(probe) -> list[dict]:
    return [json.loads(m.data) for m in probe.received("mql/episode")]


def from_first_start(probe) -> list[dict]:
    """The episode events from the first start received on (none before one arrives)."""
    ev = events(probe)
    return ev[next((i for i, e in enumerate(ev) if e["event"] == "start"), len(ev)):]


def test_sim_publishes_named_state_reward_and_episode_events_at_sim_rate(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=10)
    probe.wait_for(lambda: probe.received("joint_states"), 60.0, "joint states")
    # Latched, but only the last 10: with 0.2 s episodes a slow discovery can miss the first ones.
    probe.wait_for(lambda: len(from_first_start(probe)) >= 4, 30.0, "two complete episodes")
    states = probe.stamped("joint_states")
    assert all(list(m.name) == list(ROBOT.arm_joints) and len(m.velocity) == ROBOT.n_arm for _, m in states)
    assert all(list(m.name) == list(ROBOT.gripper_joints) for m in probe.received("gripper/joint_states"))
    assert all(m.header.stamp.sec > 0 for _, m in states)
    times = np.array(probe.published_ns("joint_states")[-20:]) / 1e9  # the sim's clock, not this process's
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 35.0 < rate < 65.0, f"state rate {rate:.1f} Hz, sim_rate 50"
    assert all(np.isfinite(m.data) for m in probe.received("mql/reward"))
    ev = from_first_start(probe)
    assert ev[0]["task_id"] == "arm_reach/test/0" and "target" in ev[0]["task"]
    assert [e["event"] for e in ev[:4]] == ["start", "end", "start", "end"]
    assert [e["episode"] for e in ev[:4]] == [ev[0]["episode"]] * 2 + [ev[0]["episode"] + 1] * 2


def test_sim_moves_toward_commanded_targets_and_holds_without_commands(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: probe.received("joint_states"), 60.0, "joint states")
    target = np.array([0.5, 0.3, -0.4, 0.2])
    arm_pub = probe.node.create_publisher(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    probe.wait_for(lambda: arm_pub.get_subscription_count() > 0, 20.0, "the sim subscribing to commands")
    arm_pub.publish(Float64MultiArray(data=target.tolist()))
    probe.wait_for(lambda: np.allclose(probe.received("joint_states")[-1].position, target, atol=0.05), 20.0,
                   "the arm reaching the commanded target")
    # No further commands: the arm holds the last target.
    n = len(probe.received("joint_states"))
    probe.wait_for(lambda: len(probe.received("joint_states")) > n + 25, 10.0, "half a second more of state")
    assert np.allclose(probe.received("joint_states")[-1].position, target, atol=0.05)


def test_sim_rejects_nan_and_wrong_length_commands_and_keeps_running(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    sim = ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: probe.received("joint_states"), 60.0, "joint states")
    arm_pub = probe.node.create_publisher(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    grip_pub = probe.node.create_publisher(Float64MultiArray, "gripper_controller/commands", RELIABLE_QOS)
    probe.wait_for(lambda: arm_pub.get_subscription_count() > 0, 20.0, "the sim subscribing to commands")
    before = np.array(probe.received("joint_states")[-1].position)
    arm_pub.publish(Float64MultiArray(data=[0.1, float("nan"), 0.0, 0.0]))
    arm_pub.publish(Float64MultiArray(data=[0.1, 0.2]))
    grip_pub.publish(Float64MultiArray(data=[float("inf")]))
    probe.wait_for(lambda: any(int(d.get("rejected_arm_command", 0)) >= 2 and
                               int(d.get("rejected_gripper_command", 0)) >= 1
                               for d in diagnostic_values(probe, "sim_arm")),
                   10.0, "rejections on /diagnostics")
    n = len(probe.received("joint_states"))
    probe.wait_for(lambda: len(probe.received("joint_states")) > n + 10, 10.0, "the sim still publishing")
    last = probe.received("joint_states")[-1]
    assert np.all(np.isfinite(last.position)) and np.allclose(last.position, before, atol=0.05)
    assert sim.proc.poll() is None
    assert "rejected arm_command" in sim.log()


def test_sim_reset_service_and_task_parameter_start_new_episodes(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: events(probe), 60.0, "the first episode start")
    request = SetParameters.Request(parameters=[ParameterMsg(
        name="task_index", value=ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=3))])
    result = probe.call(SetParameters, "sim_arm/set_parameters", request)
    assert result.results[0].successful, result.results[0].reason
    bad = SetParameters.Request(parameters=[ParameterMsg(
        name="task_index", value=ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=999))])
    refused = probe.call(SetParameters, "sim_arm/set_parameters", bad).results[0]
    assert not refused.successful and "999" in refused.reason
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: [e["task_id"] for e in events(probe) if e["event"] == "start"][-1:] ==
                   ["arm_reach/test/3"], 10.0, "an episode of the new task after /sim/reset")
    ev = events(probe)
    assert [e["event"] for e in ev] == ["start", "end", "start"] and ev[1]["task_id"] == "arm_reach/test/0"


def test_sim_refuses_out_of_range_sim_rate(ros_graph):
    proc = ros_graph.start("sim_arm", sim_rate=0.0)
    assert proc.proc.wait(60) == 2
    assert "sim_rate" in proc.log() and "1000" in proc.log()
