"""ArmEnv: the package's URDF arm in MuJoCo, as a gymnasium env and as the sim_arm node's hardware.

The URDF is the one description of the robot: MjSpec loads it and only adds what a URDF cannot say to
MuJoCo (position servos, a table, a payload at the tool, a target marker). Observations and actions go
through RobotSpec, so the simulator, the policy node and the bag reader agree on every number.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import gymnasium
import mujoco
import numpy as np
import numpy.typing as npt

from mql_ros.core.errors import InputError
from mql_ros.core.paths import share_file
from mql_ros.core.robot import RobotSpec

PHYSICS_DT = 0.002
# Position servo stiffness per joint (N m/rad, N/m for the finger): stiff enough to settle within a few
# 0.04 s control steps, soft enough that payload and damping visibly change the motion.
SERVO_KP = {"base_yaw_joint": 40.0, "shoulder_pitch_joint": 60.0, "elbow_pitch_joint": 40.0,
            "wrist_pitch_joint": 15.0, "finger_left_joint": 200.0}
# Reflected rotor inertia of geared joint motors (kg m^2, kg for the fingers). URDF has no field for it;
# without it the light links whip at 50-90 rad/s under bang-bang commands, far from any real arm.
ARMATURE = {"base_yaw_joint": 0.1, "shoulder_pitch_joint": 0.1, "elbow_pitch_joint": 0.05,
            "wrist_pitch_joint": 0.02, "finger_left_joint": 0.05, "finger_right_joint": 0.05}
TASK_DEFAULTS = {"payload_mass": 0.0, "damping_scale": 1.0, "friction_scale": 1.0}
# Physical bounds of a task (check_task). Generous around what the built-in families draw (arm_payload's
# ood split: payload up to 3.1 kg, damping scale 0.46-3.3, friction scale 0.46-2.2; arm_reach's ood targets
# 0.53 m from the base), and still far inside what the physics stays stable at (random bang-bang actions:
# no divergence with 20 kg, damping or friction scale 0.01 or 100). Beyond them a task is a typo or an
# attack: a target at 1e160 m made every reward -inf, a 1e308 kg payload made MuJoCo unstable.
TASK_RANGES = {"payload_mass": (0.0, 10.0), "damping_scale": (0.01, 100.0), "friction_scale": (0.01, 100.0)}
TASK_UNITS = {"payload_mass": "kg", "damping_scale": "x the URDF damping", "friction_scale": "x the URDF friction"}
ARM_REACH = 0.72  # m: the farthest the tool gets from the base (the world origin) over the joint ranges
TARGET_MAX_DISTANCE = 1.5  # m from the base: about twice the arm's reach
REWARDS = ("reach", "reach_smooth")
_MIN_MASS = 1e-6  # kg: "no payload" (MuJoCo needs a positive mass on a body with inertia)
_INSTABILITY_WARNINGS = (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                         mujoco.mjtWarning.mjWARN_BADQACC)
_LIMIT_SLACK = 0.5  # rad (or m): soft limits yield a little; this far beyond them the state is garbage
_MAX_SPEED = 100.0  # rad/s: no servo of this arm gets anywhere near it
_RESET_NOISE = 0.05  # rad: initial joint positions are home +- this, so episodes do not all start alike


def check_task(task: dict) -> dict:
    """Validate a task dict and return it as plain JSON-able floats with defaults filled in.

    Keys: "target" [x, y, z] in metres (world frame, table top at z = 0, within TARGET_MAX_DISTANCE of the
    base), and optionally "payload_mass" (kg), "damping_scale" and "friction_scale" (multiply the URDF joint
    damping / friction), each within its TASK_RANGES bounds. An InputError names the key, the value and the
    allowed range.
    """
    if not isinstance(task, dict):
        raise InputError(f"task must be a dict, got {type(task).__name__}")
    unknown = sorted(set(task) - {"target", *TASK_DEFAULTS})
    if unknown:
        raise InputError(f"task has unknown keys {unknown} (allowed: target, {', '.join(TASK_DEFAULTS)})")
    if "target" not in task:
        raise InputError("task has no 'target' [x, y, z]")
    try:
        target = np.asarray(task["target"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InputError(f"task target is not a list of numbers: {task['target']!r}") from e
    if target.shape[0] != 3 or not np.all(np.isfinite(target)):
        raise InputError(f"task target must be 3 finite numbers, got {task['target']!r}")
    # |target| <= bound, tested per coordinate first so that a huge value cannot overflow the norm
    if np.any(np.abs(target) > TARGET_MAX_DISTANCE) or np.linalg.norm(target) > TARGET_MAX_DISTANCE:
        raise InputError(f"task target {target.tolist()} must lie within {TARGET_MAX_DISTANCE} m of the arm's "
                         f"base (the world origin; the arm reaches about {ARM_REACH} m)")
    out = {"target": [float(v) for v in target]}
    for key, default in TASK_DEFAULTS.items():
        try:
            value = float(task.get(key, default))
        except (TypeError, ValueError) as e:
            raise InputError(f"task {key} is not a number: {task[key]!r}") from e
        lo, hi = TASK_RANGES[key]
        if not lo <= value <= hi:  # NaN compares False
            raise InputError(f"task {key} must be within [{lo}, {hi}] ({TASK_UNITS[key]}), got {value}")
        out[key] = value
    return out


def copy_task(task: dict) -> dict:
    """A copy whose lists can be changed without touching the original (task dicts are shallow JSON)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in task.items()}


