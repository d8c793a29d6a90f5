"""The policy node against a probe that plays the robot: exact commands, holding, hot swaps, bad input."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.duration import Duration  # noqa: E402
from rclpy.time import Time  # noqa: E402
from rosgraph_helpers import diagnostic_values  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float32MultiArray, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.core.runtime import DeployedPolicy  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS  # noqa: E402

pytestmark = pytest.mark.ros
ROBOT = RobotSpec.from_urdf()
ARM_Q = np.array([0.1, -0.2, 0.3, -0.4])
GRIP_Q = np.array([0.01, 0.01])


def input_publishers(probe) -> tuple:
    """Publishers of what the policy acts on: arm state, gripper state, context."""
    node = probe.node
    return (node.create_publisher(JointState, "joint_states", 10),
            node.create_publisher(JointState, "gripper/joint_states", 10),
            node.create_publisher(Float32MultiArray, "mql/context", 10))


class FakeRobot:
    """Publishes arm/gripper state and a context from the test process, at a steady rate in a thread."""

    def __init__(self, probe, context_dim: int):
        node = probe.node
        self.arm_pub, self.grip_pub, self.ctx_pub = input_publishers(probe)
        self.context = np.linspace(-0.5, 0.5, context_dim).astype(np.float32)
        self.arm_q = ARM_Q.copy()
        self.names = list(ROBOT.arm_joints)
        self.running = True
        self.sent = 0  # arm states published
        self.stamp_offset: float | None = None  # s added to the clock for the arm states' header stamp; None: unstamped
        self.clock = node.get_clock()
        self.timer = node.create_timer(0.02, self.publish)

    def publish(self) -> None:
        if not self.running:
            return
        # Joints deliberately in reversed order: the node must match them by name.
        arm = JointState(name=self.names[::-1], position=self.arm_q[::-1].tolist(), velocity=[0.0] * 4)
        if self.stamp_offset is not None:
            arm.header.stamp = (self.clock.now() + Duration(seconds=self.stamp_offset)).to_msg()
        grip = JointState(name=list(ROBOT.gripper_joints), position=GRIP_Q.tolist(), velocity=[0.0, 0.0])
        self.grip_pub.publish(grip)
        self.ctx_pub.publish(Float32MultiArray(data=self.context.tolist()))
        self.arm_pub.publish(arm)  # last: in trigger=state mode the arm state is what makes the policy act
        self.sent += 1


def start_policy(ros_graph, checkpoint, **params):
    probe = ros_graph.probe
    probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    probe.subscribe(Float64MultiArray, "gripper_controller/commands", RELIABLE_QOS)
    probe.subscribe(DiagnosticArray, "/diagnostics", 10)
    ros_graph.start("policy", checkpoint=str(checkpoint), **params)
    return probe


def expected_commands(policy: DeployedPolicy, context: np.ndarray, arm_q=ARM_Q) -> np.ndarray:
    obs = ROBOT.observation(arm_q, np.zeros(4), GRIP_Q, np.zeros(2))
    arm, grip = ROBOT.action_to_commands(policy.act(obs, context))
    return np.concatenate([arm, grip])


def latest_command(probe) -> np.ndarray | None:
    arm, grip = probe.received("arm_controller/commands"), probe.received("gripper_controller/commands")
    if not arm or not grip:
        return None
    return np.concatenate([arm[-1].data, grip[-1].data])


def wait_command(probe, want: np.ndarray, timeout: float, what: str, atol: float = 1e-5) -> np.ndarray:
    """Wait until the latest arm + gripper command equals `want`; return it."""
    def matches() -> bool:
        c = latest_command(probe)
        return c is not None and np.allclose(c, want, atol=atol)

    probe.wait_for(matches, timeout, lambda: f"{what} ({want}); latest {latest_command(probe)}")
    return latest_command(probe)


def test_policy_commands_equal_the_actor_output_for_name_matched_state(ros_graph, tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    want = expected_commands(policy, robot.context)
    got = wait_command(probe, want, 30.0, "commands equal to the actor output", atol=1e-5)
    assert np.all(got >= ROBOT.command_lower) and np.all(got <= ROBOT.command_upper)
    # Holding (the last measured positions) differs from acting, so the check above is meaningful.
    assert not np.allclose(want, np.concatenate([ARM_Q, GRIP_Q[:1]]), atol=1e-3)


def test_policy_in_state_trigger_mode_answers_each_state_once_and_its_timer_only_holds(ros_graph,
                                                                                      tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=10.0, trigger="state", state_timeout=0.2)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    wait_command(probe, act, 30.0, "the policy acting on states", atol=1e-5)
    # Pause the states until the timer holds: the commands come from one reliable writer in order, so once a
    # hold has arrived no answer to an earlier state is still in flight, and every acting command received
    # after `since` answers a state sent after it.
    robot.running = False
    wait_command(probe, hold, 5.0, "the timer holding once the states stopped", atol=1e-9)
    since, sent0 = time.monotonic(), robot.sent
    robot.running = True
    probe.wait_for(lambda: robot.sent >= sent0 + 100, 30.0, "100 more states (2 s at 50 Hz)")
    robot.running = False
    stopped = time.monotonic()

    def holding_a_second_after_the_stop() -> bool:
        last_t, last = probe.stamped("arm_controller/commands")[-1]
        return last_t > stopped + 1.0 and np.allclose(last.data, hold[:4], atol=1e-9)

    probe.wait_for(holding_a_second_after_the_stop, 5.0, "the timer holding again once the states stopped")
    states = robot.sent - sent0
    acted = sum(np.allclose(m.data, act[:4], atol=1e-5) for t, m in probe.stamped("arm_controller/commands")
                if t > since)
    # One command per state (a few may be lost on best-effort sensor QoS); a 10 Hz timer acting too would
    # add about 20.
    assert 0.9 * states <= acted <= states, (acted, states)


def test_policy_stops_commanding_when_deactivated_and_acts_again_when_activated(
        ros_graph, tiny_checkpoint):
    """The lifecycle services of a running node (`ros2 lifecycle set /policy deactivate`)."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    wait_command(probe, act, 30.0, "the policy acting", atol=1e-5)

    def transition(kind: int) -> bool:
        return probe.call(ChangeState, "policy/change_state",
                          ChangeState.Request(transition=Transition(id=kind))).success

    assert transition(Transition.TRANSITION_DEACTIVATE)
    stopped, sent0 = len(probe.received("arm_controller/commands")), robot.sent
    probe.wait_for(lambda: robot.sent >= sent0 + 25, 10.0, "half a second of states while inactive")
    assert len(probe.received("arm_controller/commands")) <= stopped + 1  # at most one tick in flight
    assert transition(Transition.TRANSITION_ACTIVATE)
    n = len(probe.received("arm_controller/commands"))
    probe.wait_for(lambda: len(probe.received("arm_controller/commands")) > n + 10, 10.0,
                   "commands again after activation")
    wait_command(probe, act, 10.0, "the policy acting again", atol=1e-5)


