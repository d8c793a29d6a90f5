"""The simulated arm: URDF -> RobotSpec and MuJoCo agree, servos track and clamp, no NaN escapes, the task
is in the reward and never in the observation, and the ROS path (apply_commands + advance) equals step()."""

import json
import xml.etree.ElementTree as ET

import gymnasium
import mujoco
import numpy as np
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

from mql_ros.core.errors import InputError
from mql_ros.core.paths import share_file
from mql_ros.core.robot import RobotSpec
from mql_ros.sim.arm import ARM_REACH, TARGET_MAX_DISTANCE, TASK_RANGES, ArmEnv, check_task

TASK = {"target": [0.3, 0.1, 0.12]}


@pytest.fixture(scope="module")
def urdf_root():
    return ET.parse(share_file("urdf/mql_arm.urdf")).getroot()


@pytest.fixture
def env():
    return ArmEnv(TASK)


def test_urdf_gives_four_arm_joints_and_a_mimicked_finger_pair(urdf_root):
    spec = RobotSpec.from_urdf()
    assert spec.n_arm == 4 and spec.n_gripper == 2
    assert all("finger" in j for j in spec.gripper_joints)
    joints = {j.get("name"): j for j in urdf_root.findall("joint")}  # not the <ros2_control> ones
    for name, lo, hi in zip(spec.arm_joints, spec.arm_lower, spec.arm_upper, strict=True):
        limit = joints[name].find("limit")
        assert (float(limit.get("lower")), float(limit.get("upper"))) == (lo, hi)
        assert float(limit.get("effort")) > 0 and float(limit.get("velocity")) > 0
    assert joints[spec.gripper_joints[1]].find("mimic").get("joint") == spec.gripper_joints[0]


def test_urdf_moving_links_have_inertials_and_named_geoms(urdf_root):
    children = {j.find("child").get("link") for j in urdf_root.findall("joint") if j.get("type") != "fixed"}
    links = {link.get("name"): link for link in urdf_root.iter("link")}
    for name in children:
        assert links[name].find("inertial") is not None, name
    for tag in ("visual", "collision"):
        assert all(g.get("name") for g in urdf_root.iter(tag))
    assert "tool0" in links
    command_joints = [j.get("name") for j in urdf_root.find("ros2_control").iter("joint")
                      if j.find("command_interface") is not None]
    spec = RobotSpec.from_urdf()
    assert command_joints == list(spec.arm_joints) + [spec.gripper_joints[0]]


def test_mujoco_model_keeps_urdf_joints_limits_efforts_and_tool_frame(env, urdf_root):
    m, spec = env.model, env.robot
    efforts = {j.get("name"): float(j.find("limit").get("effort"))
               for j in urdf_root.findall("joint") if j.find("limit") is not None}
    commanded = spec.arm_joints + spec.gripper_joints[:1]
    for name, lo, hi in zip(commanded, spec.command_lower, spec.command_upper, strict=True):
        joint = m.joint(name)
        np.testing.assert_allclose(m.jnt_range[joint.id], [lo, hi])
        np.testing.assert_allclose(m.jnt_actfrcrange[joint.id], [-efforts[name], efforts[name]])
        act = m.actuator(f"{name}_servo")
        assert act.trnid[0] == joint.id
        np.testing.assert_allclose(m.actuator_ctrlrange[act.id], [lo, hi])
    assert m.nu == spec.act_dim
    assert m.body("tool0").id > 0
    assert m.opt.integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    assert m.neq == 1 and m.eq_type[0] == mujoco.mjtEq.mjEQ_JOINT  # the mimic finger


def test_position_command_inside_limits_is_tracked(env):
    env.reset(seed=0)
    arm_target, grip_target = np.array([0.4, 0.6, 0.9, -0.5]), np.array([0.02])
    env.apply_commands(arm_target, grip_target)
    env.advance(1.0)
    q, dq, gq, _ = env.joint_state()
    np.testing.assert_allclose(q, arm_target, atol=0.05)  # P servos: a few hundredths of gravity sag
    np.testing.assert_allclose(gq, [0.02, 0.02], atol=0.002)  # the second finger mimics the first
    assert np.all(np.abs(dq) < 0.05)


