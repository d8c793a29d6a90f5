"""What the control loop may command: the policy node's safety rules, ROS-free so tests drive the same code.

The rules hold whatever arrives on the wire and whatever the weights are:
- a command is computed only from an arm state, a gripper state and a context that are valid and fresh
  (younger than `state_timeout` / `context_timeout`, and received since the clock last jumped); otherwise
  the loop holds;
- holding commands the last valid measured positions (clamped to the limits); before any valid state there
  is no safe target, so nothing is commanded;
- an acting command is finite, clamped to the URDF joint limits and then rate limited: no joint moves more
  than `max_arm_step` (rad) / `max_gripper_step` (m) from the previous command (from the measured positions
  when there is none). A non-finite actor output is a hold, never a guess;
- a policy update replaces the running policy only after it passed validation (accept_update), and the
  swap is one reference assignment, so a tick uses either the old policy or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mql_ros.core.errors import CheckpointError, InputError
from mql_ros.core.robot import RobotSpec, float32_finite
from mql_ros.core.runtime import DeployedPolicy


@dataclass
class Reading:
    """The latest valid value of one input, when it was measured (or arrived, if earlier unknown; on the guard's
    clock), why the last was refused, or why the value, though valid, no longer counts as fresh."""

    value: object = None
    stamp: float = -np.inf
    fault: str = ""
    stale: str = ""

    def accept(self, value: object, now: float) -> None:
        self.value, self.stamp, self.fault, self.stale = value, now, "", ""

    def refuse(self, reason: str) -> None:
        self.fault = reason

    def expire(self, reason: str) -> None:
        self.stale = reason


@dataclass(frozen=True)
class SafetyLimits:
    state_timeout: float  # s
    context_timeout: float  # s
    max_arm_step: float  # rad per command
    max_gripper_step: float  # m per command

    def __post_init__(self) -> None:
        for name in ("state_timeout", "context_timeout", "max_arm_step", "max_gripper_step"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise InputError(f"SafetyLimits: {name} must be finite and > 0, got {value}")


@dataclass(frozen=True)
class Command:
    """Position targets for the arm (n_arm values) and the gripper (1 value); `hold` says why it holds."""

    arm: np.ndarray
    gripper: np.ndarray
    hold: str = ""


def read_joint_state(robot: RobotSpec, names: Sequence[str], positions: npt.ArrayLike, velocities: npt.ArrayLike,
                     joints: tuple[str, ...], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions, velocities) of `joints`, matched by name; InputError on NaN/inf, gaps or no velocities."""
    pos = robot.order_joint_state(names, positions, joints, f"{what} position")
    if len(velocities) == 0:
        raise InputError(f"{what}: no velocities (the observation needs them)")
    vel = robot.order_joint_state(names, velocities, joints, f"{what} velocity")
    if not (float32_finite(pos) and float32_finite(vel)):
        raise InputError(f"{what}: contains NaN or inf (as float32): position {pos.tolist()} velocity {vel.tolist()}")
    return pos, vel