def test_policy_cleaned_up_and_configured_again_has_one_set_of_endpoints_and_acts(ros_graph, tiny_checkpoint):
    """cleanup undoes configure: configuring again must not leave a second subscription of each input beside
    the first (each state would then be handled twice) or a second /mql/hold server."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    wait_command(probe, act, 30.0, "the policy acting", atol=1e-5)
    for kind in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                 Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
        assert probe.call(ChangeState, "policy/change_state", ChangeState.Request(transition=Transition(id=kind))
                          ).success, kind
    wait_command(probe, act, 10.0, "the policy acting after cleanup and configure", atol=1e-5)
    node = probe.node

    def endpoints() -> dict[str, int]:
        return {"joint_states": node.count_subscribers("joint_states"),
                "gripper/joint_states": node.count_subscribers("gripper/joint_states"),
                "mql/context": node.count_subscribers("mql/context"),
                "arm_controller/commands": node.count_publishers("arm_controller/commands"),
                "mql/hold": node.count_services("mql/hold")}

    want = dict.fromkeys(("joint_states", "gripper/joint_states", "mql/context", "arm_controller/commands",
                          "mql/hold"), 1)
    probe.wait_for(lambda: endpoints() == want, 10.0, lambda: f"one endpoint each, got {endpoints()}")


def test_policy_holds_last_positions_after_a_nan_or_misnamed_state_and_recovers(ros_graph, tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    wait_command(probe, act, 30.0, "the policy acting", atol=1e-5)
    robot.arm_q = np.array([0.1, np.nan, 0.3, -0.4])
    wait_command(probe, hold, 5.0, "hold commands at the last valid positions after a NaN state", atol=1e-9)
    assert all(np.all(np.isfinite(m.data)) for m in probe.received("arm_controller/commands"))
    probe.wait_for(lambda: any(int(d.get("rejected_joint_state", 0)) > 0
                               for d in diagnostic_values(probe, "policy")),
                   5.0, "a rejection on /diagnostics")
    robot.arm_q = ARM_Q.copy()
    wait_command(probe, act, 5.0, "the policy acting again once the state is valid", atol=1e-5)
    robot.names = ["base_yaw_joint", "shoulder_pitch_joint", "elbow_pitch_joint", "wrist_roll_joint"]
    wait_command(probe, hold, 5.0, "hold commands while a joint name is unknown", atol=1e-9)
    robot.names = list(ROBOT.arm_joints)
    wait_command(probe, act, 5.0, "the policy acting again with the right names", atol=1e-5)


def test_policy_holds_within_state_timeout_when_state_stops(ros_graph, tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, state_timeout=0.2)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    wait_command(probe, act, 30.0, "the policy acting", atol=1e-5)
    robot.running = False
    stopped_ns = time.time_ns()
    wait_command(probe, hold, 5.0, "hold commands after the state stopped", atol=1e-9)
    # By the policy's own publish times (DDS source timestamps, system clock), not the probe's receive times.
    topic = "arm_controller/commands"
    first_hold_ns = next(t for t, m in zip(probe.published_ns(topic), probe.received(topic), strict=False)
                         if t > stopped_ns and np.allclose(m.data, ARM_Q, atol=1e-9))
    # state_timeout plus one control period plus scheduling slack on a loaded 2-core machine
    assert (first_hold_ns - stopped_ns) * 1e-9 < 0.2 + 0.02 + 0.3


def test_policy_hold_service_stops_acting_until_released(ros_graph, tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    assert probe.call(SetBool, "mql/hold", SetBool.Request(data=True)).success
    wait_command(probe, hold, 30.0, "hold commands while /mql/hold is on", atol=1e-9)
    assert probe.call(SetBool, "mql/hold", SetBool.Request(data=False)).success
    wait_command(probe, act, 5.0, "the policy acting after /mql/hold false", atol=1e-5)


def test_policy_holds_on_states_stamped_too_long_ago_or_too_far_ahead_and_acts_on_freshly_stamped_ones(
        ros_graph, tiny_checkpoint):
    """The header stamp is checked against the node's clock in both directions; /diagnostics says which."""
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, state_timeout=0.2)
    robot = FakeRobot(probe, policy.context_dim)
    robot.stamp_offset = 0.0
    act = expected_commands(policy, robot.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    wait_command(probe, act, 30.0, "the policy acting on freshly stamped states", atol=1e-5)
    for offset, says in ((-5.0, "measured 5.0"), (1.0, "s ahead of this node's clock")):
        robot.stamp_offset = offset
        wait_command(probe, hold, 5.0, f"a hold on states stamped {offset:+} s from now", atol=1e-9)
        probe.wait_for(lambda s=says: any(s in d["_message"] for d in diagnostic_values(probe, "policy")),
                       5.0, f"/diagnostics naming the stamp ({says!r})")
        robot.stamp_offset = 0.0
        wait_command(probe, act, 5.0, "the policy acting again on freshly stamped states", atol=1e-5)


class SimulatedClock:
    """Plays a simulator under use_sim_time from the test process: /clock, and inputs stamped in sim time."""

    def __init__(self, probe, context_dim: int):
        self.clock_pub = probe.node.create_publisher(Clock, "/clock", 10)
        self.arm_pub, self.grip_pub, self.ctx_pub = input_publishers(probe)
        self.context = np.linspace(-0.5, 0.5, context_dim).astype(np.float32)

    def publish_inputs(self, sim_ns: int) -> None:
        arm = JointState(name=list(ROBOT.arm_joints), position=ARM_Q.tolist(), velocity=[0.0] * 4)
        arm.header.stamp = Time(nanoseconds=sim_ns).to_msg()
        self.grip_pub.publish(JointState(name=list(ROBOT.gripper_joints), position=GRIP_Q.tolist(),
                                         velocity=[0.0, 0.0]))
        self.ctx_pub.publish(Float32MultiArray(data=self.context.tolist()))
        self.arm_pub.publish(arm)

    def set_clock(self, sim_ns: int) -> None:
        self.clock_pub.publish(Clock(clock=Time(nanoseconds=sim_ns).to_msg()))


def test_policy_under_use_sim_time_counts_state_age_in_sim_seconds_when_the_sim_runs_slower_than_real_time(
        ros_graph, tiny_checkpoint):
    """A simulator at a real-time factor of 0.07 (0.02 sim s per 0.3 s): each state is 0.15 s of wall time old
    when the next /clock update fires the control timer, but 0.02 sim s old by its stamp. The timer counts in
    sim seconds, so the timeouts must too: counted in wall seconds, state_timeout 0.1 held on every tick."""
    import threading

    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, state_timeout=0.1, use_sim_time=True)
    sim = SimulatedClock(probe, policy.context_dim)
    stop = threading.Event()

    def simulator() -> None:
        sim_ns = 100 * 10**9
        while not stop.is_set():
            sim.publish_inputs(sim_ns)
            stop.wait(0.15)
            sim_ns += 20 * 10**6  # one control period of 50 Hz: each /clock update is one tick
            sim.set_clock(sim_ns)
            stop.wait(0.15)

    thread = threading.Thread(target=simulator, daemon=True)
    thread.start()
    try:
        act = expected_commands(policy, sim.context)
        wait_command(probe, act, 30.0, "the policy acting on states fresh in sim time", atol=1e-5)
        first = len(probe.received("arm_controller/commands"))
        probe.wait_for(lambda: len(probe.received("arm_controller/commands")) >= first + 8, 20.0,
                       "eight more ticks of the sim clock")
        commands = probe.received("arm_controller/commands")[first - 1:]
        held = [c.data for c in commands if not np.allclose(c.data, act[:ROBOT.n_arm], atol=1e-5)]
        assert held == [], f"{len(held)} of {len(commands)} ticks held: {diagnostic_values(probe, 'policy')[-1]}"
    finally:
        stop.set()
        thread.join()


