"""Property tests of the policy node's safety rules (mql_ros.core.safety, the code the node runs each tick).

Arbitrary floats, NaN and inf for every input and for the actor's weights (built straight into a
DeployedPolicy, past the checkpoint validation that would refuse them), arbitrary arrival and tick times.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mql_ros.core.checkpoint import Checkpoint, save_checkpoint
from mql_ros.core.config import load_config
from mql_ros.core.errors import CheckpointError, InputError
from mql_ros.core.robot import RobotSpec
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.core.safety import CommandGuard, SafetyLimits, accept_update, parse_update
from mql_ros.core.td3 import TD3Context

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
torch.set_num_threads(1)
ROBOT = RobotSpec.from_urdf()
CFG = load_config(overrides={"hidden_sizes": [8], "context_dim": 3, "history_len": 5, "batch_size": 8})
AGENT = TD3Context(CFG, ROBOT.obs_dim, ROBOT.act_dim, seed=0)
WEIGHTS = AGENT.state_dict()
ACTOR_KEYS = [k for k in WEIGHTS["nets"] if k.startswith("actor.net.")]
LO, HI = ROBOT.command_lower, ROBOT.command_upper
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
big_float = st.one_of(any_float, st.sampled_from([1e30, -1e30, 3e38, np.nan, np.inf, -np.inf]))


def floats(n: int):
    return st.lists(st.one_of(st.floats(-3.0, 3.0), big_float), min_size=n, max_size=n)


@st.composite
def actor_weights(draw) -> dict:
    """The actor's tensors: either the trained-from-scratch values scaled by a drawn factor, or drawn outright
    (NaN, inf, huge values included)."""
    nets = dict(WEIGHTS["nets"])
    for key in ACTOR_KEYS:
        shape = tuple(nets[key].shape)
        if draw(st.booleans()):
            scale = draw(st.one_of(st.floats(-1e6, 1e6), big_float))
            nets[key] = nets[key] * scale
        else:
            nets[key] = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=big_float)))
    return {**WEIGHTS, "nets": nets}


def deployed(weights: dict) -> DeployedPolicy:
    return DeployedPolicy(Checkpoint(CFG, ROBOT.obs_dim, ROBOT.act_dim, "test", ROBOT, weights))


tick = st.fixed_dictionaries({
    "arm_q": floats(4), "arm_dq": floats(4), "grip_q": floats(2), "grip_dq": floats(2), "context": floats(3),
    "dt": st.floats(0.0, 0.5)})


@SETTINGS
@given(weights=actor_weights(), ticks=st.lists(tick, min_size=1, max_size=8),
       arm_step=st.floats(1e-4, 10.0), grip_step=st.floats(1e-5, 1.0))
def test_every_command_is_finite_within_joint_limits_and_the_rate_limit_for_any_input_and_weights(
        weights, ticks, arm_step, grip_step):
    policy = deployed(weights)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, arm_step, grip_step))
    step = np.array([arm_step] * 4 + [grip_step])
    now, previous, measured = 0.0, None, None
    for t in ticks:
        now += t["dt"]
        for which, q, dq in (("arm", t["arm_q"], t["arm_dq"]), ("gripper", t["grip_q"], t["grip_dq"])):
            try:
                guard.set_joint_state(which, ROBOT.arm_joints if which == "arm" else ROBOT.gripper_joints,
                                      q, dq, now)
            except InputError:
                pass
        try:
            guard.set_context(t["context"], policy.context_dim, now)
        except InputError:
            pass
        if guard.arm.value is not None and guard.gripper.value is not None:
            measured = np.clip(np.concatenate([guard.arm.value[0], guard.gripper.value[0][:1]]), LO, HI)
        command = guard.command(now, policy)
        if command is None:
            assert measured is None, "a valid state was received, so there is a safe target"
            continue
        c = np.concatenate([command.arm, command.gripper])
        assert c.shape == (5,) and np.all(np.isfinite(c))
        assert np.all(c >= LO) and np.all(c <= HI)
        if command.hold:
            np.testing.assert_array_equal(c, measured)  # holding = the last valid measured positions
        else:
            ref = previous if previous is not None else measured
            assert np.all(np.abs(c - ref) <= step * (1 + 1e-9) + 1e-12), (c, ref, step)
        previous = c


@SETTINGS
@given(events=st.lists(st.tuples(st.sampled_from(["arm", "gripper", "context", "tick"]), st.floats(0.0, 0.4),
                                 st.none() | st.floats(-0.1, 0.4)),
                       min_size=1, max_size=30),
       state_timeout=st.floats(0.01, 0.3), context_timeout=st.floats(0.01, 0.3))
@example(events=[("gripper", 0.0, None), ("context", 0.0, None), ("arm", 0.0, 0.15), ("tick", 0.1, None)],
         state_timeout=0.2, context_timeout=0.3)  # arrived 0.1 s ago, measured 0.25 s ago: hold
@example(events=[("gripper", 0.0, None), ("context", 0.0, None), ("arm", 0.0, -0.15), ("tick", 0.0, None)],
         state_timeout=0.1, context_timeout=0.3)  # stamped further ahead than the window: refused
def test_the_policy_acts_only_on_fresh_state_and_context_and_holds_until_fresh_state_returns(
        events, state_timeout, context_timeout):
    """Fresh: the arm state measured (its header stamp; arrival if unstamped or stamped ahead) and the gripper
    state and context arrived within their timeouts; an arm state stamped too long ago, or further ahead of
    the clock than state_timeout, is refused: hold."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(state_timeout, context_timeout, 10.0, 1.0))
    arrived = {"arm": -np.inf, "gripper": -np.inf, "context": -np.inf}
    arm_refused = False
    held_positions = None
    now = 0.0
    for kind, dt, age in events:
        now += dt
        if kind == "arm":
            try:
                guard.set_joint_state("arm", ROBOT.arm_joints, [0.1, 0.2, 0.3, 0.4], [0.0] * 4, now, age)
            except InputError:
                assert age is not None and abs(age) > state_timeout
                arm_refused = True
                continue
            assert age is None or abs(age) <= state_timeout, f"accepted a state stamped {age} s ago"
            arm_refused = False
            arrived["arm"] = now - max(age or 0.0, 0.0)
            held_positions = None
            continue
        if kind == "gripper":
            guard.set_joint_state("gripper", ROBOT.gripper_joints, [0.01, 0.01], [0.0, 0.0], now)
        elif kind == "context":
            guard.set_context(np.full(3, 0.5), 3, now)
        else:
            command = guard.command(now, policy)
            fresh = (not arm_refused and now - arrived["arm"] <= state_timeout
                     and now - arrived["gripper"] <= state_timeout and now - arrived["context"] <= context_timeout)
            if command is None:
                assert arrived["arm"] == -np.inf or arrived["gripper"] == -np.inf
                continue
            assert bool(command.hold) == (not fresh), (command.hold, now, arrived)
            if command.hold:
                c = np.concatenate([command.arm, command.gripper])
                if held_positions is not None:  # no newer state: the same hold target, tick after tick
                    np.testing.assert_array_equal(c, held_positions)
                held_positions = c
            continue
        arrived[kind] = now
        if kind != "context":
            held_positions = None


