"""The simulated arm node as hardware: named state at sim_rate, episode events, commands, reset, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rosgraph_helpers import diagnostic_values  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.core.tasks import resolve_family, split_tasks  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS  # noqa: E402
from mql_ros.sim.arm import check_task  # noqa: E402

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
    # the events are latched, the states are not: on a loaded machine the probe can hold the first two episodes'
    # events and a single state (seen once in CI, rate nan)
    probe.wait_for(lambda: len(probe.published_ns("joint_states")) >= 20, 30.0, "20 joint states")
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


def set_param(probe, name: str, value):
    """Set one sim_arm parameter; the SetParametersResult (successful, reason)."""
    if isinstance(value, str):
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    elif isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    elif isinstance(value, list):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY, double_array_value=value)
    else:
        pv = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=pv)])
    return probe.call(SetParameters, "sim_arm/set_parameters", request).results[0]


def start_ids(probe) -> list[str]:
    return [e["task_id"] for e in events(probe) if e["event"] == "start"]


def test_sim_refuses_a_task_json_outside_the_physical_ranges_naming_the_key_value_and_range(ros_graph):
    """Found by an audit: a 1e160 m target was accepted and 100 of 102 rewards were -inf; a 1e308 kg payload
    made MuJoCo unstable."""
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: events(probe), 60.0, "the first episode start")
    far = set_param(probe, "task_json", json.dumps({"target": [1e160, 0, 0]}))
    assert not far.successful and "target" in far.reason and "1e+160" in far.reason and "1.5 m" in far.reason
    heavy = set_param(probe, "task_json", json.dumps({"target": [0.3, 0.1, 0.12], "payload_mass": 1e308}))
    assert not heavy.successful
    assert "payload_mass" in heavy.reason and "1e+308" in heavy.reason and "[0.0, 10.0]" in heavy.reason
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: len(start_ids(probe)) >= 2, 10.0, "a new episode after /sim/reset")
    assert start_ids(probe)[-1] == "arm_reach/test/0"  # the task in effect did not change
    n = len(probe.received("mql/reward"))
    probe.wait_for(lambda: len(probe.received("mql/reward")) > n + 10, 10.0, "rewards of the new episode")
    assert all(np.isfinite(m.data) for m in probe.received("mql/reward"))


def test_sim_validates_family_split_and_index_even_while_task_json_is_set(ros_graph):
    """Found by an audit: with task_json set any family, split or index was accepted, after which clearing
    task_json was refused (the parameters no longer described a valid configuration)."""
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: events(probe), 60.0, "the first episode start")
    assert set_param(probe, "task_json", json.dumps({"target": [0.3, 0.1, 0.12]})).successful
    for name, value, named in (("family", "os:path", "os:path"), ("family", "point_goal", "point_goal"),
                               ("family", "no_such_family", "no_such_family"), ("task_split", "bogus", "bogus"),
                               ("task_index", 99999, "99999")):
        refused = set_param(probe, name, value)
        assert not refused.successful and named in refused.reason, (name, value, refused.reason)
    assert set_param(probe, "task_index", 3).successful  # a valid index is taken while task_json overrides it
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: start_ids(probe)[-1:] == ["custom"], 10.0, "an episode of the task_json task")
    assert set_param(probe, "task_json", "").successful  # the parameters still describe a valid task
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: start_ids(probe)[-1:] == ["arm_reach/test/3"], 10.0,
                   "an episode of the split task once task_json is cleared")


def task_values(probe) -> dict:
    """The sim's task.* parameters, by task key."""
    names = ["task.target", "task.payload_mass", "task.damping_scale", "task.friction_scale"]
    values = probe.call(GetParameters, "sim_arm/get_parameters", GetParameters.Request(names=names)).values
    return {"target": list(values[0].double_array_value), **{n[5:]: v.double_value for n, v in
                                                                zip(names[1:], values[1:], strict=True)}}