def test_policy_holds_from_a_sim_clock_jump_back_shorter_than_state_timeout_until_new_inputs_arrive(
        ros_graph, tiny_checkpoint):
    """A sim reset moves /clock back 0.04 s with state_timeout 0.1: the last state's age becomes -0.02 s and
    stays within the timeout for five ticks, so by ages alone the policy would act on a pre-reset state. The
    clock jump callback expires it: every tick holds on the last measured positions until inputs come again."""
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, state_timeout=0.1, use_sim_time=True)
    sim = SimulatedClock(probe, policy.context_dim)
    act = expected_commands(policy, sim.context)
    hold = np.concatenate([ARM_Q, GRIP_Q[:1]])
    period = 20 * 10**6  # one tick of 50 Hz
    sim_ns = 100 * 10**9

    def tick(with_inputs: bool) -> None:
        nonlocal sim_ns
        if with_inputs:
            sim.publish_inputs(sim_ns)
            time.sleep(0.05)
        sim_ns += period
        sim.set_clock(sim_ns)
        time.sleep(0.1)

    deadline = time.monotonic() + 30.0
    while not (latest_command(probe) is not None and np.allclose(latest_command(probe), act, atol=1e-5)):
        assert time.monotonic() < deadline, f"the policy never acted: {diagnostic_values(probe, 'policy')[-1:]}"
        tick(with_inputs=True)
    time.sleep(0.5)  # the clock stands still: no tick, and what was published has arrived
    before = len(probe.received("arm_controller/commands"))
    sim_ns -= 2 * period  # the jump back: the last inputs were stamped one period before the clock
    sim.set_clock(sim_ns)
    time.sleep(0.1)
    for _ in range(5):
        tick(with_inputs=False)
    after_jump = probe.received("arm_controller/commands")[before:]
    acted = [list(c.data) for c in after_jump if not np.allclose(c.data, hold[:ROBOT.n_arm], atol=1e-9)]
    assert len(after_jump) >= 3 and acted == [], (f"{len(acted)} of {len(after_jump)} ticks after the jump acted "
                                                  f"on inputs from before it: {acted}")
    assert "the clock moved back 0.040 s: holding" in ros_graph.logs()
    for _ in range(3):
        tick(with_inputs=True)
    wait_command(probe, act, 5.0, "the policy acting again on inputs from after the jump", atol=1e-5)