def fresh_inputs(guard: CommandGuard, now: float, arm_age: float | None = None) -> None:
    """Arm state (measured `arm_age` s before it arrives; None: unstamped), gripper state and context at `now`."""
    guard.set_joint_state("gripper", ROBOT.gripper_joints, [0.01, 0.01], [0.0, 0.0], now)
    guard.set_context(np.zeros(3), 3, now)
    guard.set_joint_state("arm", ROBOT.arm_joints, [0.1, 0.2, 0.3, 0.4], [0.0] * 4, now, measured_age=arm_age)


def test_a_hold_request_holds_even_with_fresh_inputs():
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 0.0)
    assert guard.command(0.0, policy).hold == ""
    guard.hold_requested = True
    assert "mql/hold" in guard.command(0.0, policy).hold


def test_a_state_stamped_longer_ago_than_state_timeout_is_refused_however_late_it_arrives():
    """The policy measured freshness by arrival only: states stamped 5 s in the past, arriving at 25 Hz, were
    acted on (found by an audit). Its header-stamp age now counts; an unstamped state (age None) cannot."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 0.0, arm_age=0.01)
    assert guard.command(0.0, policy).hold == ""
    with pytest.raises(InputError, match="measured 5.000 s ago by its header stamp"):
        guard.set_joint_state("arm", ROBOT.arm_joints, [0.5, 0.5, 0.5, 0.5], [0.0] * 4, 0.01, measured_age=5.0)
    held = guard.command(0.01, policy)
    assert held.hold and np.allclose(held.arm, [0.1, 0.2, 0.3, 0.4])  # the last state measured in time
    fresh_inputs(guard, 0.02, arm_age=None)
    assert guard.command(0.02, policy).hold == ""


def test_a_state_that_arrived_late_goes_stale_state_timeout_after_it_was_measured_not_after_it_arrived():
    """A state measured 0.15 s before it arrived was accepted (fresh enough) and then acted on for another
    full state_timeout: commands from a state 0.35 s old (found by a flaky real-process test)."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 1.0, arm_age=0.15)
    assert guard.command(1.0, policy).hold == ""
    assert guard.command(1.04, policy).hold == ""  # measured 0.19 s ago
    held = guard.command(1.06, policy)  # measured 0.21 s ago, arrived 0.06 s ago
    assert "joint state is 0.210 s old" in held.hold and np.allclose(held.arm, [0.1, 0.2, 0.3, 0.4])
    # A stamp ahead of the receiver's clock (negative age) must not make a state fresh for longer either.
    fresh_inputs(guard, 2.0, arm_age=-0.15)
    assert guard.command(2.19, policy).hold == "" and guard.command(2.21, policy).hold


