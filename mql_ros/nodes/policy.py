"""`policy`: the control loop. Each tick of `control_rate`: latest state + latest context -> actor -> command.

Safety rules (they hold whatever arrives on the wire):
- joints are matched by name; a state with NaN, missing joints or no velocities is rejected;
- it holds position when the state is older than `state_timeout`, the last state was rejected, the context
  is missing or older than `context_timeout`, or /mql/hold is on. Holding publishes the last valid measured
  positions as targets (zero velocities in velocity mode); before the first valid state it publishes
  nothing, because there is no safe target to command;
- every command is clamped to the URDF joint limits and is finite, or it is not published;
- a new checkpoint from /mql/policy_update replaces the running one only after DeployedPolicy validated it
  (config, robot and finite weights) and its sha256 matches the message; otherwise the old one keeps running.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float32MultiArray, Float64MultiArray, String
from std_srvs.srv import SetBool

from mql_ros.core.errors import CheckpointError, InputError
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.nodes.common import (
    ARM_COMMANDS,
    CONTEXT,
    GRIPPER_COMMANDS,
    GRIPPER_STATES,
    JOINT_STATES,
    LATCHED_QOS,
    POLICY_UPDATE,
    RELIABLE_QOS,
    SENSOR_QOS,
    Diagnostics,
    autostarted,
    checkpoint_path,
    declare,
    declare_robot,
    decode_joint_state,
    main_for,
)


class _Reading:
    """The latest valid reading of one topic and when it arrived (monotonic clock), or why it was refused."""

    def __init__(self) -> None:
        self.value = None
        self.stamp = -np.inf
        self.fault = ""

    def age(self, now: float) -> float:
        return now - self.stamp


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("policy", **kwargs)
        self.autostart = declare(self, "autostart", True,
                                 "configure and activate at start-up (plain ros2 run)")
        self.checkpoint = declare(self, "checkpoint", "", "checkpoint file; empty: the shipped "
                                  "share/mql_ros/checkpoints/arm_reach.pt")
        self.control_rate = declare(self, "control_rate", 25.0, "Hz: commands published per second",
                                    1.0, 1000.0)
        self.state_timeout = declare(self, "state_timeout", 0.2, "s: older state makes the policy hold",
                                     0.001, 10.0)
        self.context_timeout = declare(self, "context_timeout", 0.5, "s: older context makes the policy hold",
                                       0.001, 10.0)
        self.command_mode = declare(self, "command_mode", "position", "position targets or velocities on the "
                                    "command topics", choices=("position", "velocity"))
        self.trigger_mode = declare(self, "trigger", "timer", "timer: act at control_rate (the policy is the "
                                    "clock); state: act on each arm state (lowest latency behind a 100 Hz+ "
                                    "driver), the timer then only publishes holds",
                                    choices=("timer", "state"))
        self.max_velocity = declare(self, "max_velocity", 1.0, "rad/s (m/s for the gripper): velocity-mode "
                                    "command bound", 0.001, 100.0)
        self.robot = declare_robot(self)
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._arm, self._grip, self._ctx = _Reading(), _Reading(), _Reading()
        self._hold_requested = False
        self._ticks = 0
        self._held = 0
        self._timer = None
        self.policy: DeployedPolicy | None = None
        self.diag = Diagnostics(self)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.policy = DeployedPolicy.from_checkpoint(checkpoint_path(self.checkpoint), self.robot)
        except (CheckpointError, FileNotFoundError) as exc:
            self.get_logger().error(f"cannot load the policy: {exc}")
            self.diag.error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._arm_pub = self.create_lifecycle_publisher(Float64MultiArray, ARM_COMMANDS, RELIABLE_QOS)
        self._grip_pub = self.create_lifecycle_publisher(Float64MultiArray, GRIPPER_COMMANDS, RELIABLE_QOS)
        self.create_subscription(JointState, JOINT_STATES, self._on_arm_state, SENSOR_QOS)
        self.create_subscription(JointState, GRIPPER_STATES, self._on_gripper_state, SENSOR_QOS)
        self.create_subscription(Float32MultiArray, CONTEXT, self._on_context, SENSOR_QOS)
        self.create_subscription(String, POLICY_UPDATE, self._on_policy_update, LATCHED_QOS)
        self.create_service(SetBool, "mql/hold", self._on_hold)
        self.diag.values["checkpoint_sha256"] = self.policy.sha256
        self.diag.ok("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        self._timer = self.create_timer(1.0 / self.control_rate, self._tick)
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        self.diag.warn("inactive")
        return super().on_deactivate(state)

    # ------------------------------------------------------------------ inputs
    def _on_joint_state(self, reading: _Reading, msg: JointState, joints: tuple[str, ...], what: str) -> None:
        now = time.monotonic()
        try:
            value = decode_joint_state(self.robot, msg, joints, what)
        except InputError as exc:
            with self._lock:
                reading.fault = str(exc)
            self.diag.reject(what.replace(" ", "_"), str(exc))
            return
        with self._lock:
            reading.value, reading.stamp, reading.fault = value, now, ""

    def _on_arm_state(self, msg: JointState) -> None:
        self._on_joint_state(self._arm, msg, self.robot.arm_joints, "joint state")
        if self.trigger_mode == "state" and self._timer is not None:
            self._tick(from_state=True)

    def _on_gripper_state(self, msg: JointState) -> None:
        self._on_joint_state(self._grip, msg, self.robot.gripper_joints, "gripper state")

    def _on_context(self, msg: Float32MultiArray) -> None:
        z = np.asarray(msg.data, dtype=np.float32)
        expected = self.policy.context_dim
        if z.shape[0] != expected or not np.all(np.isfinite(z)):
            reason = f"expected {expected} finite values, got {z.shape[0]}: {z.tolist()[:8]}"
            with self._lock:
                self._ctx.fault = reason
            self.diag.reject("context", reason)
            return
        with self._lock:
            self._ctx.value, self._ctx.stamp, self._ctx.fault = z, time.monotonic(), ""

    def _on_hold(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            self._hold_requested = bool(request.data)
        response.success = True
        response.message = "holding position" if request.data else "policy resumed"
        self.get_logger().info(response.message)
        return response

    def _on_policy_update(self, msg: String) -> None:
        """Load the announced checkpoint in a worker thread: the single-threaded control loop never waits."""
        try:
            update = json.loads(msg.data)
            path, sha = str(update["path"]), str(update["sha256"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            self.diag.reject("policy_update", f"not a JSON object with path and sha256: {msg.data!r} ({exc})")
            return
        threading.Thread(target=self._load_update, args=(path, sha), daemon=True).start()

    def _load_update(self, path: str, sha: str) -> None:
        """Swap in a validated checkpoint; on any problem keep the running one and say why."""
        with self._update_lock:  # one update at a time
            self._apply_update(path, sha)

    def _apply_update(self, path: str, sha: str) -> None:
        if sha == self.policy.sha256:
            return
        try:
            candidate = DeployedPolicy.from_checkpoint(path, self.robot)
            if candidate.sha256 != sha:
                raise CheckpointError(f"checkpoint {path}: sha256 is {candidate.sha256}, "
                                      f"the update said {sha}")
            old = self.policy.checkpoint.config
            new = candidate.checkpoint.config
            if (new.context_dim, new.history_len, new.use_context) != (old.context_dim, old.history_len,
                                                                       old.use_context):
                raise CheckpointError(f"checkpoint {path}: context (dim {new.context_dim}, history "
                                      f"{new.history_len}) differs from the running policy's "
                                      f"(dim {old.context_dim}, history {old.history_len})")
        except (CheckpointError, InputError, ValueError) as exc:
            self.diag.reject("policy_update", f"kept checkpoint {self.policy.sha256[:12]}: {exc}")
            self.get_logger().error(f"policy update refused: {exc}")
            return
        with self._lock:
            self.policy = candidate
        self.diag.values["checkpoint_sha256"] = candidate.sha256
        self.diag.values["checkpoint_path"] = path
        self.get_logger().info(f"loaded checkpoint {path} ({sha[:12]})")

    # ------------------------------------------------------------------ the control tick
    def _hold_reason(self, now: float) -> str:
        """Why this tick must hold ('' if the policy may act). Called with the lock held."""
        if self._hold_requested:
            return "hold requested on mql/hold"
        for name, reading, timeout in (("joint state", self._arm, self.state_timeout),
                                       ("gripper state", self._grip, self.state_timeout),
                                       ("context", self._ctx, self.context_timeout)):
            if name == "context" and self.policy.context_dim == 0:
                continue
            if reading.fault:
                return f"last {name} rejected: {reading.fault}"
            if reading.value is None:
                return f"no {name} yet"
            if reading.age(now) > timeout:
                return f"{name} is {reading.age(now):.3f} s old (timeout {timeout} s)"
        return ""

    def _tick(self, from_state: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            reason = self._hold_reason(now)
            arm, grip, ctx, policy = self._arm.value, self._grip.value, self._ctx.value, self.policy
        if self.trigger_mode == "state" and not from_state and not reason:
            return  # acting is driven by state arrival; the timer only covers holds
        if arm is None or grip is None:
            self.diag.warn(f"no command published: {reason}")
            return
        (arm_q, arm_dq), (grip_q, grip_dq) = arm, grip
        if not reason:
            try:
                obs = self.robot.observation(arm_q, arm_dq, grip_q, grip_dq)
                context = ctx if policy.context_dim else np.zeros(0, np.float32)
                arm_cmd, grip_cmd = self.robot.action_to_commands(policy.act(obs, context))
            except InputError as exc:
                reason = f"policy output rejected: {exc}"
        if reason:
            lo, hi = self.robot.command_lower, self.robot.command_upper
            arm_cmd = np.clip(arm_q, lo[: self.robot.n_arm], hi[: self.robot.n_arm])
            grip_cmd = np.clip(grip_q[:1], lo[self.robot.n_arm:], hi[self.robot.n_arm:])
            self._held += 1
            self.diag.warn(f"holding: {reason}")
        else:
            self.diag.ok("running")
        if self.command_mode == "velocity":
            arm_cmd, grip_cmd = self._to_velocity(arm_cmd, arm_q, hold=bool(reason)), \
                self._to_velocity(grip_cmd, grip_q[:1], hold=bool(reason))
        self._arm_pub.publish(Float64MultiArray(data=arm_cmd.tolist()))
        self._grip_pub.publish(Float64MultiArray(data=grip_cmd.tolist()))
        self._ticks += 1
        self.diag.values.update({"ticks": self._ticks, "held_ticks": self._held, "holding": reason})

    def _to_velocity(self, target: np.ndarray, current: np.ndarray, hold: bool) -> np.ndarray:
        """Velocity that reaches the (in-limit) target in one control period, bounded by max_velocity."""
        if hold:
            return np.zeros_like(target)
        v = (target - current) * self.control_rate
        return np.clip(v, -self.max_velocity, self.max_velocity)


def main(args: list[str] | None = None) -> int:
    """`ros2 run mql_ros policy`; exit 2 on bad parameters or an unusable checkpoint."""
    return main_for(autostarted(PolicyNode, "policy"), args, threads=1)