def _build_model(urdf_text: str, robot: RobotSpec) -> mujoco.MjModel:
    """URDF -> MjModel with servos, a table (the only thing the arm collides with), payload and target."""
    spec = mujoco.MjSpec.from_string(urdf_text)
    spec.option.timestep = PHYSICS_DT
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    for geom in spec.geoms:  # links never collide with each other, only with the table (contype 1 -> 1)
        if geom.contype:
            geom.contype, geom.conaffinity = 1, 0
    table = spec.worldbody.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, size=[0.5, 0.6, 0.02],
                                    pos=[0.25, 0.0, -0.02], rgba=[0.6, 0.5, 0.4, 1.0])
    table.contype, table.conaffinity = 0, 1
    tool = spec.body("tool0")
    if tool is None:
        raise InputError("URDF has no link 'tool0' (the tool frame the reward measures)")
    payload = tool.add_body(name="payload", mass=_MIN_MASS, inertia=[0.4 * _MIN_MASS * 0.02**2] * 3)
    payload.add_geom(name="payload_geom", type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[0.02, 0, 0],
                     contype=0, conaffinity=0, rgba=[0.2, 0.3, 0.9, 1.0], density=0)
    spec.worldbody.add_site(name="target", type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[0.02, 0, 0],
                            rgba=[0.1, 0.9, 0.1, 0.6])
    for joint in robot.arm_joints + robot.gripper_joints:
        if spec.joint(joint) is None:
            raise InputError(f"URDF joint {joint!r} not found by MuJoCo")
        spec.joint(joint).armature = ARMATURE.get(joint, 0.0)
    for joint in robot.arm_joints + robot.gripper_joints[:1]:
        act = spec.add_actuator(name=f"{joint}_servo", target=joint,
                                trntype=mujoco.mjtTrn.mjTRN_JOINT)
        act.set_to_position(kp=SERVO_KP.get(joint, 40.0), dampratio=1.0, inheritrange=True)
    return spec.compile()


