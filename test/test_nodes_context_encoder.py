"""The context encoder node alone: zero context on reset and episode start; malformed input is rejected."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("mql_ros.core.transitions")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rosgraph_helpers import diagnostic_values  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float32MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.core.runtime import DeployedPolicy  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS  # noqa: E402

pytestmark = pytest.mark.ros


def test_encoder_publishes_a_zero_context_on_reset_service_and_episode_start(ros_graph, tiny_checkpoint):
    probe = ros_graph.probe
    contexts = probe.subscribe(Float32MultiArray, "mql/context", RELIABLE_QOS)
    ros_graph.start("context_encoder", checkpoint=str(tiny_checkpoint))
    dim = DeployedPolicy.from_checkpoint(tiny_checkpoint).context_dim
    assert probe.call(Trigger, "mql/reset_context", Trigger.Request()).success
    probe.wait_for(lambda: len(contexts) >= 1, 10.0, "a context after /mql/reset_context")
    episode = probe.node.create_publisher(String, "mql/episode", LATCHED_QOS)
    episode.publish(String(data=json.dumps({"event": "start", "task_id": "t/0", "task": {}})))
    probe.wait_for(lambda: len(contexts) >= 2, 10.0, "a context at the episode start")
    assert all(len(m.data) == dim and np.allclose(m.data, 0.0) for m in probe.received("mql/context"))


def test_encoder_rejects_malformed_joint_states_and_keeps_running(ros_graph, tiny_checkpoint):
    probe = ros_graph.probe
    probe.subscribe(DiagnosticArray, "/diagnostics", 10)
    enc = ros_graph.start("context_encoder", checkpoint=str(tiny_checkpoint))
    pub = probe.node.create_publisher(JointState, "joint_states", 10)
    probe.wait_for(lambda: pub.get_subscription_count() > 0, 30.0, "the encoder subscribing")
    bad = JointState(name=["nope_joint"], position=[float("nan")], velocity=[0.0])

    def rejected() -> bool:
        pub.publish(bad)  # best effort: repeat until one is seen
        return any(int(d.get("rejected_joint_state", 0)) > 0
                   for d in diagnostic_values(probe, "context_encoder"))

    probe.wait_for(rejected, 20.0, "the malformed joint state rejected on /diagnostics")
    assert enc.proc.poll() is None


def test_encoder_publishes_step_k_context_on_its_reward_before_command_k_plus_1(ros_graph, tiny_checkpoint):
    """As in training, command k+1 must be computed from a context holding step k: the context goes out when
    step k's reward arrives, and a later reward before command k+1 replaces it (the step rule's r_k)."""
    from std_msgs.msg import Float64, Float64MultiArray

    from mql_ros.core.robot import RobotSpec

    probe = ros_graph.probe
    robot = RobotSpec.from_urdf()
    contexts = probe.subscribe(Float32MultiArray, "mql/context", RELIABLE_QOS)
    ros_graph.start("context_encoder", checkpoint=str(tiny_checkpoint))
    node = probe.node
    pubs = {"episode": node.create_publisher(String, "mql/episode", LATCHED_QOS),
            "arm": node.create_publisher(JointState, "joint_states", 10),
            "grip": node.create_publisher(JointState, "gripper/joint_states", 10),
            "reward": node.create_publisher(Float64, "mql/reward", RELIABLE_QOS),
            "arm_cmd": node.create_publisher(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS),
            "grip_cmd": node.create_publisher(Float64MultiArray, "gripper_controller/commands", RELIABLE_QOS)}
    for name, pub in pubs.items():
        probe.wait_for(lambda p=pub: p.get_subscription_count() > 0, 30.0, f"the encoder subscribing to {name}")
    reference = DeployedPolicy.from_checkpoint(tiny_checkpoint, robot).new_context()
    arm_q, grip_q = np.array([0.1, -0.2, 0.3, 0.05]), np.array([0.01, 0.01])

    def settle() -> None:  # messages on different topics: one at a time, so the encoder gets them in order
        time.sleep(0.3)

    def last() -> np.ndarray:
        return np.asarray(probe.received("mql/context")[-1].data)

    def send_state(k: int) -> np.ndarray:
        q = arm_q + 0.01 * k
        pubs["arm"].publish(JointState(name=list(robot.arm_joints), position=q.tolist(), velocity=[0.0] * 4))
        pubs["grip"].publish(JointState(name=list(robot.gripper_joints), position=grip_q.tolist(),
                                        velocity=[0.0, 0.0]))
        settle()
        return robot.observation(q, np.zeros(4), grip_q, np.zeros(2))

    def send_command(k: int) -> np.ndarray:
        arm_cmd, grip_cmd = (arm_q + 0.02 * k).tolist(), [0.02]
        pubs["arm_cmd"].publish(Float64MultiArray(data=arm_cmd))
        pubs["grip_cmd"].publish(Float64MultiArray(data=grip_cmd))
        settle()
        return robot.commands_to_action(arm_cmd, grip_cmd)

    def send_reward(r: float) -> None:
        pubs["reward"].publish(Float64(data=r))
        settle()

    pubs["episode"].publish(String(data=json.dumps({"event": "start", "task_id": "t/0", "task": {}})))
    probe.wait_for(lambda: len(contexts) >= 1, 10.0, "the zero context at the episode start")
    s0 = send_state(0)
    a0 = send_command(0)
    send_reward(-1.0)
    probe.wait_for(lambda: len(contexts) >= 2, 10.0, "a context on step 0's reward, before command 1")
    np.testing.assert_allclose(last(), reference.preview(s0, a0, -1.0), atol=1e-6)
    send_reward(-0.5)  # a second reward before command 1: the step rule's r_0 is this one
    probe.wait_for(lambda: len(contexts) >= 3, 10.0, "a context on the later reward")
    np.testing.assert_allclose(last(), reference.preview(s0, a0, -0.5), atol=1e-6)
    s1 = send_state(1)
    a1 = send_command(1)  # completes step 0 with r_0 = -0.5: the same context, not published again
    reference.push(s0, a0, -0.5)
    assert len(contexts) == 3
    send_reward(-0.25)
    probe.wait_for(lambda: len(contexts) >= 4, 10.0, "a context on step 1's reward, before command 2")
    np.testing.assert_allclose(last(), reference.preview(s1, a1, -0.25), atol=1e-6)
