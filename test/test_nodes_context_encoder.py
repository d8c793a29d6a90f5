"""The context encoder node alone: zero context on reset and episode start; malformed input is rejected."""

from __future__ import annotations

import json

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