def test_policy_reports_on_diagnostics_at_1_hz_while_the_sim_clock_is_paused(ros_graph, tiny_checkpoint):
    """Under use_sim_time a paused simulator stops /clock, and with it every timer on the node's clock. The
    /diagnostics timer counts real seconds, so a monitor still hears the node (a silent node reads as dead);
    the statuses carry the paused sim time in their stamps."""
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, use_sim_time=True)
    sim = SimulatedClock(probe, 8)
    paused_ns = 100 * 10**9

    def stamped_paused() -> bool:
        sim.set_clock(paused_ns)  # the same time again until it has arrived: the sim stands still
        return any(Time.from_msg(a.header.stamp).nanoseconds == paused_ns for a in probe.received("/diagnostics"))

    probe.wait_for(stamped_paused, 30.0, "a status stamped in sim time")
    before = len(probe.received("/diagnostics"))
    time.sleep(3.5)
    stamps = [Time.from_msg(a.header.stamp).nanoseconds for a in probe.received("/diagnostics")[before:]]
    assert len(stamps) >= 3, f"{len(stamps)} statuses in 3.5 s of paused sim time"
    assert set(stamps) == {paused_ns}, f"stamps {stamps}, the sim clock stands at {paused_ns}"


def test_policy_publishes_nothing_before_any_state(ros_graph, tiny_checkpoint):
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    probe.wait_for(lambda: any("no joint state yet" in d["_message"]
                               for d in diagnostic_values(probe, "policy")),
                   30.0, "the policy reporting it has no state")
    assert probe.received("arm_controller/commands") == []