class CommandGuard:
    """The latest readings and the last command; turns them and a policy into a safe Command."""

    def __init__(self, robot: RobotSpec, limits: SafetyLimits) -> None:
        self.robot = robot
        self.limits = limits
        self.arm, self.gripper, self.context = Reading(), Reading(), Reading()
        self.hold_requested = False
        n = robot.n_arm
        self._lo, self._hi = robot.command_lower, robot.command_upper
        self._step = np.array([limits.max_arm_step] * n + [limits.max_gripper_step])
        self._last: np.ndarray | None = None  # the last command, arm then gripper

    def reset(self, previous: np.ndarray | None = None) -> None:
        """Forget the last command: the next one is rate limited from the measured positions, or from
        `previous` (arm then gripper, a command published before, e.g. by another guard)."""
        self._last = None if previous is None else np.asarray(previous, dtype=np.float64).copy()

    def expire_inputs(self, reason: str) -> None:
        """Make every input stale until a new one arrives, keeping its value so holding still commands the last
        measured positions. For a clock jump (a sim reset, a bag played again): the stamps now count on another
        timeline, and a jump back by less than a timeout would otherwise pass them as fresh again."""
        for reading in (self.arm, self.gripper, self.context):
            reading.expire(reason)

    def set_joint_state(self, which: str, names: Sequence[str], positions: npt.ArrayLike,
                        velocities: npt.ArrayLike, now: float,
                        measured_age: float | None = None) -> None:
        """Accept an 'arm' or 'gripper' JointState's fields; InputError (and a fault: hold) if malformed, or if
        its header stamp says it was measured more than state_timeout ago (`measured_age`, s; None: unstamped).
        Arrival time alone would let a late or replayed state count as fresh. Its age from then on counts from
        when it was measured, if that was before it arrived: a state that arrived late goes stale sooner.
        A stamp more than state_timeout ahead of `now`'s clock is refused too: the sender's clock is ahead of
        ours by more than the window, so a stamp can no longer tell a late state from a fresh one."""
        reading, joints = ((self.arm, self.robot.arm_joints) if which == "arm"
                           else (self.gripper, self.robot.gripper_joints))
        timeout = self.limits.state_timeout
        try:
            if measured_age is not None and not measured_age <= timeout:
                raise InputError(f"{which} state was measured {measured_age:.3f} s ago by its header stamp "
                                 f"(state_timeout {timeout} s)")
            if measured_age is not None and measured_age < -timeout:
                raise InputError(f"{which} state is stamped {-measured_age:.3f} s ahead of this node's clock "
                                 f"(more than state_timeout {timeout} s): the sender's clock and ours disagree, "
                                 "synchronize them (e.g. chrony)")
            value = read_joint_state(self.robot, names, positions, velocities, joints, f"{which} state")
        except InputError as exc:
            reading.refuse(str(exc))
            raise
        reading.accept(value, now - max(measured_age or 0.0, 0.0))

    def set_context(self, z: npt.ArrayLike, expected_dim: int, now: float) -> None:
        """Accept a context of `expected_dim` finite values; InputError (and a fault) otherwise."""
        z = np.asarray(z, dtype=np.float32).reshape(-1)
        if z.shape[0] != expected_dim or not np.all(np.isfinite(z)):
            reason = f"expected {expected_dim} finite values, got {z.shape[0]}: {z.tolist()[:8]}"
            self.context.refuse(reason)
            raise InputError(f"context: {reason}")
        self.context.accept(z, now)

    def hold_reason(self, now: float, policy: DeployedPolicy) -> str:
        """Why a command at `now` must hold ('' if the policy may act)."""
        if self.hold_requested:
            return "hold requested on mql/hold"
        for name, reading, timeout in (("joint state", self.arm, self.limits.state_timeout),
                                       ("gripper state", self.gripper, self.limits.state_timeout),
                                       ("context", self.context, self.limits.context_timeout)):
            if name == "context" and policy.context_dim == 0:
                continue
            if reading.fault:
                return f"last {name} rejected: {reading.fault}"
            if reading.value is None:
                return f"no {name} yet"
            if reading.stale:
                return f"{name} is stale: {reading.stale}"
            age = now - reading.stamp
            if age < -timeout:  # a simulated clock moved back (a sim reset, a bag played again) since it arrived
                return f"{name} arrived {-age:.3f} s ahead of now: the clock moved back since (timeout {timeout} s)"
            if not age <= timeout:
                return f"{name} is {age:.3f} s old (timeout {timeout} s)"
        return ""

    def command(self, now: float, policy: DeployedPolicy) -> Command | None:
        """The command for a tick at `now`, or None when no valid state was ever received."""
        if self.arm.value is None or self.gripper.value is None:
            return None
        (arm_q, arm_dq), (grip_q, grip_dq) = self.arm.value, self.gripper.value
        reason = self.hold_reason(now, policy)
        if not reason:
            try:
                obs = self.robot.observation(arm_q, arm_dq, grip_q, grip_dq)
                z = self.context.value if policy.context_dim else np.zeros(0, np.float32)
                arm, grip = self.robot.action_to_commands(policy.act(obs, z))
                target = self._rate_limited(np.concatenate([arm, grip]), arm_q, grip_q)
            except InputError as exc:
                reason = f"policy output rejected: {exc}"
        if reason:
            target = self._measured(arm_q, grip_q)
        self._last = target
        n = self.robot.n_arm
        return Command(target[:n].copy(), target[n:].copy(), reason)

    def _measured(self, arm_q, grip_q) -> np.ndarray:
        return np.clip(np.concatenate([arm_q, np.asarray(grip_q)[:1]]), self._lo, self._hi)

    def _rate_limited(self, target: np.ndarray, arm_q, grip_q) -> np.ndarray:
        ref = self._last if self._last is not None else self._measured(arm_q, grip_q)
        out = np.clip(np.clip(target, ref - self._step, ref + self._step), self._lo, self._hi)
        if not np.all(np.isfinite(out)):  # cannot happen for finite inputs; never send it if it does
            raise InputError(f"command is not finite: {out.tolist()}")
        return out


def to_velocity(target: np.ndarray, current: np.ndarray, rate: float, max_velocity: float | np.ndarray,
                hold: bool) -> np.ndarray:
    """Velocity that reaches the (safe) target in one control period, bounded by max_velocity (one bound, or
    one per joint); 0 to hold."""
    if hold:
        return np.zeros_like(target)
    return np.clip((target - current) * rate, -max_velocity, max_velocity)


def parse_update(data: str) -> tuple[str, str]:
    """(path, sha256) of a /mql/policy_update message; InputError if it is not that JSON object."""
    try:
        update = json.loads(data)
        path, sha = update["path"], update["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"not a JSON object with path and sha256: {data[:200]!r} ({exc})") from exc
    if not (isinstance(path, str) and isinstance(sha, str) and path):
        raise InputError(f"path and sha256 must be non-empty strings: {data[:200]!r}")
    return path, sha


def accept_update(path: str | Path, sha: str, running: DeployedPolicy, robot: RobotSpec) -> DeployedPolicy:
    """A validated policy to replace `running` with: CheckpointError unless the file loads and validates for
    `robot`, its sha256 is `sha`, and its context has the running one's size and history. Whatever else a file
    makes the loader raise is a CheckpointError too: a node's update path must outlive any file."""
    try:
        candidate = DeployedPolicy.from_checkpoint(path, robot)
    except (CheckpointError, InputError):
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if candidate.sha256 != sha:
        raise CheckpointError(f"checkpoint {path}: sha256 is {candidate.sha256}, the update said {sha}")
    old, new = running.checkpoint.config, candidate.checkpoint.config
    if (new.context_dim, new.history_len, new.use_context) != (old.context_dim, old.history_len,
                                                               old.use_context):
        raise CheckpointError(f"checkpoint {path}: context (dim {new.context_dim}, history {new.history_len}) "
                              f"differs from the running policy's (dim {old.context_dim}, history "
                              f"{old.history_len})")
    return candidate
