"""`context_encoder`: turns the message stream into transitions (the shared step rule) and the GRU context.

Each completed step (s_t, a_t, r_t) is pushed into the checkpoint's StreamingContext, so the policy node reads
the same context the learner computes from the same transitions. The context is published when the reward
that followed command t arrives (a preview of step t's entry; a later reward before command t+1 is previewed
and published again; command t+1 pushes the entry the step rule gives, without publishing), not when command
t+1 completes the step: the policy computes command t+1 from a context that holds step t, as in training and in
`mql-ros eval`. One step late, the shipped policy returned -3.93 instead of -2.24 on held-out targets.
The context restarts from zero at every episode start and on /mql/reset_context. (Published at the start event
itself: the sim sends the episode's first state right after it, and that state reaches the policy directly,
before the zero context has come through this node; a node that waited for the state instead missed it when
it came first, and its policy acted on the last episode's context.) It follows
/mql/policy_update like the policy node does (same validation), because a new actor needs its own encoder;
the current episode's steps are replayed through the new encoder so the context stays consistent.
"""

from __future__ import annotations

import threading

import numpy as np
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float32MultiArray, Float64, Float64MultiArray, String
from std_srvs.srv import Trigger

from mql_ros.core.errors import CheckpointError, InputError, MQLError
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.core.safety import accept_update, parse_update
from mql_ros.core.transitions import TransitionBuilder, parse_episode_event
from mql_ros.nodes.common import (
    ARM_COMMANDS,
    CONTEXT,
    EPISODE,
    GRIPPER_COMMANDS,
    GRIPPER_STATES,
    JOINT_STATES,
    LATCHED_QOS,
    POLICY_UPDATE,
    RELIABLE_QOS,
    REWARD,
    SENSOR_QOS,
    CommandPair,
    Diagnostics,
    checkpoint_path,
    declare,
    declare_robot,
    main_for,
)


class ContextEncoderNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("context_encoder", **kwargs)
        checkpoint = declare(self, "checkpoint", "", "checkpoint whose GRU encodes the context; empty: the "
                             "shipped share/mql_ros/checkpoints/arm_reach.pt")
        self.robot = declare_robot(self)
        self.policy = DeployedPolicy.from_checkpoint(checkpoint_path(checkpoint), self.robot)
        self._lock = threading.Lock()
        self.encoder = self.policy.new_context()
        self.builder = TransitionBuilder(self.robot)
        self._last_stamp = 0
        self._steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # this episode's (s_t, a_t, r_t)
        self._commands = CommandPair()
        self._published = 0
        self.diag = Diagnostics(self)
        self.diag.values["checkpoint_sha256"] = self.policy.sha256

        self._pub = self.create_publisher(Float32MultiArray, CONTEXT, RELIABLE_QOS)
        self.create_subscription(JointState, JOINT_STATES, self._on_arm_state, SENSOR_QOS)
        self.create_subscription(JointState, GRIPPER_STATES, self._on_gripper_state, SENSOR_QOS)
        self.create_subscription(Float64, REWARD, self._on_reward, RELIABLE_QOS)
        self.create_subscription(String, EPISODE, self._on_episode, LATCHED_QOS)
        self.create_subscription(Float64MultiArray, ARM_COMMANDS, self._on_arm_command, RELIABLE_QOS)
        self.create_subscription(Float64MultiArray, GRIPPER_COMMANDS, self._on_gripper_command, RELIABLE_QOS)
        self.create_subscription(String, POLICY_UPDATE, self._on_policy_update, LATCHED_QOS)
        self.create_service(Trigger, "mql/reset_context", self._on_reset)
        self.diag.ok("waiting for an episode start")

    # ------------------------------------------------------------------ feeding the step rule
    def _guard(self, what: str, feed) -> object:
        """Feed one message to the builder; a malformed one is rejected and reported, never fatal."""
        try:
            with self._lock:
                return feed(self._stamp())
        except (MQLError, ValueError) as exc:  # malformed input: reported, never fatal
            self.diag.reject(what, str(exc))
            return None

    def _stamp(self) -> int:
        """The node clock now. If it went back (simulated time reset), the history belongs to another
        timeline: the step rule and the context restart rather than refusing every message until the clock
        catches up. Called with the lock held."""
        now = self.get_clock().now().nanoseconds
        if now < self._last_stamp:
            self.diag.reject("time", f"clock went back from {self._last_stamp} to {now} ns: history cleared")
            self.builder = TransitionBuilder(self.robot)
            self.encoder.reset()
            self._steps.clear()
        self._last_stamp = now
        return now

    def _on_arm_state(self, msg: JointState) -> None:
        self._guard("joint_state", lambda t: self.builder.on_joint_state(
            t, list(msg.name), list(msg.position), list(msg.velocity)))

    def _on_gripper_state(self, msg: JointState) -> None:
        self._guard("gripper_state", lambda t: self.builder.on_gripper_state(
            t, list(msg.name), list(msg.position), list(msg.velocity)))

    def _on_reward(self, msg: Float64) -> None:
        self._guard("reward", lambda t: self.builder.on_reward(t, float(msg.data)))
        try:
            with self._lock:
                entry = self.builder.pending_entry()
                z = self.encoder.preview(*entry) if entry is not None else None
        except (MQLError, ValueError) as exc:
            self.diag.reject("context", str(exc))
            return
        if z is not None:
            self._publish(z)

    def _on_episode(self, msg: String) -> None:
        try:
            event = parse_episode_event(msg.data)
        except InputError as exc:
            self.diag.reject("episode", str(exc))
            return
        self._guard("episode", lambda t: self.builder.on_episode(t, msg.data))
        if event["event"] == "start":
            self.reset(f"episode start ({event.get('task_id', '?')})")

    def _on_arm_command(self, msg: Float64MultiArray) -> None:
        self._on_command("arm", msg)

    def _on_gripper_command(self, msg: Float64MultiArray) -> None:
        self._on_command("gripper", msg)

    def _on_command(self, which: str, msg: Float64MultiArray) -> None:
        with self._lock:
            step = self._commands.add(which, self._stamp(), msg.data)
        if step is None:
            return
        # Stamped again inside the guarded section: another callback may have fed a newer message between
        # the two locked sections, and the step rule refuses time going backwards.
        transition = self._guard("command", lambda t: self.builder.on_command(t, step[1], step[2]))
        if transition is not None:
            self._push(np.asarray(transition.obs), np.asarray(transition.action), float(transition.reward))

    # ------------------------------------------------------------------ the context
    def _push(self, obs: np.ndarray, action: np.ndarray, reward: float) -> None:
        """Add a completed step. Its context went out already, on its reward (the same entry); publishing it
        again on a command would, with a policy acting on each context, answer every command with a context
        and every context with a command."""
        try:
            with self._lock:
                self.encoder.push(obs, action, reward)
                self._steps.append((obs, action, reward))
        except (MQLError, ValueError) as exc:  # e.g. a step the context cannot hold: reported, never fatal
            self.diag.reject("context", str(exc))

    def _publish(self, z: np.ndarray) -> None:
        self._pub.publish(Float32MultiArray(data=np.asarray(z, dtype=np.float32).tolist()))
        self._published += 1
        self.diag.values.update({"published": self._published, "episode_steps": len(self._steps)})

    def reset(self, why: str) -> None:
        """Zero context and empty history; published at once so the policy has a context for step 0."""
        with self._lock:
            self.encoder.reset()
            self._steps.clear()
            z = np.zeros(self.policy.context_dim, dtype=np.float32)
        self._publish(z)
        self.diag.ok(f"reset: {why}")

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.reset("mql/reset_context")
        response.success, response.message = True, "context cleared"
        return response

    def _on_policy_update(self, msg: String) -> None:
        """Follow the policy node: the same validation, so both switch to an update or neither does."""
        try:
            path, sha = parse_update(msg.data)
            if sha == self.policy.sha256:
                return
            candidate = accept_update(path, sha, self.policy, self.robot)
        except (CheckpointError, InputError, ValueError) as exc:
            self.diag.reject("policy_update", f"kept checkpoint {self.policy.sha256[:12]}: {exc}")
            return
        with self._lock:
            context = candidate.new_context()
            z = np.zeros(candidate.context_dim, dtype=np.float32)
            for obs, action, reward in self._steps:
                z = context.push(obs, action, reward)
            entry = self.builder.pending_entry()  # the open step's reward came: its context is the current one
            if entry is not None:
                z = context.preview(*entry)
            self.policy, self.encoder = candidate, context
        self.diag.values["checkpoint_sha256"] = candidate.sha256
        self._publish(z)
        self.get_logger().info(f"encoder switched to checkpoint {path} ({sha[:12]})")


def main(args: list[str] | None = None) -> int:
    """`ros2 run mql_ros context_encoder`; exit 2 on bad parameters or an unusable checkpoint."""
    # One thread: the step rule needs the messages in the order they were received, and two executor
    # threads racing between the stamp and the lock reordered them (steps were dropped on an idle machine).
    # Not the EventsExecutor: behind a burst it runs each topic's queued messages together (arm, arm,
    # gripper, gripper), which breaks CommandPair; the wait-set executor takes one per topic per round.
    return main_for(ContextEncoderNode, args, SingleThreadedExecutor)