def test_sim_task_values_are_parameters_that_show_the_next_task_and_set_a_custom_one(ros_graph):
    """INTERFACES.md: the task parameters (goal, payload mass, friction...) are ROS parameters, changeable at run
    time. Only family/split/index and a JSON string were."""
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000, family="arm_payload")
    probe.wait_for(lambda: events(probe), 60.0, "the first episode start")
    split = split_tasks(resolve_family("arm_payload"), "test")
    assert task_values(probe) == check_task(split[0]) == events(probe)[0]["task"]

    assert set_param(probe, "task.payload_mass", 2.5).successful
    assert task_values(probe) == {**check_task(split[0]), "payload_mass": 2.5}
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: start_ids(probe)[-1:] == ["custom"], 10.0, "an episode of the changed task")
    assert events(probe)[-1]["task"] == {**check_task(split[0]), "payload_mass": 2.5}

    heavy = set_param(probe, "task.payload_mass", 50.0)
    assert not heavy.successful and "task.payload_mass" in heavy.reason, heavy.reason
    far = set_param(probe, "task.target", [5.0, 0.0, 0.0])
    assert not far.successful and "target" in far.reason and "1.5 m" in far.reason, far.reason
    assert task_values(probe)["payload_mass"] == 2.5  # what was refused changed nothing

    assert set_param(probe, "task_index", 3).successful  # a new selection: the task.* parameters show it
    probe.wait_for(lambda: task_values(probe) == check_task(split[3]), 5.0, "the task.* parameters of test/3")
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: start_ids(probe)[-1:] == ["arm_payload/test/3"], 10.0, "an episode of test/3")
    assert events(probe)[-1]["task"] == check_task(split[3])


def test_sim_task_values_given_at_start_up_override_the_split_task_or_exit_2_naming_the_range(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000, **{"task.friction_scale": 2.0})
    probe.wait_for(lambda: events(probe), 60.0, "the first episode start")
    first = events(probe)[0]
    assert first["task_id"] == "custom" and first["task"]["friction_scale"] == 2.0
    bad = ros_graph.start("sim_arm", name="sim_arm_bad", **{"task.friction_scale": 500.0})
    assert bad.proc.wait(60) == 2
    assert "task.friction_scale" in bad.log() and "100" in bad.log()


UNSTABLE_ARM = '''
import numpy as np

from mql_ros.sim.arm import ArmEnv
from mql_ros.sim.families import ArmReachFamily


class UnstableArm(ArmEnv):
    """At the 5th tick of each episode, in turn: the physics diverges (a velocity MuJoCo cannot integrate),
    the reward is NaN, the joint state is inf (an env that misses its own divergence)."""
    MODES = ("physics", "reward", "state")
    episodes, ticks = -1, 0

    def reset(self, **kwargs):
        self.episodes, self.ticks = self.episodes + 1, 0
        return super().reset(**kwargs)

    def _mode(self):
        return self.MODES[self.episodes % 3] if self.ticks == 5 else ""

    def advance(self, seconds):
        self.ticks += 1
        if self._mode() == "physics":
            self.data.qvel[:] = 1e12
        return super().advance(seconds)

    def current_reward(self):
        return float("nan") if self._mode() == "reward" else super().current_reward()

    def joint_state(self):
        q, dq, gq, gdq = super().joint_state()
        if self._mode() == "state":
            dq[0] = np.inf
        return q, dq, gq, gdq


class UnstableReach(ArmReachFamily):
    def make_env(self, task):
        return UnstableArm(task, episode_steps=self.episode_steps, reward=self.reward)
'''


def test_sim_never_publishes_a_diverged_or_non_finite_step_and_ends_the_episode_saying_why(ros_graph):
    probe = ros_graph.probe
    watch_sim(probe)
    (ros_graph.dir / "unstable_arm.py").write_text(UNSTABLE_ARM)  # the node's working directory is importable
    sim = ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000, family="unstable_arm:UnstableReach")

    def diverged_ends() -> list[dict]:
        return [e for e in from_first_start(probe) if e["event"] == "end" and "diverged" in e]

    probe.wait_for(lambda: len(diverged_ends()) >= 3, 60.0, "three episodes cut short by the physics")
    reasons = " | ".join(e["diverged"] for e in diverged_ends())
    assert "physics diverged" in reasons and "reward is not finite" in reasons, reasons
    assert "joint state is not finite" in reasons, reasons
    ev = from_first_start(probe)
    assert [e["event"] for e in ev[:6]] == ["start", "end"] * 3  # each cut-short episode ended, a new one began
    assert [e["episode"] for e in ev[:6:2]] == [ev[0]["episode"] + k for k in range(3)]
    # every episode publishes 4 good steps before the bad one: wait for some (discovery of the reward publisher can
    # lag the episode events on a loaded machine; seen once in CI)
    probe.wait_for(lambda: probe.received("mql/reward"), 20.0, "rewards of the good steps")
    assert all(np.isfinite(m.data) for m in probe.received("mql/reward"))
    for topic in ("joint_states", "gripper/joint_states"):
        assert all(np.all(np.isfinite(m.position)) and np.all(np.isfinite(m.velocity))
                   for m in probe.received(topic))
    probe.wait_for(lambda: any(int(d.get("diverged_episodes", 0)) >= 3 and "ended at step 5" in d["_message"]
                               for d in diagnostic_values(probe, "sim_arm")), 10.0,
                   "the cut-short episodes on /diagnostics")
    assert "ended at step 5" in sim.log() and sim.proc.poll() is None


