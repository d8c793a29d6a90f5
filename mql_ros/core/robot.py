"""How observations and actions sit on the contract topics: RobotSpec (the arm) and BoxSpec (any other family).

RobotSpec: the arm's joints and limits, read once from the URDF, and the action <-> command mapping. The
policy acts in [-1, 1]; the robot takes absolute joint position targets. Keeping the mapping here (and its
exact inverse) lets the policy node, the simulator and the bag reader agree on what an action was.

BoxSpec: the encoding of a generic gymnasium family (Box spaces) on the same topics, so that its episodes
are archived and read back by the same step rule (docs/ARCHITECTURE.md, "Data conventions"). Both classes
offer the interface the step rule and the archive use (observation / split_observation, action_to_commands
/ commands_to_action, order_joint_state, to_dict); `spec_from_dict` reads either back from a checkpoint.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from mql_ros.core.errors import InputError
from mql_ros.core.paths import share_file

if TYPE_CHECKING:
    from gymnasium.spaces import Space

FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_finite(values: npt.ArrayLike) -> bool:
    """Finite, and still finite as float32: what the replay, the context and the networks hold. A value like
    1e39 passes a float64 isfinite check and becomes inf downstream."""
    return bool(np.all(np.abs(np.asarray(values, dtype=np.float64)) <= FLOAT32_MAX))  # NaN compares False


def order_joint_state(names: Sequence[str], values: npt.ArrayLike, expected: tuple[str, ...], what: str) -> np.ndarray:
    """Pick `expected` joints out of a JointState's (names, values), matched by name, never by index."""
    names = list(names)
    values = list(values)
    if len(names) != len(values):
        raise InputError(f"{what}: {len(names)} names but {len(values)} values")
    if len(set(names)) != len(names):
        raise InputError(f"{what}: duplicated joint names {names}")
    index = {n: i for i, n in enumerate(names)}
    missing = [j for j in expected if j not in index]
    if missing:
        raise InputError(f"{what}: missing joints {missing} (got {names})")
    return np.array([values[index[j]] for j in expected], dtype=np.float64)