def test_commands_outside_limits_are_clamped(env):
    env.reset(seed=0)
    spec = env.robot
    env.apply_commands([10.0, -10.0, 10.0, -10.0], [5.0])
    expected = [spec.arm_upper[0], spec.arm_lower[1], spec.arm_upper[2], spec.arm_lower[3],
                spec.gripper_upper]
    np.testing.assert_allclose(env.data.ctrl, expected)
    env.advance(1.0)
    q, _, gq, _ = env.joint_state()
    assert np.all(q >= np.array(spec.arm_lower) - 0.02) and np.all(q <= np.array(spec.arm_upper) + 0.02)
    assert np.all(gq <= spec.gripper_upper + 0.002)


@pytest.mark.parametrize("arm, grip, match", [([0.0, 0.0, np.nan, 0.0], [0.0], "NaN"),
                                              ([0.0, 0.0, 0.0], [0.0], "expected 4"),
                                              ([0.0] * 4, [0.0, 0.0], "1 gripper")])
def test_bad_commands_raise_and_keep_the_previous_targets(env, arm, grip, match):
    env.apply_commands([0.1, 0.2, 0.3, 0.4], [0.01])
    with pytest.raises(InputError, match=match):
        env.apply_commands(arm, grip)
    np.testing.assert_allclose(env.data.ctrl, [0.1, 0.2, 0.3, 0.4, 0.01])


def test_observation_is_joint_state_in_robot_spec_order(env):
    obs, _ = env.reset(seed=1)
    obs, *_ = env.step(np.full(5, 0.3, dtype=np.float32))
    q, dq, gq, gdq = env.joint_state()
    assert obs.dtype == np.float32 and obs.shape == (env.robot.obs_dim,) == (12,)
    np.testing.assert_allclose(obs, np.concatenate([q, dq, gq, gdq]).astype(np.float32))
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (env.robot.act_dim,)


def assert_stable_under_random_and_bang_bang_actions(env, seed: int, steps: int) -> None:
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        action = rng.choice([-1.0, 1.0], 5) if i % 2 else rng.uniform(-1, 1, 5)  # bang-bang stresses servos
        obs, reward, _, truncated, info = env.step(action)
        assert np.all(np.isfinite(obs)) and np.isfinite(reward) and not info["diverged"]
        if truncated:
            env.reset()


def test_random_actions_never_produce_nan(env):
    assert_stable_under_random_and_bang_bang_actions(env, seed=2, steps=300)


@pytest.mark.parametrize("field, value", [("qvel", 1e12), ("qpos", 50.0)])
def test_diverged_physics_resets_with_a_warning_instead_of_returning_nan(env, field, value):
    env.reset(seed=3)
    getattr(env.data, field)[:] = value
    with pytest.warns(RuntimeWarning, match="diverged"):
        obs, reward, terminated, truncated, info = env.step(np.zeros(5))
    assert info["diverged"] and truncated and not terminated
    assert env.divergence  # the reason, for the sim node to report
    assert np.all(np.isfinite(obs)) and np.isfinite(reward)
    assert np.all(np.abs(obs[:4]) < 0.1)  # back at the home pose


def test_episode_ends_by_truncation_after_episode_steps():
    env = ArmEnv(TASK, episode_steps=7)
    env.reset(seed=0)
    flags = [env.step(np.zeros(5))[2:4] for _ in range(7)]
    assert [t for t, _ in flags] == [False] * 7
    assert [tr for _, tr in flags] == [False] * 6 + [True]


def test_task_changes_the_reward_but_not_the_observation():
    near, far = ArmEnv({"target": [0.25, 0.0, 0.12]}), ArmEnv({"target": [0.1, 0.4, 0.3]})
    rng = np.random.default_rng(4)
    o1, _ = near.reset(seed=4)
    o2, _ = far.reset(seed=4)
    np.testing.assert_array_equal(o1, o2)
    for _ in range(10):
        a = rng.uniform(-1, 1, 5)
        o1, r1, *_ = near.step(a)
        o2, r2, *_ = far.step(a)
        np.testing.assert_array_equal(o1, o2)
        assert r1 != r2
        assert r1 == pytest.approx(-np.linalg.norm(near.tool_position() - [0.25, 0.0, 0.12]))


