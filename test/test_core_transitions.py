"""The control-step rule rebuilds exactly the simulator's episodes from the message stream."""

import json

import numpy as np
import pytest

from mql_ros.core.errors import IncompleteStep, InputError
from mql_ros.core.transitions import TransitionBuilder
from mql_ros.sim.families import ArmReachFamily

MS = 1_000_000


def publish_state(builder, env, stamp):
    q, dq, gq, gdq = env.joint_state()
    builder.on_joint_state(stamp, list(env.robot.arm_joints), q, dq)
    builder.on_gripper_state(stamp + 1, list(env.robot.gripper_joints), gq, gdq)


def stream_episode(builder, env, actions, start_ns=0, task_id="reach/test/0"):
    """Drive the env as the ROS graph does and feed every message to the builder; return the rewards."""
    stamp = start_ns
    builder.on_episode(stamp, json.dumps({"event": "start", "task_id": task_id, "task": {}}))
    rewards = []
    for a in actions:
        stamp += 40 * MS
        publish_state(builder, env, stamp)
        arm, grip = env.robot.action_to_commands(a)
        builder.on_command(stamp + 2, arm, grip)
        _, r, *_ = env.step(a)
        rewards.append(r)
        builder.on_reward(stamp + 3, r)
    stamp += 40 * MS
    publish_state(builder, env, stamp)
    builder.on_episode(stamp + 2, json.dumps({"event": "end", "task_id": task_id}))
    return rewards


@pytest.fixture
def env():
    family = ArmReachFamily()
    env = family.make_env(family.test_tasks()[0])
    env.reset(seed=0)
    return env


def test_stream_rebuilds_the_simulated_episode(env):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(12, env.robot.act_dim))
    obs0 = env.robot.observation(*env.joint_state())
    builder = TransitionBuilder(env.robot)
    rewards = stream_episode(builder, env, actions)
    episode = builder.finish_episode()
    assert episode.task_id == "reach/test/0"
    assert len(episode) == len(actions)
    np.testing.assert_allclose(episode.observations[0], obs0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(episode.observations[-1], env.robot.observation(*env.joint_state()), atol=1e-6)
    np.testing.assert_allclose(episode.actions, actions, atol=1e-6)
    np.testing.assert_allclose(episode.rewards, rewards, atol=1e-6)


def test_command_returns_the_transition_it_completes(env):
    builder = TransitionBuilder(env.robot)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "t"}))
    publish_state(builder, env, 10)
    a = np.zeros(env.robot.act_dim)
    assert builder.on_command(20, *env.robot.action_to_commands(a)) is None
    builder.on_reward(30, -0.5)
    publish_state(builder, env, 40)
    done = builder.on_command(50, *env.robot.action_to_commands(a))
    assert done.reward == -0.5 and done.task_id == "t"
    np.testing.assert_allclose(done.action, a, atol=1e-12)


def test_pending_entry_is_the_open_step_with_the_latest_reward_after_its_command(env):
    builder = TransitionBuilder(env.robot)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "t"}))
    publish_state(builder, env, 10)
    builder.on_reward(15, -9.0)  # before any command: no step is open
    assert builder.pending_entry() is None
    a = np.full(env.robot.act_dim, 0.25)
    builder.on_command(20, *env.robot.action_to_commands(a))
    assert builder.pending_entry() is None  # -9.0 came before the command: it is not this step's reward
    builder.on_reward(30, -0.5)
    obs, action, reward = builder.pending_entry()
    np.testing.assert_allclose(obs, env.robot.observation(*env.joint_state()), atol=1e-6)
    np.testing.assert_allclose(action, a, atol=1e-12)
    assert reward == -0.5
    builder.on_reward(35, -0.4)
    assert builder.pending_entry()[2] == -0.4
    publish_state(builder, env, 40)
    done = builder.on_command(50, *env.robot.action_to_commands(a))
    assert done.reward == -0.4  # the entry the preview showed is the one the step rule completes
    assert builder.pending_entry() is None
    builder.on_episode(60, json.dumps({"event": "end", "task_id": "t"}))
    assert builder.pending_entry() is None


