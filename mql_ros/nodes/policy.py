"""`policy`: the control loop. Each tick of `control_rate`: latest state + latest context -> actor -> command.

Safety rules (they hold whatever arrives on the wire; mql_ros.core.safety implements them, the node only
feeds it):
- joints are matched by name; a state with NaN, missing joints or no velocities is rejected;
- it holds position when the state is older than `state_timeout`, the last state was rejected, the context
  is missing or older than `context_timeout`, or /mql/hold is on (under use_sim_time the timeouts are sim
  seconds, and when the sim clock moves back, or use_sim_time is switched, every earlier input is stale:
  rclpy's clock jump callback says so, however small the jump). Holding
  publishes the last valid measured positions as targets (zero velocities in velocity mode); before the
  first valid state it publishes nothing, because there is no safe target to command;
- every command is clamped to the URDF joint limits, rate limited (`max_arm_step`, `max_gripper_step`
  per command) and finite, or it is not published;
- a new checkpoint from /mql/policy_update replaces the running one only after DeployedPolicy validated it
  (config, robot and finite weights) and its sha256 matches the message; otherwise the old one keeps running.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
from rclpy.clock import ClockChange, JumpThreshold, TimeJump
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float32MultiArray, Float64MultiArray, String
from std_srvs.srv import SetBool

from mql_ros.core.errors import CheckpointError, InputError
from mql_ros.core.robot import urdf_velocity_limits
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.core.safety import CommandGuard, SafetyLimits, accept_update, parse_update, to_velocity
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
    main_for,
    set_realtime_priority,
    stamp_ns,
)


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
        max_velocity = declare(self, "max_velocity", 1.0, "rad/s (m/s for the gripper): velocity-mode command "
                               "bound, lowered to each joint's URDF velocity limit", 0.001, 100.0)
        max_arm_step = declare(self, "max_arm_step", 0.5, "rad: rate limit, the most an arm joint's command "
                               "may change from the previous command", 0.0001, 10.0)
        max_gripper_step = declare(self, "max_gripper_step", 0.035, "m: rate limit of the gripper command "
                                   "per command", 0.00001, 1.0)
        self.realtime_priority = declare(self, "realtime_priority", 0, "SCHED_FIFO priority of the node's "
                                         "threads once active (0: normal scheduling); needs CAP_SYS_NICE or "
                                         "an rtprio limit, else a warning and normal scheduling", 0, 99)
        self.robot = declare_robot(self)
        # per commanded value (arm joints, then the gripper's first joint): never above the URDF's limit
        self.velocity_bound = np.minimum(max_velocity, urdf_velocity_limits(
            self.get_parameter("robot_description").value or None,
            self.robot.arm_joints + self.robot.gripper_joints[:1]))
        self._lock = threading.Lock()
        self.guard = CommandGuard(self.robot, SafetyLimits(self.state_timeout, self.context_timeout,
                                                           max_arm_step, max_gripper_step))
        # any jump back (the threshold is 1 ns) or change of time source, not only one larger than a timeout
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1)),
            post_callback=self._on_clock_jump)
        self._ticks = 0
        self._held = 0
        self._timer = None
        self._endpoints: list = []  # what on_configure created, for on_cleanup to destroy
        self.policy: DeployedPolicy | None = None
        self.diag = Diagnostics(self)
        # One worker loads the announced checkpoints in the order they were announced (a latched topic replays
        # several at once to a late joiner), so the last announced is the one that runs.
        self._updates: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        threading.Thread(target=self._load_updates, daemon=True).start()

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
        self._endpoints = [
            self.create_subscription(JointState, JOINT_STATES, self._on_arm_state, SENSOR_QOS),
            self.create_subscription(JointState, GRIPPER_STATES, self._on_gripper_state, SENSOR_QOS),
            self.create_subscription(Float32MultiArray, CONTEXT, self._on_context, SENSOR_QOS),
            self.create_subscription(String, POLICY_UPDATE, self._on_policy_update, LATCHED_QOS),
            self.create_service(SetBool, "mql/hold", self._on_hold)]
        self.diag.values["checkpoint_sha256"] = self.policy.sha256
        self.diag.ok("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Undo on_configure, so configuring again makes one set of endpoints, not a second one beside it."""
        for endpoint in self._endpoints:
            (self.destroy_service if hasattr(endpoint, "srv_type") else self.destroy_subscription)(endpoint)
        self._endpoints = []
        for pub in (self._arm_pub, self._grip_pub):
            self.destroy_lifecycle_publisher(pub)
        with self._lock:
            self.guard.reset()
            self.guard.expire_inputs("it arrived before the node was cleaned up")
        self.diag.warn("unconfigured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        with self._lock:
            self.guard.reset()  # the first command after (re)activation starts from the measured positions
        self._timer = self.create_timer(1.0 / self.control_rate, self._on_timer)
        scheduling = set_realtime_priority(self.realtime_priority)
        (self.get_logger().warn if "refused" in scheduling else self.get_logger().info)(scheduling)
        self.diag.values["scheduling"] = scheduling
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        self.diag.warn("inactive")
        return super().on_deactivate(state)

    # ------------------------------------------------------------------ inputs
    def _on_joint_state(self, which: str, msg: JointState) -> None:
        stamp = stamp_ns(msg)  # 0: the driver does not stamp its states; then arrival time is all there is
        age = (self.get_clock().now().nanoseconds - stamp) * 1e-9 if stamp else None
        try:
            with self._lock:
                self.guard.set_joint_state(which, msg.name, msg.position, msg.velocity, self._now(), age)
        except InputError as exc:
            self.diag.reject("joint_state" if which == "arm" else "gripper_state", str(exc))

    def _on_arm_state(self, msg: JointState) -> None:
        self._on_joint_state("arm", msg)
        if self.trigger_mode == "state" and self._timer is not None:
            self._tick(triggered=True)

    def _on_timer(self) -> None:
        """No parameter: rclpy passes a TimerInfo to a timer callback that accepts one."""
        self._tick(triggered=False)

    def _on_gripper_state(self, msg: JointState) -> None:
        self._on_joint_state("gripper", msg)

    def _on_context(self, msg: Float32MultiArray) -> None:
        try:
            with self._lock:
                self.guard.set_context(msg.data, self.policy.context_dim, self._now())
        except InputError as exc:
            self.diag.reject("context", str(exc))

    def _on_clock_jump(self, jump: TimeJump) -> None:
        """The stamps of every input held now count on the clock's old timeline: none is fresh until replaced."""
        if jump.clock_change == ClockChange.ROS_TIME_ACTIVATED:
            what = "the clock switched to simulated time"
        elif jump.clock_change == ClockChange.ROS_TIME_DEACTIVATED:
            what = "the clock switched to system time"
        else:
            what = f"the clock moved back {-jump.delta.nanoseconds * 1e-9:.3f} s"
        with self._lock:
            self.guard.expire_inputs(f"it arrived before {what}; holding until a new one arrives")
        self.get_logger().warn(f"{what}: holding until new states and context arrive")

    def _on_hold(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            self.guard.hold_requested = bool(request.data)
        response.success = True
        response.message = "holding position" if request.data else "policy resumed"
        self.get_logger().info(response.message)
        return response

    def _on_policy_update(self, msg: String) -> None:
        """Load the announced checkpoint in a worker thread: the single-threaded control loop never waits."""
        try:
            path, sha = parse_update(msg.data)
        except InputError as exc:
            self.diag.reject("policy_update", str(exc))
            return
        self._updates.put((path, sha))

    def _load_updates(self) -> None:
        while True:
            self._load_update(*self._updates.get())

    def _load_update(self, path: str, sha: str) -> None:
        """Swap in a validated checkpoint; on any problem keep the running one and say why."""
        if sha == self.policy.sha256:
            return
        try:
            candidate = accept_update(path, sha, self.policy, self.robot)
        except (CheckpointError, InputError, ValueError) as exc:
            self.diag.reject("policy_update", f"kept checkpoint {self.policy.sha256[:12]}: {exc}")
            self.get_logger().error(f"policy update refused: {exc}")
            return
        with self._lock:
            self.policy = candidate  # one assignment: a tick runs the old policy or the new one
        self.diag.values["checkpoint_sha256"] = candidate.sha256
        self.diag.values["checkpoint_path"] = path
        self.get_logger().info(f"loaded checkpoint {path} ({sha[:12]})")

    # ------------------------------------------------------------------ the control tick
    def _now(self) -> float:
        """The clock the freshness rules count in, s: under use_sim_time the node's (simulated) clock, the one the
        header stamps and the control timer count in, so the timeouts are sim seconds whatever the real-time
        factor; otherwise the monotonic clock, which a wall-clock jump cannot move."""
        clock = self.get_clock()
        return clock.now().nanoseconds * 1e-9 if clock.ros_time_is_active else time.monotonic()

    def _tick(self, triggered: bool) -> None:
        now = self._now()
        with self._lock:
            policy = self.policy
            if self.trigger_mode != "timer" and not triggered and not self.guard.hold_reason(now, policy):
                return  # acting is driven by state arrival; the timer only covers holds
            command = self.guard.command(now, policy)
            arm_q, grip_q = (self.guard.arm.value[0], self.guard.gripper.value[0]) if command else (None, None)
        if command is None:
            self.diag.warn(f"no command published: {self.guard.hold_reason(now, policy)}")
            return
        arm_cmd, grip_cmd = command.arm, command.gripper
        if command.hold:
            self._held += 1
            self.diag.warn(f"holding: {command.hold}")
        else:
            self.diag.ok("running")
        if self.command_mode == "velocity":
            hold = bool(command.hold)
            n = self.robot.n_arm
            arm_cmd = to_velocity(arm_cmd, arm_q, self.control_rate, self.velocity_bound[:n], hold)
            grip_cmd = to_velocity(grip_cmd, grip_q[:1], self.control_rate, self.velocity_bound[n:], hold)
        self._arm_pub.publish(Float64MultiArray(data=arm_cmd.tolist()))
        self._grip_pub.publish(Float64MultiArray(data=grip_cmd.tolist()))
        self._ticks += 1
        self.diag.values.update({"ticks": self._ticks, "held_ticks": self._held, "holding": command.hold})


def main(args: list[str] | None = None) -> int:
    """`ros2 run mql_ros policy`; exit 2 on bad parameters or an unusable checkpoint."""
    return main_for(autostarted(PolicyNode, "policy"), args)