def test_payload_task_changes_the_motion():
    light, heavy = ArmEnv(TASK), ArmEnv({**TASK, "payload_mass": 1.5, "damping_scale": 2.0})
    for env in (light, heavy):
        env.reset(seed=5)
        env.apply_commands([0.0, 1.2, 0.3, 0.0], [0.0])
        env.advance(1.0)
    sag_light = abs(light.joint_state()[0][1] - 1.2)
    sag_heavy = abs(heavy.joint_state()[0][1] - 1.2)
    assert sag_heavy > sag_light + 0.05  # gravity pulls the loaded shoulder further from its target


def test_set_task_takes_effect_at_the_next_reset(env):
    env.reset(seed=6)
    before = env.current_reward()
    new = {"target": [0.2, -0.3, 0.2], "payload_mass": 0.5}
    env.set_task(new)
    assert env.task == check_task(TASK) and env.current_reward() == before
    env.step(np.zeros(5))
    assert env.task == check_task(TASK)
    _, info = env.reset(seed=6)
    assert env.task == info["task"] == check_task(new)
    assert env.model.body_mass[env.model.body("payload").id] == pytest.approx(0.5)
    np.testing.assert_allclose(env.model.site_pos[env.model.site("target").id], new["target"])
    assert env.current_reward() == pytest.approx(-np.linalg.norm(env.tool_position() - new["target"]))


def test_apply_commands_and_advance_follow_the_same_trajectory_as_step():
    stepped, driven = ArmEnv(TASK), ArmEnv(TASK)
    stepped.reset(seed=7)
    driven.reset(seed=7)
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = rng.uniform(-1, 1, 5)
        obs, reward, *_ = stepped.step(a)
        driven.apply_commands(*driven.robot.action_to_commands(a))
        driven.advance(driven.control_dt)
        np.testing.assert_array_equal(obs, driven.robot.observation(*driven.joint_state()).astype(np.float32))
        assert reward == driven.current_reward()


@pytest.mark.parametrize("task, match", [({"target": [0.1, 0.2]}, "3 finite"),
                                         ({"target": [0.1, np.nan, 0.2]}, "3 finite"),
                                         ({"target": [0.1, 0.2, 0.3], "mass": 1.0}, "unknown keys"),
                                         ({"target": [0.1, 0.2, 0.3], "payload_mass": -1.0}, "payload_mass"),
                                         ({"target": [0.1, 0.2, 0.3], "damping_scale": 0.0}, "damping_scale"),
                                         ({}, "no 'target'")])
def test_bad_task_is_rejected_by_name(env, task, match):
    with pytest.raises(InputError, match=match):
        env.set_task(task)
    assert env.task == check_task(TASK)


@pytest.mark.parametrize("task, match", [
    ({"target": [1e160, 0.0, 0.0]}, r"target \[1e\+160, 0.0, 0.0\] must lie within 1.5 m"),  # rewards were -inf
    ({"target": [1.2, 0.0, 1.2]}, r"target \[1.2, 0.0, 1.2\] must lie within 1.5 m"),  # each coordinate in bound
    ({"target": [0.3, 0.1, 0.12], "payload_mass": 1e308}, r"payload_mass must be within \[0.0, 10.0\] .*1e\+308"),
    ({"target": [0.3, 0.1, 0.12], "payload_mass": 10.5}, r"payload_mass must be within \[0.0, 10.0\] .*10.5"),
    ({"target": [0.3, 0.1, 0.12], "damping_scale": 1e6}, r"damping_scale must be within \[0.01, 100.0\]"),
    ({"target": [0.3, 0.1, 0.12], "damping_scale": 1e-4}, r"damping_scale must be within \[0.01, 100.0\]"),
    ({"target": [0.3, 0.1, 0.12], "friction_scale": 1e300}, r"friction_scale must be within \[0.01, 100.0\]"),
    ({"target": [0.3, 0.1, 0.12], "friction_scale": float("nan")}, r"friction_scale must be within"),
])
def test_task_outside_its_physical_range_is_rejected_naming_the_key_the_value_and_the_range(env, task, match):
    with pytest.raises(InputError, match=match):
        env.set_task(task)
    assert env.task == check_task(TASK)