def test_an_end_event_of_a_diverged_step_drops_that_step_instead_of_pairing_it_with_old_data(env):
    builder = TransitionBuilder(env.robot)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "t"}))
    a = np.zeros(env.robot.act_dim)
    publish_state(builder, env, 10)
    builder.on_command(20, *env.robot.action_to_commands(a))
    builder.on_reward(30, -0.5)
    publish_state(builder, env, 40)
    builder.on_command(50, *env.robot.action_to_commands(a))  # step 1: the sim diverges, publishes nothing
    assert builder.on_episode(60, json.dumps({"event": "end", "task_id": "t", "diverged": "qacc"})) is None
    episode = builder.finish_episode()
    assert len(episode) == 1 and episode.rewards.tolist() == [-0.5]


def test_a_first_state_handled_between_the_end_and_the_start_event_opens_the_new_episode(env):
    """The sim publishes end, start, first state; a wait-set executor may hand over the state before the start."""
    builder = TransitionBuilder(env.robot)
    stream_episode(builder, env, np.zeros((3, env.robot.act_dim)), task_id="t/0")  # ends with an end event
    builder.finish_episode()
    env.reset(seed=1)
    first = env.robot.observation(*env.joint_state())
    publish_state(builder, env, 10**9)  # the new episode's first state, before its start event
    builder.on_episode(10**9 + 5, json.dumps({"event": "start", "task_id": "t/1"}))
    a = np.zeros(env.robot.act_dim)
    builder.on_command(10**9 + 10, *env.robot.action_to_commands(a))
    builder.on_reward(10**9 + 20, -0.3)
    publish_state(builder, env, 10**9 + 30)
    done = builder.on_command(10**9 + 40, *env.robot.action_to_commands(a))
    assert done.task_id == "t/1" and done.reward == -0.3
    np.testing.assert_allclose(done.obs, first, atol=1e-6)


def test_a_state_before_a_start_event_without_an_end_is_not_the_new_episodes(env):
    builder = TransitionBuilder(env.robot)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "t/0"}))
    publish_state(builder, env, 10)
    builder.on_episode(20, json.dumps({"event": "start", "task_id": "t/1"}))  # cut without an end
    with pytest.raises(IncompleteStep, match="no arm joint state received in this episode yet"):
        builder.on_command(30, *env.robot.action_to_commands(np.zeros(env.robot.act_dim)))


def test_a_step_dropped_for_want_of_a_reward_does_not_take_the_next_command_with_it(env):
    """A command computed from the last episode's final state can reach the encoder after the next episode's
    first state; the step it opens has no reward and is dropped, but the episode's real first command stays."""
    builder = TransitionBuilder(env.robot)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "t"}))
    publish_state(builder, env, 10)
    late = np.full(env.robot.act_dim, 0.5)
    builder.on_command(20, *env.robot.action_to_commands(late))  # no reward follows it
    first = np.zeros(env.robot.act_dim)
    with pytest.raises(IncompleteStep, match="no reward"):
        builder.on_command(30, *env.robot.action_to_commands(first))
    builder.on_reward(40, -0.2)
    publish_state(builder, env, 50)
    done = builder.on_command(60, *env.robot.action_to_commands(first))
    assert done.reward == -0.2
    np.testing.assert_allclose(done.action, first, atol=1e-12)


def test_joint_states_are_matched_by_name_not_index(env):
    builder = TransitionBuilder(env.robot)
    q, dq, _, _ = env.joint_state()
    names = list(env.robot.arm_joints)[::-1]
    builder.on_joint_state(0, names, q[::-1], dq[::-1])
    np.testing.assert_array_equal(builder.rule.arm[0], q)


@pytest.mark.parametrize("names, message", [
    (["base_yaw_joint", "nope", "elbow_pitch_joint", "wrist_pitch_joint"], "missing joints"),
    (["base_yaw_joint", "base_yaw_joint", "elbow_pitch_joint", "wrist_pitch_joint"], "duplicated"),
])
def test_bad_joint_names_are_rejected_with_the_names(env, names, message):
    with pytest.raises(InputError, match=message):
        TransitionBuilder(env.robot).on_joint_state(0, names, [0.0] * 4, [0.0] * 4)


def test_nan_state_and_nan_reward_are_rejected(env):
    builder = TransitionBuilder(env.robot)
    with pytest.raises(InputError, match="NaN"):
        builder.on_joint_state(0, list(env.robot.arm_joints), [np.nan, 0, 0, 0], [0.0] * 4)
    with pytest.raises(InputError, match="not finite"):
        builder.on_reward(1, float("nan"))