def test_a_state_stamped_further_ahead_of_the_clock_than_state_timeout_is_refused_naming_the_clocks():
    """With the driver's clock 1 s ahead, a state that arrived 0.5 s late looked measured 0.5 s in the future
    and was accepted as fresh: the stamp check cannot work across clocks that disagree by more than the window."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 0.0, arm_age=-0.2)  # within the window: accepted
    assert guard.command(0.0, policy).hold == ""
    with pytest.raises(InputError, match=r"stamped 0\.500 s ahead of this node's clock.*synchronize"):
        guard.set_joint_state("arm", ROBOT.arm_joints, [0.5, 0.5, 0.5, 0.5], [0.0] * 4, 0.01, measured_age=-0.5)
    held = guard.command(0.01, policy)
    assert "ahead of this node's clock" in held.hold and np.allclose(held.arm, [0.1, 0.2, 0.3, 0.4])


def test_inputs_that_arrived_before_a_simulated_clock_moved_back_are_stale():
    """Under use_sim_time a sim reset or a replayed bag moves the clock back: what arrived at sim time 50 must
    not count as fresh again at sim time 0 (its age is negative, so `age <= timeout` alone passed it)."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 50.0)
    assert guard.command(50.1, policy).hold == ""
    assert guard.command(49.9, policy).hold == ""  # a tick that read the clock just before an input arrived
    held = guard.command(0.0, policy)
    assert "the clock moved back" in held.hold and np.allclose(held.arm, [0.1, 0.2, 0.3, 0.4])
    fresh_inputs(guard, 0.02)
    assert guard.command(0.03, policy).hold == ""


def test_expired_inputs_hold_on_the_last_measured_positions_until_each_is_replaced():
    """A sim clock that moved back by less than a timeout leaves ages that look fresh; the node's clock jump
    callback expires the inputs instead, and each must arrive again before the policy acts."""
    policy = deployed(WEIGHTS)
    guard = CommandGuard(ROBOT, SafetyLimits(0.2, 0.5, 10.0, 1.0))
    fresh_inputs(guard, 50.0)
    guard.expire_inputs("it arrived before the clock moved back 0.050 s")
    held = guard.command(49.96, policy)  # every age is within its timeout
    assert held.hold == "joint state is stale: it arrived before the clock moved back 0.050 s"
    assert np.allclose(held.arm, [0.1, 0.2, 0.3, 0.4]) and np.allclose(held.gripper, [0.01])
    guard.set_joint_state("arm", ROBOT.arm_joints, [0.1, 0.2, 0.3, 0.4], [0.0] * 4, 49.97)
    guard.set_joint_state("gripper", ROBOT.gripper_joints, [0.01, 0.01], [0.0, 0.0], 49.97)
    assert guard.command(49.98, policy).hold.startswith("context is stale")
    guard.set_context(np.zeros(3), 3, 49.99)
    assert guard.command(50.0, policy).hold == ""