@pytest.mark.parametrize("task", [
    {"target": [0.0, 0.0, TARGET_MAX_DISTANCE], "payload_mass": TASK_RANGES["payload_mass"][1],
     "damping_scale": TASK_RANGES["damping_scale"][0], "friction_scale": TASK_RANGES["friction_scale"][0]},
    {"target": [-TARGET_MAX_DISTANCE, 0.0, 0.0], "payload_mass": 0.0,
     "damping_scale": TASK_RANGES["damping_scale"][1], "friction_scale": TASK_RANGES["friction_scale"][1]},
])
def test_tasks_at_the_edges_of_the_physical_ranges_are_accepted_and_simulate_stably(task):
    env = ArmEnv(task)
    assert env.task == check_task(task) == task
    assert_stable_under_random_and_bang_bang_actions(env, seed=9, steps=200)


def test_the_target_bound_is_about_twice_the_arms_reach(env):
    rng = np.random.default_rng(0)
    lo, hi = env.robot.command_lower[:-1], env.robot.command_upper[:-1]
    index = [env.model.joint(j).qposadr[0] for j in env.robot.arm_joints]
    reach = 0.0
    for q in rng.uniform(lo, hi, (5000, env.robot.n_arm)):
        env.data.qpos[index] = q
        mujoco.mj_kinematics(env.model, env.data)
        reach = max(reach, float(np.linalg.norm(env.tool_position())))
    assert 0.95 * ARM_REACH < reach <= ARM_REACH
    assert TARGET_MAX_DISTANCE >= 2 * ARM_REACH


def test_gymnasium_env_checker_passes():
    env = ArmEnv(TASK)
    check_env(env, skip_render_check=True)
    assert isinstance(env, gymnasium.Env)


def test_task_dict_is_plain_json():
    task = ArmEnv({"target": np.array([0.3, 0.0, 0.1]), "payload_mass": np.float32(0.2)}).task
    assert json.loads(json.dumps(task)) == task


def test_urdf_without_a_tool_frame_is_rejected_by_name():
    text = share_file("urdf/mql_arm.urdf").read_text().replace('"tool0"', '"flange"')
    with pytest.raises(InputError, match="tool0"):
        ArmEnv(TASK, urdf=text)


@pytest.mark.parametrize("kwargs, match", [({"control_dt": 0.041}, "multiple"),
                                           ({"control_dt": 0.0}, "multiple"),
                                           ({"episode_steps": 0}, "episode_steps"),
                                           ({"reward": "sparse"}, "unknown reward")])
def test_bad_env_parameters_are_rejected_by_name(kwargs, match):
    with pytest.raises(InputError, match=match):
        ArmEnv(TASK, **kwargs)


def test_advance_rejects_a_non_finite_duration_and_keeps_the_state(env):
    env.reset(seed=8)
    before = env.joint_state()
    with pytest.raises(InputError, match="seconds"):
        env.advance(float("nan"))
    for a, b in zip(before, env.joint_state(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_controllers_yaml_drives_the_urdf_joints_on_the_contract_topics(urdf_root):
    cfg = yaml.safe_load(share_file("config/controllers.yaml").read_text())
    spec = RobotSpec.from_urdf()
    manager = cfg["controller_manager"]["ros__parameters"]
    assert manager["joint_state_broadcaster"]["type"] == "joint_state_broadcaster/JointStateBroadcaster"
    for name, joints in (("arm_controller", list(spec.arm_joints)),
                         ("gripper_controller", [spec.gripper_joints[0]])):
        assert manager[name]["type"] == "forward_command_controller/ForwardCommandController"
        assert cfg[name]["ros__parameters"] == {"joints": joints, "interface_name": "position"}
    hardware = urdf_root.find("ros2_control/hardware/plugin").text
    assert hardware == "gz_ros2_control/GazeboSimSystem"
    assert urdf_root.find("gazebo/plugin").get("filename") == "gz_ros2_control-system"