class ArmEnv(gymnasium.Env):
    """Reach a task target with the tool frame; the task (target, payload, damping) is never observed.

    step(action) == apply_commands(*robot.action_to_commands(action)) + advance(control_dt): the ROS node
    and the gymnasium loop drive the same physics through the same two calls.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: dict, urdf: str | Path | None = None, episode_steps: int = 50,
                 control_dt: float = 0.04, reward: str = "reach") -> None:
        if reward not in REWARDS:
            raise InputError(f"unknown reward {reward!r} (choose from {REWARDS})")
        if not (isinstance(episode_steps, int) and episode_steps > 0):
            raise InputError(f"episode_steps must be a positive int, got {episode_steps!r}")
        if not (math.isfinite(control_dt) and control_dt >= PHYSICS_DT
                and abs(control_dt / PHYSICS_DT - round(control_dt / PHYSICS_DT)) < 1e-6):
            raise InputError(f"control_dt must be a positive multiple of the physics step {PHYSICS_DT} s, "
                             f"got {control_dt}")
        text = str(urdf) if urdf is not None and str(urdf).lstrip().startswith("<") else \
            Path(urdf if urdf is not None else share_file("urdf/mql_arm.urdf")).read_text()
        self.robot = RobotSpec.from_urdf(text)
        self.model = _build_model(text, self.robot)
        self.data = mujoco.MjData(self.model)
        self.control_dt = float(control_dt)
        self.episode_steps = episode_steps
        self.reward_kind = reward

        m = self.model
        arm = [m.joint(j) for j in self.robot.arm_joints]
        grip = [m.joint(j) for j in self.robot.gripper_joints]
        self._arm_q = np.array([j.qposadr[0] for j in arm])
        self._arm_v = np.array([j.dofadr[0] for j in arm])
        self._grip_q = np.array([j.qposadr[0] for j in grip])
        self._grip_v = np.array([j.dofadr[0] for j in grip])
        self._tool = m.body("tool0").id
        self._payload = m.body("payload").id
        self._target_site = m.site("target").id
        self._base_damping = m.dof_damping.copy()
        self._base_friction = m.dof_frictionloss.copy()

        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.robot.obs_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (self.robot.act_dim,), np.float32)

        self._task = check_task(task)
        self._pending_task: dict | None = None
        self._target = np.asarray(self._task["target"])
        self._steps = 0
        self.diverged = False
        self.divergence = ""  # why the physics last diverged (advance), for the caller to report
        self._apply_task(self._task)
        self._reset_physics(np.random.default_rng(0))

    # ------------------------------------------------------------------ task
    @property
    def task(self) -> dict:
        """The task in effect (a copy): what goes into /mql/episode events."""
        return copy_task(self._task)

    def set_task(self, task: dict) -> None:
        """Validate now, apply at the next reset, so an episode never changes task half-way."""
        self._pending_task = check_task(task)

    def _apply_task(self, task: dict) -> None:
        m = self.model
        m.dof_damping[:] = self._base_damping * task["damping_scale"]
        m.dof_frictionloss[:] = self._base_friction * task["friction_scale"]
        mass = max(task["payload_mass"], _MIN_MASS)  # a solid 2 cm sphere at the tool
        m.body_mass[self._payload] = mass
        m.body_inertia[self._payload] = 0.4 * mass * 0.02**2
        m.site_pos[self._target_site] = task["target"]
        self._target = np.asarray(task["target"], dtype=np.float64)
        mujoco.mj_setConst(m, self.data)  # body masses changed: refresh the derived constants

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if self._pending_task is not None:
            self._task, self._pending_task = self._pending_task, None
            self._apply_task(self._task)
        self._reset_physics(self.np_random)
        return self._observation(), {"task": self.task}

    def step(self, action: npt.ArrayLike) -> tuple[np.ndarray, float, bool, bool, dict]:
        arm_cmd, grip_cmd = self.robot.action_to_commands(action)
        self.apply_commands(arm_cmd, grip_cmd)
        diverged = self.advance(self.control_dt)
        self._steps += 1
        obs = self._observation()
        reward = self.current_reward()
        truncated = self._steps >= self.episode_steps or diverged
        return obs, reward, False, truncated, {"distance": self.distance(), "diverged": diverged}

    # ------------------------------------------------------------------ ROS path
    def apply_commands(self, arm_cmd: npt.ArrayLike, grip_cmd: npt.ArrayLike) -> None:
        """Absolute joint position targets (what /arm_controller/commands carries), clamped to the limits."""
        self.data.ctrl[:] = self.servo_targets(arm_cmd, grip_cmd)

    def servo_targets(self, arm_cmd: npt.ArrayLike, grip_cmd: npt.ArrayLike) -> np.ndarray:
        """The actuator inputs (data.ctrl) that apply_commands sets for these commands."""
        arm = np.asarray(arm_cmd, dtype=np.float64).reshape(-1)
        grip = np.asarray(grip_cmd, dtype=np.float64).reshape(-1)
        if arm.shape[0] != self.robot.n_arm or grip.shape[0] != 1:
            raise InputError(f"commands: expected {self.robot.n_arm} arm values and 1 gripper value, "
                             f"got {arm.shape[0]} and {grip.shape[0]}")
        cmd = np.concatenate([arm, grip])
        if not np.all(np.isfinite(cmd)):
            raise InputError(f"commands contain NaN or inf: {cmd.tolist()}")
        return np.clip(cmd, self.robot.command_lower, self.robot.command_upper)

    def advance(self, seconds: float) -> bool:
        """Run the physics for `seconds` with the current targets; returns True if it had to reset.

        A diverged simulation is reset to the home pose with a warning (the reason in `divergence`): NaN
        never reaches a caller.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise InputError(f"advance: seconds must be finite and >= 0, got {seconds}")
        n = int(round(seconds / PHYSICS_DT))
        if n == 0:
            return False
        instabilities = self._instability_count()
        mujoco.mj_step(self.model, self.data, nstep=n)
        problem = self._physics_problem(instabilities)
        if problem is None:
            return False
        warnings.warn(f"ArmEnv: the physics diverged ({problem}); resetting the arm to its home pose",
                      RuntimeWarning, stacklevel=2)
        self._reset_physics(self.np_random)
        self.diverged, self.divergence = True, problem
        return True

    def joint_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(arm q, arm dq, gripper q, gripper dq) in RobotSpec joint order, copies."""
        d = self.data
        return (d.qpos[self._arm_q].copy(), d.qvel[self._arm_v].copy(),
                d.qpos[self._grip_q].copy(), d.qvel[self._grip_v].copy())

    def tool_position(self) -> np.ndarray:
        return self.data.xpos[self._tool].copy()

    def tool_jacobian(self) -> np.ndarray:
        """d(tool position)/d(arm joint positions) at the current state, 3 x n_arm: how a change of the held
        arm command moves the tool (what an oracle needs to correct a steady-state miss)."""
        jacp = np.zeros((3, self.model.nv))
        mujoco.mj_jacBody(self.model, self.data, jacp, None, self._tool)
        return jacp[:, self._arm_v]

    def distance(self) -> float:
        """Tool-to-target distance in metres."""
        return self._distance(self.data)

    def current_reward(self) -> float:
        """Dense reward of the current state: minus the tool-target distance (plus a motion cost)."""
        return self.reward_of(self.data)

    def reward_of(self, data: mujoco.MjData) -> float:
        """current_reward of the state in `data` (its kinematics computed) instead of the env's own: what
        scores states that mujoco.rollout simulated outside the env."""
        reward = -self._distance(data)
        if self.reward_kind == "reach_smooth":
            reward -= 0.01 * float(np.sum(data.qvel[self._arm_v] ** 2))
        return reward

    def implausible(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Per row of (states, nq) positions and (states, nv) velocities: joints far outside their limits or
        moving implausibly fast, a state the simulation cannot be trusted in."""
        lo, hi = self.model.jnt_range[:, 0], self.model.jnt_range[:, 1]
        return (np.any(qpos < lo - _LIMIT_SLACK, axis=-1) | np.any(qpos > hi + _LIMIT_SLACK, axis=-1)
                | np.any(np.abs(qvel) > _MAX_SPEED, axis=-1))

    # ------------------------------------------------------------------ internals
    def _distance(self, data: mujoco.MjData) -> float:
        return float(np.linalg.norm(data.xpos[self._tool] - self._target))

    def _observation(self) -> np.ndarray:
        return self.robot.observation(*self.joint_state()).astype(np.float32)

    def _instability_count(self) -> int:
        return sum(int(self.data.warning[w].number) for w in _INSTABILITY_WARNINGS)

    def _physics_problem(self, instabilities_before: int) -> str | None:
        """Why the state cannot be trusted, or None. (MuJoCo itself resets on a huge qpos/qvel/qacc.)"""
        d = self.data
        if self._instability_count() > instabilities_before:
            return "MuJoCo reported NaN, inf or a huge value in the joint state"
        if not (np.all(np.isfinite(d.qpos)) and np.all(np.isfinite(d.qvel))):
            return "non-finite joint state"
        if self.implausible(d.qpos, d.qvel):
            return "joints far outside their limits or moving implausibly fast"
        return None

    def _reset_physics(self, rng: np.random.Generator) -> None:
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        lo, hi = self.robot.command_lower, self.robot.command_upper
        home = np.clip(rng.uniform(-_RESET_NOISE, _RESET_NOISE, self.robot.n_arm), lo[:-1], hi[:-1])
        d.qpos[self._arm_q] = home
        d.qpos[self._grip_q] = lo[-1]
        d.ctrl[:] = np.concatenate([home, lo[-1:]])
        mujoco.mj_forward(m, d)
        self._steps = 0