def test_values_finite_in_float64_but_not_in_float32_are_rejected_like_nan(env):
    """1e39 passes a float64 isfinite check and is inf in the replay and the context: it stopped the context
    encoder and the adaptation node (found by an audit)."""
    from mql_ros.core.safety import read_joint_state

    robot, builder = env.robot, TransitionBuilder(env.robot)
    with pytest.raises(InputError, match="NaN or inf \\(as float32\\)"):
        builder.on_joint_state(0, list(robot.arm_joints), [0.0] * 4, [0, 0, 1e39, 0])
    with pytest.raises(InputError, match="not finite \\(as float32\\)"):
        builder.on_reward(1, -1e39)
    with pytest.raises(InputError, match="NaN or inf \\(as float32\\)"):
        builder.on_command(2, [0.0, 0.0, 0.0, 1e39], [0.0])
    with pytest.raises(InputError, match="NaN or inf \\(as float32\\)"):
        read_joint_state(robot, list(robot.arm_joints), [1e39, 0, 0, 0], [0.0] * 4, robot.arm_joints, "arm")
    builder.on_joint_state(3, list(robot.arm_joints), [0.0] * 4, [0, 0, 3e38, 0])  # float32's largest: taken


def test_time_going_backwards_is_rejected(env):
    builder = TransitionBuilder(env.robot)
    builder.on_reward(100, 0.0)
    with pytest.raises(InputError, match="backwards"):
        builder.on_reward(50, 0.0)


@pytest.mark.parametrize("payload", ["not json", json.dumps({"task_id": "x"}), json.dumps([1, 2]),
                                     "[" * 100_000])  # nested past the parser's recursion limit
def test_malformed_episode_events_are_rejected(env, payload):
    with pytest.raises(InputError, match="episode event"):
        TransitionBuilder(env.robot).on_episode(0, payload)


def test_a_step_before_any_reward_is_dropped_with_a_reason(env):
    builder = TransitionBuilder(env.robot)
    publish_state(builder, env, 0)
    cmd = env.robot.action_to_commands(np.zeros(env.robot.act_dim))
    builder.on_command(10, *cmd)
    with pytest.raises(InputError, match="no reward"):
        builder.on_command(20, *cmd)
    assert builder.finish_episode() is None


def test_two_commands_without_a_new_reward_reuse_the_latest_reward(env):
    builder = TransitionBuilder(env.robot)
    publish_state(builder, env, 0)
    cmd = env.robot.action_to_commands(np.zeros(env.robot.act_dim))
    builder.on_reward(5, -0.25)
    builder.on_command(10, *cmd)
    assert builder.on_command(20, *cmd).reward == -0.25


def two_bursts(builder, env, first: int) -> int:
    """Two bursts of 4 control steps (state, command, reward) 10 s apart; returns the next stamp."""
    cmd = env.robot.action_to_commands(np.zeros(env.robot.act_dim))
    stamp = first
    for start in (first, 10_000 * MS):
        stamp = start
        for _ in range(4):
            publish_state(builder, env, stamp)
            builder.on_command(stamp + 2, *cmd)
            builder.on_reward(stamp + 3, -1.0)
            stamp += 40 * MS
    return stamp


def test_with_episode_events_a_pause_longer_than_the_gap_does_not_split_the_episode(env):
    """A stalled robot (or a loaded recorder) pauses mid-episode; the episode events, not the pause, say
    where episodes end."""
    builder = TransitionBuilder(env.robot, task_id="recorded", episode_gap_s=0.5)
    builder.on_episode(0, json.dumps({"event": "start", "task_id": "reach/test/0"}))
    stamp = two_bursts(builder, env, first=1)  # in one episode
    publish_state(builder, env, stamp)
    builder.on_episode(stamp + 2, json.dumps({"event": "end", "task_id": "reach/test/0"}))
    assert builder.finished == []
    assert len(builder.finish_episode()) == 8


def test_without_episode_events_a_time_gap_splits_episodes(env):
    builder = TransitionBuilder(env.robot, task_id="recorded", episode_gap_s=0.5)
    two_bursts(builder, env, first=0)
    assert [len(e) for e in builder.finished] == [4]
    assert builder.finished[0].task_id == "recorded"
    assert len(builder.finish_episode()) == 3  # the open burst: 4 commands, the last one not yet closed