def sim_endpoints(probe) -> dict[str, int]:
    """How many of each topic endpoint and service sim_arm has in the graph (as the probe sees it)."""
    node = probe.node
    counts = {f"sub {t}": sum(i.node_name == "sim_arm" for i in node.get_subscriptions_info_by_topic(t))
              for t in ("/arm_controller/commands", "/gripper_controller/commands")}
    counts.update({f"pub {t}": sum(i.node_name == "sim_arm" for i in node.get_publishers_info_by_topic(t))
                   for t in ("/joint_states", "/gripper/joint_states", "/mql/reward", "/mql/episode")})
    counts["srv /sim/reset"] = node.count_services("/sim/reset")
    return counts


def test_sim_lifecycle_cleanup_then_configure_gives_the_same_node(ros_graph):
    """Found by an audit: configure after cleanup created a second set of command subscriptions, publishers
    and /sim/reset services (there was no on_cleanup)."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    probe = ros_graph.probe
    watch_sim(probe)
    sim = ros_graph.start("sim_arm", sim_rate=50.0, episode_steps=100000)
    probe.wait_for(lambda: probe.received("joint_states"), 60.0, "joint states")
    once = dict.fromkeys(sim_endpoints(probe), 1)
    probe.wait_for(lambda: sim_endpoints(probe) == once, 20.0, lambda: f"one of each endpoint: {sim_endpoints(probe)}")

    def transition(tid: int) -> None:
        request = ChangeState.Request(transition=Transition(id=tid))
        assert probe.call(ChangeState, "sim_arm/change_state", request).success, tid

    transition(Transition.TRANSITION_DEACTIVATE)
    transition(Transition.TRANSITION_CLEANUP)
    none = dict.fromkeys(once, 0)
    probe.wait_for(lambda: sim_endpoints(probe) == none, 20.0,
                   lambda: f"cleanup destroying sim_arm's endpoints: {sim_endpoints(probe)}")
    transition(Transition.TRANSITION_CONFIGURE)
    transition(Transition.TRANSITION_ACTIVATE)
    n = len(probe.received("joint_states"))
    probe.wait_for(lambda: len(probe.received("joint_states")) > n, 20.0, "joint states after re-activation")
    probe.wait_for(lambda: sim_endpoints(probe) == once, 20.0,
                   lambda: f"one of each endpoint again: {sim_endpoints(probe)}")
    n = len(probe.received("joint_states"))
    probe.wait_for(lambda: len(probe.received("joint_states")) > n + 50, 10.0, "a second more of state")
    assert sim_endpoints(probe) == once  # and it stays so (nothing left over to be discovered late)
    # the re-configured node works: it follows commands and serves /sim/reset
    target = np.array([0.4, 0.2, -0.3, 0.1])
    arm_pub = probe.node.create_publisher(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    probe.wait_for(lambda: arm_pub.get_subscription_count() > 0, 20.0, "the sim subscribing to commands")
    arm_pub.publish(Float64MultiArray(data=target.tolist()))
    probe.wait_for(lambda: np.allclose(probe.received("joint_states")[-1].position, target, atol=0.05), 20.0,
                   "the arm reaching the commanded target")
    starts = len(start_ids(probe))
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: len(start_ids(probe)) > starts, 10.0, "a new episode after /sim/reset")
    assert "Traceback" not in sim.log() and sim.proc.poll() is None