def _finite(name: str, values, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != n:
        raise InputError(f"{name}: expected {n} values, got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise InputError(f"{name}: contains NaN or inf: {v.tolist()}")
    return v


@dataclass(frozen=True)
class RobotSpec:
    """Joint names in command order and their position limits (radians or metres)."""

    arm_joints: tuple[str, ...]
    gripper_joints: tuple[str, ...]
    arm_lower: tuple[float, ...]
    arm_upper: tuple[float, ...]
    gripper_lower: float
    gripper_upper: float

    def __post_init__(self) -> None:
        if not self.arm_joints:
            raise InputError("RobotSpec: arm_joints is empty")
        if not self.gripper_joints:
            raise InputError("RobotSpec: gripper_joints is empty")
        if len(set(self.arm_joints + self.gripper_joints)) != len(self.arm_joints) + len(self.gripper_joints):
            raise InputError(f"RobotSpec: duplicated joint names in {self.arm_joints + self.gripper_joints}")
        if not (len(self.arm_lower) == len(self.arm_upper) == len(self.arm_joints)):
            raise InputError("RobotSpec: arm limits do not match arm_joints in length")
        lo, hi = np.asarray(self.arm_lower), np.asarray(self.arm_upper)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
            raise InputError(f"RobotSpec: arm limits must be finite with lower < upper, got {lo} / {hi}")
        if not (np.isfinite(self.gripper_lower) and np.isfinite(self.gripper_upper)
                and self.gripper_lower < self.gripper_upper):
            raise InputError("RobotSpec: gripper limits must be finite with lower < upper")

    @property
    def n_arm(self) -> int:
        return len(self.arm_joints)

    @property
    def n_gripper(self) -> int:
        return len(self.gripper_joints)

    @property
    def obs_dim(self) -> int:
        return 2 * (self.n_arm + self.n_gripper)

    @property
    def act_dim(self) -> int:
        return self.n_arm + 1

    @property
    def command_lower(self) -> np.ndarray:
        """Lower limits of the n_arm + 1 commanded values (arm joints, then the gripper)."""
        return np.array(self.arm_lower + (self.gripper_lower,), dtype=np.float64)

    @property
    def command_upper(self) -> np.ndarray:
        return np.array(self.arm_upper + (self.gripper_upper,), dtype=np.float64)

    def observation(self, arm_pos: npt.ArrayLike, arm_vel: npt.ArrayLike, grip_pos: npt.ArrayLike,
                    grip_vel: npt.ArrayLike) -> np.ndarray:
        """Stack joint readings (already in spec order) into the observation vector; reject bad values."""
        return np.concatenate([_finite(name, values, n) for name, values, n in (
            ("arm position", arm_pos, self.n_arm), ("arm velocity", arm_vel, self.n_arm),
            ("gripper position", grip_pos, self.n_gripper), ("gripper velocity", grip_vel, self.n_gripper))])

    def split_observation(self, obs: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of `observation`: (arm position, arm velocity, gripper position, gripper velocity)."""
        o = _finite("observation", obs, self.obs_dim)
        n, g = self.n_arm, self.n_gripper
        return o[:n], o[n:2 * n], o[2 * n:2 * n + g], o[2 * n + g:]

    def action_to_commands(self, action: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Normalized action -> (arm position targets, gripper target), clamped to the joint limits.

        A non-finite action is an error: the caller decides to hold instead of guessing a command.
        """
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.act_dim:
            raise InputError(f"action: expected {self.act_dim} values, got {a.shape[0]}")
        if not np.all(np.isfinite(a)):
            raise InputError(f"action contains NaN or inf: {a.tolist()}")
        lo, hi = self.command_lower, self.command_upper
        cmd = np.clip(0.5 * (lo + hi) + np.clip(a, -1.0, 1.0) * 0.5 * (hi - lo), lo, hi)
        return cmd[: self.n_arm], cmd[self.n_arm:]

    def commands_to_action(self, arm_cmd: npt.ArrayLike, grip_cmd: npt.ArrayLike) -> np.ndarray:
        """Exact inverse of action_to_commands for commands inside the limits (clipped to [-1, 1])."""
        arm = np.asarray(arm_cmd, dtype=np.float64).reshape(-1)
        grip = np.asarray(grip_cmd, dtype=np.float64).reshape(-1)
        if arm.shape[0] != self.n_arm:
            raise InputError(f"arm command: expected {self.n_arm} values, got {arm.shape[0]}")
        if grip.shape[0] != 1:
            raise InputError(f"gripper command: expected 1 value, got {grip.shape[0]}")
        cmd = np.concatenate([arm, grip])
        if not float32_finite(cmd):
            raise InputError(f"command contains NaN or inf (as float32): {cmd.tolist()}")
        lo, hi = self.command_lower, self.command_upper
        return np.clip((cmd - 0.5 * (lo + hi)) / (0.5 * (hi - lo)), -1.0, 1.0)

    def order_joint_state(self, names: Sequence[str], values: npt.ArrayLike, expected: tuple[str, ...],
                          what: str) -> np.ndarray:
        return order_joint_state(names, values, expected, what)

    def to_dict(self) -> dict:
        return {"arm_joints": list(self.arm_joints), "gripper_joints": list(self.gripper_joints),
                "arm_lower": list(self.arm_lower), "arm_upper": list(self.arm_upper),
                "gripper_lower": self.gripper_lower, "gripper_upper": self.gripper_upper}

    @classmethod
    def from_dict(cls, d: dict) -> RobotSpec:
        return cls(tuple(d["arm_joints"]), tuple(d["gripper_joints"]), tuple(map(float, d["arm_lower"])),
                   tuple(map(float, d["arm_upper"])), float(d["gripper_lower"]), float(d["gripper_upper"]))

    @classmethod
    def from_urdf(cls, urdf: str | Path | None = None, arm_joints: tuple[str, ...] | None = None,
                  gripper_joints: tuple[str, ...] | None = None) -> RobotSpec:
        """Read joint limits from a URDF file path or XML string (default: the package's arm).

        Without explicit joint lists, arm joints are the non-fixed joints whose name does not contain
        "finger" and gripper joints those that do, in file order.
        """
        root = _urdf_root(urdf)
        limits: dict[str, tuple[float, float]] = {}
        movable: list[str] = []
        for joint in root.iter("joint"):
            if joint.get("type") in ("fixed", "floating", "planar", None):
                continue
            name = joint.get("name")
            lim = joint.find("limit")
            if lim is None or lim.get("lower") is None or lim.get("upper") is None:
                raise InputError(f"URDF joint {name!r} has no position limits")
            try:
                limits[name] = (float(lim.get("lower")), float(lim.get("upper")))
            except ValueError as exc:
                raise InputError(f"URDF joint {name!r}: limit lower={lim.get('lower')!r} upper={lim.get('upper')!r} "
                                 "is not a number") from exc
            movable.append(name)
        if arm_joints is None:
            arm_joints = tuple(j for j in movable if "finger" not in j)
        if gripper_joints is None:
            gripper_joints = tuple(j for j in movable if "finger" in j)
        unknown = [j for j in arm_joints + gripper_joints if j not in limits]
        if unknown:
            raise InputError(f"joints {unknown} are not movable joints of the URDF (it has {movable})")
        return cls(tuple(arm_joints), tuple(gripper_joints),
                   tuple(limits[j][0] for j in arm_joints), tuple(limits[j][1] for j in arm_joints),
                   limits[gripper_joints[0]][0], limits[gripper_joints[0]][1])


def _urdf_root(urdf: str | Path | None) -> ET.Element:
    """The parsed URDF from a file path or XML string (default: the package's arm)."""
    if urdf is None:
        urdf = share_file("urdf/mql_arm.urdf")
    text = str(urdf)
    where = "robot_description XML" if text.lstrip().startswith("<") else f"URDF file {urdf}"
    try:
        if not text.lstrip().startswith("<"):
            text = Path(urdf).read_text()
        return ET.fromstring(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {where}: {exc}") from exc
    except ET.ParseError as exc:
        raise InputError(f"{where} is not valid URDF XML: {exc}") from exc


def urdf_velocity_limits(urdf: str | Path | None, joints: tuple[str, ...]) -> np.ndarray:
    """Each joint's <limit velocity> (rad/s, m/s); inf where the URDF gives none. RobotSpec holds position
    limits only (checkpoints store it), so velocity-mode commands read these from the same URDF."""
    found = {j.get("name"): j.find("limit") for j in _urdf_root(urdf).findall("joint")}  # not ros2_control's <joint>s
    out = []
    for name in joints:
        lim = found.get(name)
        try:
            value = float(lim.get("velocity")) if lim is not None and lim.get("velocity") is not None else np.inf
        except ValueError as exc:
            raise InputError(f"URDF joint {name!r}: velocity limit {lim.get('velocity')!r} is not a number") from exc
        if not value > 0:
            raise InputError(f"URDF joint {name!r}: velocity limit must be > 0, got {value}")
        out.append(value)
    return np.array(out, dtype=np.float64)


@dataclass(frozen=True)
class BoxSpec:
    """The encoding of a generic family with a 1-D Box observation space (obs_dim values) and a 1-D Box
    action space (act_dim values) on the contract topics:

    - /joint_states: one "joint" per observation value, named obs_0 .. obs_{obs_dim-1}, position = the value,
      velocity = 0 (JointState needs equal lengths, and the step rule requires velocities of every joint it
      reads; zeros carry no information and are checked to be zeros on reading, so nothing is ambiguous);
    - /gripper/joint_states: no joints (empty name, position and velocity);
    - /arm_controller/commands: the action as the learner saw it, already normalized to [-1, 1];
    - /gripper_controller/commands: empty.
    So the same step rule (TransitionBuilder) rebuilds the same transitions from it as from arm bags.
    """

    obs_dim: int
    act_dim: int

    def __post_init__(self) -> None:
        for name in ("obs_dim", "act_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"BoxSpec: {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    @classmethod
    def from_spaces(cls, observation_space: Space, action_space: Space, where: str = "family") -> BoxSpec:
        """The encoding of an env's spaces; anything but 1-D Box spaces is an InputError naming the space."""
        import gymnasium

        for what, space in (("observation", observation_space), ("action", action_space)):
            if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
                raise InputError(f"{where}: the archive encodes 1-D Box spaces only; the {what} space is {space}")
        return cls(int(observation_space.shape[0]), int(action_space.shape[0]))

    @property
    def arm_joints(self) -> tuple[str, ...]:
        return tuple(f"obs_{i}" for i in range(self.obs_dim))

    @property
    def gripper_joints(self) -> tuple[str, ...]:
        return ()

    @property
    def n_arm(self) -> int:
        return self.obs_dim

    @property
    def n_gripper(self) -> int:
        return 0

    def observation(self, arm_pos: npt.ArrayLike, arm_vel: npt.ArrayLike, grip_pos: npt.ArrayLike,
                    grip_vel: npt.ArrayLike) -> np.ndarray:
        obs = _finite("observation (/joint_states positions)", arm_pos, self.obs_dim)
        vel = _finite("/joint_states velocities", arm_vel, self.obs_dim)
        if np.any(vel != 0.0):
            raise InputError(f"/joint_states velocities must be zeros in the generic (BoxSpec) encoding, "
                             f"got {vel.tolist()}")
        _finite("/gripper/joint_states positions", grip_pos, 0)
        _finite("/gripper/joint_states velocities", grip_vel, 0)
        return obs

    def split_observation(self, obs: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        o = _finite("observation", obs, self.obs_dim)
        return o, np.zeros(self.obs_dim), np.zeros(0), np.zeros(0)

    def action_to_commands(self, action: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """The normalized action itself (clipped to [-1, 1]) on the arm command topic; no gripper command."""
        return np.clip(_finite("action", action, self.act_dim), -1.0, 1.0), np.zeros(0)

    def commands_to_action(self, arm_cmd: npt.ArrayLike, grip_cmd: npt.ArrayLike) -> np.ndarray:
        a = _finite("/arm_controller/commands", arm_cmd, self.act_dim)
        _finite("/gripper_controller/commands", grip_cmd, 0)
        return np.clip(a, -1.0, 1.0)

    def order_joint_state(self, names: Sequence[str], values: npt.ArrayLike, expected: tuple[str, ...],
                          what: str) -> np.ndarray:
        return order_joint_state(names, values, expected, what)

    def to_dict(self) -> dict:
        return {"encoding": "box", "obs_dim": self.obs_dim, "act_dim": self.act_dim}


BagEncoding = RobotSpec | BoxSpec


def spec_from_dict(d: dict) -> BagEncoding:
    """A RobotSpec or BoxSpec from its to_dict() (a dict without "encoding" is a RobotSpec)."""
    if not isinstance(d, dict):
        raise InputError(f"spec: expected a mapping, got {type(d).__name__}")
    kind = d.get("encoding", "robot")
    if kind == "box":
        return BoxSpec(d["obs_dim"], d["act_dim"])
    if kind == "robot":
        return RobotSpec.from_dict(d)
    raise InputError(f"spec: unknown encoding {kind!r} (known: robot, box)")