# ----------------------------------------------------------------------------- policy updates
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("updates")
    out = {}
    for name, seed in (("running", 0), ("candidate", 1)):
        path = d / f"{name}.pt"
        out[name] = (path, save_checkpoint(path, TD3Context(CFG, ROBOT.obs_dim, ROBOT.act_dim, seed=seed),
                                           "test", ROBOT))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.floats(0.0, 0.999)),
    st.tuples(st.just("wrong_sha"), st.just(0.0)),
    st.tuples(st.just("intact"), st.just(0.0))))
@example(damage=("truncate", 0.0))  # an empty file (torch raises an EOFError without a message)
def test_an_update_is_taken_only_if_it_validates_and_matches_its_hash(checkpoints, tmp_path, damage):
    running = DeployedPolicy.from_checkpoint(checkpoints["running"][0], ROBOT)
    good_path, good_sha = checkpoints["candidate"]
    data = bytearray(good_path.read_bytes())
    kind, where = damage
    sha = good_sha
    if kind == "truncate":
        data = data[: int(where * len(data))]
    elif kind == "flip":
        data[int(where * len(data))] ^= 0xFF
    elif kind == "wrong_sha":
        sha = "0" * 64
    path = tmp_path / f"update_{hashlib.sha256(bytes(data)).hexdigest()[:8]}.pt"
    path.write_bytes(bytes(data))
    try:
        taken = accept_update(path, sha, running, ROBOT)
    except (CheckpointError, InputError):
        assert kind != "intact", "an intact update with its hash must be accepted"
        return
    # Accepted: it is exactly the file the message named, and it loads and validates on its own.
    assert taken.sha256 == sha == hashlib.sha256(bytes(data)).hexdigest()
    assert DeployedPolicy.from_checkpoint(path, ROBOT).sha256 == sha


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '{"path": "x.pt"}', '{"sha256": "ab"}',
                                  '{"path": "", "sha256": "ab"}', '{"path": 3, "sha256": "ab"}'])
def test_a_malformed_update_message_is_an_input_error_naming_it(data):
    with pytest.raises(InputError, match="path and sha256"):
        parse_update(data)


@given(target=hnp.arrays(np.float64, 5, elements=st.floats(-1e6, 1e6)),
       current=hnp.arrays(np.float64, 5, elements=st.floats(-1e6, 1e6)),
       max_velocity=st.floats(0.001, 100.0))
def test_velocity_commands_never_exceed_a_joints_urdf_velocity_limit(target, current, max_velocity):
    """Velocity mode bounded every joint by one max_velocity, so the gripper (URDF: 0.1 m/s) got 0.5 by default
    (found by an audit); the policy node now bounds each by min(max_velocity, its URDF limit)."""
    from mql_ros.core.robot import urdf_velocity_limits
    from mql_ros.core.safety import to_velocity

    robot = RobotSpec.from_urdf()
    limits = urdf_velocity_limits(None, robot.arm_joints + robot.gripper_joints[:1])
    np.testing.assert_array_equal(limits, [2.0, 2.0, 2.5, 3.0, 0.1])
    v = to_velocity(target, current, 50.0, np.minimum(max_velocity, limits), hold=False)
    assert np.all(np.abs(v) <= np.minimum(max_velocity, limits))


@pytest.mark.parametrize("velocity, message", [("fast", "is not a number"), ("0", "must be > 0")])
def test_a_urdf_velocity_limit_that_is_not_a_positive_number_is_an_input_error(velocity, message):
    from mql_ros.core.robot import urdf_velocity_limits

    urdf = f'<robot><joint name="j" type="revolute"><limit lower="-1" upper="1" velocity="{velocity}"/></joint></robot>'
    with pytest.raises(InputError, match=f"URDF joint 'j': velocity limit .*{message}"):
        urdf_velocity_limits(urdf, ("j",))
    assert urdf_velocity_limits('<robot><joint name="j"/></robot>', ("j",))[0] == np.inf