def test_policy_refuses_bad_or_mismatched_checkpoints_and_loads_a_valid_one(ros_graph, tiny_checkpoint,
                                                                            tmp_path):
    import torch

    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import load_config
    from mql_ros.core.td3 import TD3Context

    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)
    robot = FakeRobot(probe, policy.context_dim)
    act = expected_commands(policy, robot.context)
    wait_command(probe, act, 30.0, "the policy acting", atol=1e-5)
    update_pub = probe.node.create_publisher(String, "mql/policy_update", LATCHED_QOS)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    other_cfg = load_config(overrides={"hidden_sizes": [32, 32], "context_dim": 4, "history_len": 50})
    other = tmp_path / "other_context.pt"
    other_sha = save_checkpoint(other, TD3Context(other_cfg, ROBOT.obs_dim, ROBOT.act_dim, seed=1),
                                "arm_reach", ROBOT)
    good_cfg = load_config(overrides={"hidden_sizes": [32, 32], "context_dim": 8, "history_len": 50})
    good = tmp_path / "good.pt"
    good_sha = save_checkpoint(good, TD3Context(good_cfg, ROBOT.obs_dim, ROBOT.act_dim, seed=7),
                               "arm_reach", ROBOT)
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["weights"]["actor_opt"]["state"] = 5  # loads as a file, breaks the optimizer (it killed the worker)
    malformed = tmp_path / "malformed.pt"
    torch.save(payload, malformed)
    bad_updates = [{"path": str(corrupt), "sha256": hashlib.sha256(corrupt.read_bytes()).hexdigest()},
                   {"path": str(malformed), "sha256": hashlib.sha256(malformed.read_bytes()).hexdigest()},
                   {"path": str(other), "sha256": other_sha},  # context size differs from the running one
                   {"path": str(good), "sha256": "0" * 64},  # hash does not match the file
                   {"path": str(tmp_path / "missing.pt"), "sha256": good_sha}]
    for i, update in enumerate(bad_updates, start=1):
        update_pub.publish(String(data=json.dumps(update)))
        probe.wait_for(lambda n=i: any(int(d.get("rejected_policy_update", 0)) >= n
                                       for d in diagnostic_values(probe, "policy")),
                       10.0, f"refusal of bad update {update}")
    sha_now = diagnostic_values(probe, "policy")[-1]["checkpoint_sha256"]
    assert sha_now == policy.sha256
    wait_command(probe, act, 5.0, "the old policy still acting after the refusals", atol=1e-5)

    update_pub.publish(String(data=json.dumps({"path": str(good), "sha256": good_sha})))
    new_act = expected_commands(DeployedPolicy.from_checkpoint(good, ROBOT), robot.context)
    wait_command(probe, new_act, 10.0, "commands of the new checkpoint", atol=1e-5)
    probe.wait_for(lambda: diagnostic_values(probe, "policy")[-1]["checkpoint_sha256"] == good_sha, 5.0,
                   "the new checkpoint hash on /diagnostics")


