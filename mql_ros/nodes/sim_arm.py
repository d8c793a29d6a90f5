"""`sim_arm`: the MuJoCo arm (mql_ros.sim.arm.ArmEnv) as simulated hardware on the contract topics.

It behaves like a robot driver: a lifecycle node (configure builds the simulator and its topics and
services, activate starts the clock, deactivate stops it, cleanup destroys what configure built), it holds
the last targets when no command arrives and rejects malformed commands with a reason on /diagnostics
instead of crashing. Each tick of `sim_rate` advances the physics by 1/sim_rate with the current targets,
then publishes the new joint states and the reward of that step (both before the next command, so the step
rule pairs each command with them; the state first, so that the context the encoder sends on the reward
finds the state it goes with already at the policy). A step whose physics diverged, or whose reward or
state is not finite (as float32), is never published: the episode ends there (its end event says why,
as does the log and /diagnostics) and a new one starts from the home pose.

The task is chosen by family/task_split/task_index (or task_json), and its values are parameters too
(task.target, task.payload_mass, task.damping_scale, task.friction_scale): they show the task the next
episode runs, and setting one makes that a "custom" task. Every change takes effect at the next episode.
"""

from __future__ import annotations

import json
import threading

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64, Float64MultiArray, String
from std_srvs.srv import Trigger

from mql_ros.core.errors import ConfigError, InputError
from mql_ros.core.robot import float32_finite
from mql_ros.core.tasks import resolve_family, split_tasks, task_id
from mql_ros.nodes.common import (
    ARM_COMMANDS,
    EPISODE,
    GRIPPER_COMMANDS,
    GRIPPER_STATES,
    JOINT_STATES,
    LATCHED_QOS,
    RELIABLE_QOS,
    REWARD,
    Diagnostics,
    autostarted,
    declare,
    main_for,
)
from mql_ros.sim.arm import TASK_DEFAULTS, TASK_RANGES, TASK_UNITS, check_task

# Which task: a split's task, or task_json. The task's own values, one parameter each (INTERFACES.md: "task
# parameters are ROS parameters, changeable at run time"): they show the task the next episode runs, and
# setting one makes that task a "custom" one with the new value.
TASK_PARAMETERS = ("family", "task_split", "task_index", "task_json")
TASK_VALUE_PARAMETERS = {"task.target": "target", **{f"task.{key}": key for key in TASK_DEFAULTS}}


class SimArmNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("sim_arm", **kwargs)
        self.autostart = declare(self, "autostart", True,
                                 "configure and activate at start-up (plain ros2 run)")
        self.sim_rate = declare(self, "sim_rate", 25.0, "Hz: physics ticks and state publications per second",
                                1.0, 1000.0)
        self.episode_steps = declare(self, "episode_steps", 50, "sim ticks per episode", 1, 100000)
        self.seed = declare(self, "seed", 0, "seed of the initial-pose noise", 0, 2**31 - 1)
        # the task parameters (TASK_PARAMETERS) change at run time, in effect at the next episode
        declare(self, "family", "arm_reach", "task family: built-in name or package.module:attribute",
                read_only=False)
        declare(self, "task_split", "test", "split the task is taken from", choices=("train", "test", "ood"),
                read_only=False)
        declare(self, "task_index", 0, "index of the task in its split", 0, 100000, read_only=False)
        declare(self, "task_json", "", "JSON task dict overriding family/split/index (task_id 'custom'); "
                "empty: use the split", read_only=False)
        self._task_id, self._task = self._task_from_params({})
        for name, key in TASK_VALUE_PARAMETERS.items():
            unit = TASK_UNITS.get(key, "[x, y, z] m, world frame")
            declare(self, name, self._task[key], f"{key} of the next episodes' task, {unit} (set: a custom task)",
                    *TASK_RANGES.get(key, ()), read_only=False)
        try:  # given at start-up (-p task.payload_mass:=2.0): that value over the selected task
            self._task_id, self._task = self._with_values(self._task_id, self._task, {
                name: self.get_parameter(name).value for name in TASK_VALUE_PARAMETERS})
        except InputError as exc:
            raise ConfigError(f"sim_arm: {exc}") from exc
        self._mirror_task = False  # set when a change of task selection must show in the task.* parameters
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()  # a tick runs whole, never alongside a lifecycle transition
        self.env = None
        self._configured: dict[str, list] = {}  # publishers, subscriptions, services on_configure created
        self._diverged_episodes = 0
        self._arm_cmd: np.ndarray | None = None
        self._grip_cmd: np.ndarray | None = None
        self._reset_requested = False
        self._step = 0
        self._episode = 0
        self._timer = None
        self.diag = Diagnostics(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._show_task_values)

    # ------------------------------------------------------------------ tasks
    def _task_from_params(self, changes: dict) -> tuple[str, dict]:
        """The (task_id, task) the parameters (with `changes` applied) select; InputError if invalid.

        Every parameter is checked whatever task_json holds, so the parameters always describe a valid
        configuration: the family must resolve, the split and index must select one of its tasks, and that
        task must be a task of the simulated arm (check_task), even while task_json overrides it; task_json,
        when set, must be such a task too.
        """
        p = {n: changes.get(n, self.get_parameter(n).value) for n in TASK_PARAMETERS}
        family = resolve_family(p["family"])
        tasks = split_tasks(family, p["task_split"])
        if not 0 <= p["task_index"] < len(tasks):
            raise InputError(f"task_index {p['task_index']} is outside the {p['task_split']} split "
                             f"(0..{len(tasks) - 1})")
        split_id, split_task = task_id(family, p["task_split"], p["task_index"]), tasks[p["task_index"]]
        try:
            check_task(split_task)
        except InputError as exc:
            raise InputError(f"family {p['family']!r}: task {split_id} is not a task of the simulated arm: "
                             f"{exc}") from exc
        if not p["task_json"]:
            return split_id, check_task(split_task)
        try:
            task = json.loads(p["task_json"])
        except json.JSONDecodeError as exc:
            raise InputError(f"task_json is not valid JSON: {exc}") from exc
        if not isinstance(task, dict):
            raise InputError(f"task_json must be a JSON object, got {p['task_json']!r}")
        try:
            return "custom", check_task(task)
        except InputError as exc:
            raise InputError(f"task_json: {exc}") from exc

    @staticmethod
    def _with_values(tid: str, task: dict, values: dict) -> tuple[str, dict]:
        """(task_id, task) with the task.* parameter `values` over `task` (checked); still `tid` if no value
        changes it, else "custom"."""
        new = check_task({**task, **{TASK_VALUE_PARAMETERS[name]: list(v) if name == "task.target" else v
                                     for name, v in values.items()}})
        return (tid, task) if new == task else ("custom", new)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Task parameters change at run time: validated now, in effect at the next episode."""
        changes = {p.name: p.value for p in params if p.name in TASK_PARAMETERS}
        values = {p.name: p.value for p in params if p.name in TASK_VALUE_PARAMETERS}
        if not changes and not values:  # the others are read-only: rclpy refuses them before this is called
            return SetParametersResult(successful=True)
        try:
            with self._lock:
                new_id, new_task = self._task_from_params(changes) if changes else (self._task_id, self._task)
            new_id, new_task = self._with_values(new_id, new_task, values)
            env = self.env  # None while unconfigured: configure builds the env with this task
            if env is not None:
                env.set_task(new_task)  # validates; applied at the next reset
        except (InputError, ConfigError, ValueError, KeyError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._lock:
            changed = (new_id, new_task) != (self._task_id, self._task)
            self._task_id, self._task = new_id, new_task
        self._mirror_task = bool(changes)
        if changed:
            self.get_logger().info(f"task {new_id} takes effect at the next episode")
        return SetParametersResult(successful=True)

    def _show_task_values(self, params: list[Parameter]) -> None:
        """After a new task selection, the task.* parameters take its values (a set of them that changes
        nothing, so the task keeps its id)."""
        if not self._mirror_task:
            return
        self._mirror_task = False
        with self._lock:
            task = self._task
        self.set_parameters([Parameter(name, value=task[key]) for name, key in TASK_VALUE_PARAMETERS.items()])

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            family = resolve_family(self.get_parameter("family").value)
            self.env = family.make_env(self._task)
            if not hasattr(self.env, "apply_commands"):
                raise InputError(f"family {family.name!r} does not make an ArmEnv (no apply_commands)")
        except (InputError, ConfigError, ValueError) as exc:
            self.get_logger().error(f"cannot build the simulator: {exc}")
            self.diag.error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.robot = self.env.robot
        self._joint_pub = self.create_lifecycle_publisher(JointState, JOINT_STATES, 10)
        self._grip_pub = self.create_lifecycle_publisher(JointState, GRIPPER_STATES, 10)
        self._reward_pub = self.create_lifecycle_publisher(Float64, REWARD, RELIABLE_QOS)
        self._episode_pub = self.create_lifecycle_publisher(String, EPISODE, LATCHED_QOS)
        self._configured = {
            "publishers": [self._joint_pub, self._grip_pub, self._reward_pub, self._episode_pub],
            "subscriptions": [
                self.create_subscription(Float64MultiArray, ARM_COMMANDS, self._on_arm_command, RELIABLE_QOS),
                self.create_subscription(Float64MultiArray, GRIPPER_COMMANDS, self._on_gripper_command,
                                         RELIABLE_QOS)],
            "services": [self.create_service(Trigger, "sim/reset", self._on_reset)],
        }
        self.diag.ok("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        with self._tick_lock:
            self._start_episode()
            self._timer = self.create_timer(1.0 / self.sim_rate, self._tick)
        self.diag.ok("running")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_clock()
        self.diag.warn("inactive")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy what on_configure built, so configure -> cleanup -> configure is the same node."""
        self._destroy_configured()
        self.diag.warn("unconfigured")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_configured()
        self.diag.warn("shut down")
        return super().on_shutdown(state)

    def _stop_clock(self) -> None:
        with self._tick_lock:  # after this no tick is running, and one already queued returns at once
            if self._timer is not None:
                self.destroy_timer(self._timer)
                self._timer = None

    def _destroy_configured(self) -> None:
        self._stop_clock()
        with self._tick_lock:
            for pub in self._configured.get("publishers", []):
                self.destroy_lifecycle_publisher(pub)
            for sub in self._configured.get("subscriptions", []):
                self.destroy_subscription(sub)
            for srv in self._configured.get("services", []):
                self.destroy_service(srv)
            self._configured = {}
            with self._lock:
                self.env = None
                self._arm_cmd = self._grip_cmd = None
                self._reset_requested = False

    # ------------------------------------------------------------------ commands
    def _on_arm_command(self, msg: Float64MultiArray) -> None:
        values = np.asarray(msg.data, dtype=np.float64)
        if self.env is None:  # unconfigured (a message delivered while cleanup destroys the subscription)
            return
        if values.shape[0] != self.robot.n_arm:
            self.diag.reject("arm_command", f"expected {self.robot.n_arm} values, got {values.shape[0]}")
        elif not np.all(np.isfinite(values)):
            self.diag.reject("arm_command", f"contains NaN or inf: {values.tolist()}")
        else:
            with self._lock:
                self._arm_cmd = values

    def _on_gripper_command(self, msg: Float64MultiArray) -> None:
        values = np.asarray(msg.data, dtype=np.float64)
        if values.shape[0] != 1:
            self.diag.reject("gripper_command", f"expected 1 value, got {values.shape[0]}")
        elif not np.all(np.isfinite(values)):
            self.diag.reject("gripper_command", f"contains NaN or inf: {values.tolist()}")
        else:
            with self._lock:
                self._grip_cmd = values

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self._reset_requested = True
        response.success, response.message = True, "a new episode starts at the next tick"
        return response

    # ------------------------------------------------------------------ the clock
    def _start_episode(self) -> None:
        """Reset the arm (pending task applied) and announce the episode before its first state."""
        self.env.reset(seed=self.seed + self._episode)
        arm_q, _, grip_q, _ = self.env.joint_state()
        with self._lock:  # hold the reset pose until the first command of the new episode
            self._arm_cmd, self._grip_cmd = arm_q.copy(), grip_q[:1].copy()
            self._reset_requested = False
            current_id = self._task_id
        self.env.apply_commands(self._arm_cmd, self._grip_cmd)
        self._step = 0
        self._publish_event("start", current_id)
        self._publish_state()

    def _publish_event(self, event: str, tid: str, diverged: str = "") -> None:
        self._episode_id = tid if event == "start" else self._episode_id
        payload = {"event": event, "task_id": self._episode_id, "task": self.env.task,
                   "episode": self._episode}
        if diverged:  # an end event of an episode cut short by the physics
            payload["diverged"] = diverged
        self._episode_pub.publish(String(data=json.dumps(payload)))

    def _publish_state(self) -> None:
        arm_q, arm_dq, grip_q, grip_dq = self.env.joint_state()
        stamp = self.get_clock().now().to_msg()
        for pub, names, q, dq in ((self._joint_pub, self.robot.arm_joints, arm_q, arm_dq),
                                  (self._grip_pub, self.robot.gripper_joints, grip_q, grip_dq)):
            msg = JointState(name=list(names), position=q.tolist(), velocity=dq.tolist())
            msg.header.stamp = stamp
            pub.publish(msg)

    def _tick(self) -> None:
        with self._tick_lock:
            if self._timer is None:  # deactivated while this tick waited for the lock
                return
            with self._lock:
                arm, grip, reset = self._arm_cmd, self._grip_cmd, self._reset_requested
            self.env.apply_commands(arm, grip)
            diverged = self.env.advance(1.0 / self.sim_rate)
            self._step += 1
            reward = float(self.env.current_reward())
            problem = self._unpublishable(diverged, reward)
            if problem:
                self._end_diverged_episode(problem)
                return
            self._publish_state()
            self._reward_pub.publish(Float64(data=reward))
            self.diag.values.update({"episode": self._episode, "step": self._step, "task_id": self._episode_id})
            if reset or self._step >= self.episode_steps:
                self._publish_event("end", self._episode_id)
                self._episode += 1
                self._start_episode()

    def _unpublishable(self, diverged: bool, reward: float) -> str:
        """Why this step's reward and state must not be published ("" if they may be)."""
        if diverged:  # ArmEnv already reset the arm: what it reads now is not the result of this step
            return f"the physics diverged ({getattr(self.env, 'divergence', '') or 'unstable simulation'})"
        if not float32_finite(reward):
            return f"the reward is not finite (as float32): {reward}"
        if not all(float32_finite(values) for values in self.env.joint_state()):
            return "the joint state is not finite (as float32)"
        return ""

    def _end_diverged_episode(self, problem: str) -> None:
        """End the episode at a step that cannot be published, and start a new one from the home pose."""
        self._diverged_episodes += 1
        message = (f"episode {self._episode} ended at step {self._step}: {problem}; its reward and state were "
                   f"not published, a new episode starts from the home pose")
        self.get_logger().error(message, throttle_duration_sec=1.0)
        self.diag.values.update({"diverged_episodes": self._diverged_episodes, "last_divergence": message})
        self.diag.warn(message)
        self.diag.publish()
        self._publish_event("end", self._episode_id, diverged=problem)
        self._episode += 1
        self._start_episode()


def main(args: list[str] | None = None) -> int:
    """`ros2 run mql_ros sim_arm`; exit 2 on bad parameters.

    On main_for's default, the C++ EventsExecutor (its limits do not touch the sim: no MessageInfo needed, and
    the two command topics are independent). rclpy's MultiThreadedExecutor, used before, spent most of the sim's
    CPU polling its futures (56% at sim_rate 50 with the control loop attached, py-spy) and missed most ticks on
    2 cores (16-39 of 50 states/s); the wait-set SingleThreadedExecutor took 12%, this one 7%, both with all 50.
    Ticks, commands and lifecycle transitions run one at a time, which the tick lock already required."""
    return main_for(autostarted(SimArmNode, "sim_arm"), args)
