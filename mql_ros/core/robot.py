"""RobotSpec: the arm's joints and limits, read once from the URDF, and the action <-> command mapping.

The policy acts in [-1, 1]; the robot takes absolute joint position targets. Keeping the mapping here (and
its exact inverse) lets the policy node, the simulator and the bag reader agree on what an action was.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mql_ros.core.errors import InputError
from mql_ros.core.paths import share_file


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

    def observation(self, arm_pos, arm_vel, grip_pos, grip_vel) -> np.ndarray:
        """Stack joint readings (already in spec order) into the observation vector; reject bad values."""
        parts = []
        for name, values, n in (("arm position", arm_pos, self.n_arm), ("arm velocity", arm_vel, self.n_arm),
                                ("gripper position", grip_pos, self.n_gripper),
                                ("gripper velocity", grip_vel, self.n_gripper)):
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            if v.shape[0] != n:
                raise InputError(f"{name}: expected {n} values, got {v.shape[0]}")
            if not np.all(np.isfinite(v)):
                raise InputError(f"{name}: contains NaN or inf: {v.tolist()}")
            parts.append(v)
        return np.concatenate(parts)

    def action_to_commands(self, action) -> tuple[np.ndarray, np.ndarray]:
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

    def commands_to_action(self, arm_cmd, grip_cmd) -> np.ndarray:
        """Exact inverse of action_to_commands for commands inside the limits (clipped to [-1, 1])."""
        arm = np.asarray(arm_cmd, dtype=np.float64).reshape(-1)
        grip = np.asarray(grip_cmd, dtype=np.float64).reshape(-1)
        if arm.shape[0] != self.n_arm:
            raise InputError(f"arm command: expected {self.n_arm} values, got {arm.shape[0]}")
        if grip.shape[0] != 1:
            raise InputError(f"gripper command: expected 1 value, got {grip.shape[0]}")
        cmd = np.concatenate([arm, grip])
        if not np.all(np.isfinite(cmd)):
            raise InputError(f"command contains NaN or inf: {cmd.tolist()}")
        lo, hi = self.command_lower, self.command_upper
        return np.clip((cmd - 0.5 * (lo + hi)) / (0.5 * (hi - lo)), -1.0, 1.0)

    def order_joint_state(self, names, values, expected: tuple[str, ...], what: str) -> np.ndarray:
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
        if urdf is None:
            urdf = share_file("urdf/mql_arm.urdf")
        text = str(urdf)
        if not text.lstrip().startswith("<"):
            text = Path(urdf).read_text()
        root = ET.fromstring(text)
        limits: dict[str, tuple[float, float]] = {}
        movable: list[str] = []
        for joint in root.iter("joint"):
            if joint.get("type") in ("fixed", "floating", "planar", None):
                continue
            name = joint.get("name")
            lim = joint.find("limit")
            if lim is None or lim.get("lower") is None or lim.get("upper") is None:
                raise InputError(f"URDF joint {name!r} has no position limits")
            limits[name] = (float(lim.get("lower")), float(lim.get("upper")))
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