def test_policy_runs_the_last_announced_of_updates_that_arrive_together(ros_graph, tiny_checkpoint, tmp_path):
    """A latched topic hands a late joiner its history at once: the updates load in the order announced."""
    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import load_config
    from mql_ros.core.td3 import TD3Context

    cfg = load_config(overrides={"hidden_sizes": [32, 32], "context_dim": 8, "history_len": 50})
    update_pub = ros_graph.probe.node.create_publisher(String, "mql/policy_update", LATCHED_QOS)  # keeps 10
    shas = []
    for seed in range(6):
        path = tmp_path / f"update_{seed}.pt"
        shas.append(save_checkpoint(path, TD3Context(cfg, ROBOT.obs_dim, ROBOT.act_dim, seed=10 + seed),
                                    "arm_reach", ROBOT))
        update_pub.publish(String(data=json.dumps({"path": str(path), "sha256": shas[-1]})))
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0)  # joins late: gets all six at once
    probe.wait_for(lambda: any(d.get("checkpoint_sha256") == shas[-1] for d in diagnostic_values(probe, "policy")),
                   30.0, "the last announced checkpoint running")
    time.sleep(1.0)  # an update loaded out of order would replace it now
    assert diagnostic_values(probe, "policy")[-1]["checkpoint_sha256"] == shas[-1]


def test_policy_refuses_out_of_range_parameter_at_start(ros_graph, tiny_checkpoint):
    proc = ros_graph.start("policy", checkpoint=str(tiny_checkpoint), control_rate=5000.0)
    assert proc.proc.wait(60) == 2
    log = proc.log()
    assert "control_rate" in log and "1000" in log, log


def test_policy_velocity_mode_commands_bounded_velocities_and_zero_when_holding(ros_graph, tiny_checkpoint):
    policy = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT)
    probe = start_policy(ros_graph, tiny_checkpoint, control_rate=50.0, command_mode="velocity",
                         max_velocity=0.5)
    robot = FakeRobot(probe, policy.context_dim)
    targets = expected_commands(policy, robot.context)
    bound = np.minimum(0.5, [2.0, 2.0, 2.5, 3.0, 0.1])  # the URDF's velocity limits: the gripper's is 0.1 m/s
    want = np.clip((targets - np.concatenate([ARM_Q, GRIP_Q[:1]])) * 50.0, -bound, bound)
    wait_command(probe, want, 30.0, "velocities toward the actor's targets, none above its URDF limit")
    assert probe.call(SetBool, "mql/hold", SetBool.Request(data=True)).success
    wait_command(probe, np.zeros(5), 5.0, "zero velocities while holding", atol=0.0)


def test_policy_with_a_corrupt_checkpoint_exits_2_naming_the_file(ros_graph, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"\x80\x02 truncated")
    proc = ros_graph.start("policy", checkpoint=str(bad))
    assert proc.proc.wait(60) == 2
    assert "truncated.pt" in proc.log()
