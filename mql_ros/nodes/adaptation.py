"""`adaptation`: records the contract topics, collects new-task episodes, and runs MQL adaptation on demand.

The step rule (mql_ros.core.transitions) turns the live stream into Episodes; the episodes of the task the
robot is on now are the new-task data. /mql/adapt (or `min_new_transitions` reached) runs
mql_ros.core.adaptation.adapt from the meta-trained weights in a worker thread, so recording and services
stay responsive; a second request while it runs is refused. The result is published on /mql/policy_update
only if validate_update accepts it on held-back new-task episodes; /mql/rollback republishes the
meta-trained checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.subscription import MessageInfo
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64, Float64MultiArray, String
from std_srvs.srv import Trigger

from mql_ros.core.adaptation import adapt, validate_update
from mql_ros.core.checkpoint import agent_from_checkpoint, load_checkpoint, save_checkpoint
from mql_ros.core.config import adapt_config_over
from mql_ros.core.episode import Episode, newest_within
from mql_ros.core.errors import AdaptationCancelled, ArchiveError, ConfigError, InputError, MQLError
from mql_ros.core.paths import unused_path
from mql_ros.core.replay import MultiTaskReplay
from mql_ros.core.transitions import TransitionBuilder, parse_episode_event
from mql_ros.nodes.common import (
    ARM_COMMANDS,
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


class AdaptationNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("adaptation", **kwargs)
        self.meta_path = checkpoint_path(declare(
            self, "checkpoint", "", "meta-trained checkpoint adaptation starts from; empty: the shipped "
            "share/mql_ros/checkpoints/arm_reach.pt"))
        self.archive_dir = declare(self, "archive_dir", "", "directory the contract topics are recorded to "
                                   "(rosbag2 MCAP); empty: no recording")
        self.archive_dir = str(Path(self.archive_dir).expanduser()) if self.archive_dir else ""
        self.replay_dir = declare(self, "replay_dir", "", "archive of meta-training data that adaptation "
                                  "reweights; empty: adapt on new-task data only")
        self.replay_dir = str(Path(self.replay_dir).expanduser()) if self.replay_dir else ""
        self.output_dir = Path(declare(self, "output_dir", "/tmp/mql_ros/adapted",
                                       "where adapted checkpoints are written")).expanduser()
        episodes_dir = declare(self, "episodes_dir", "", "directory each completed new-task episode is saved to "
                               "(<task>_<n>.npz, exactly what adaptation trains on); empty: not saved")
        self.episodes_dir = Path(episodes_dir).expanduser() if episodes_dir else None
        self.min_new = declare(self, "min_new_transitions", 0, "adapt automatically at every episode end while "
                               "at least this many new-task transitions are held and no adaptation runs "
                               "(0: only on /mql/adapt)", 0, 10_000_000)
        self.max_new = declare(self, "max_new_transitions", 100_000, "most new-task transitions kept in memory "
                               "(oldest episodes dropped first; the archive keeps everything)", 1, 100_000_000)
        if self.min_new > self.max_new:
            raise ConfigError(f"min_new_transitions ({self.min_new}) is more than max_new_transitions "
                              f"({self.max_new}): automatic adaptation could never start")
        self.held_out = declare(self, "held_out_episodes", 1, "newest new-task episodes kept out of "
                                "adaptation to validate the result", 0, 1000)
        self.margin = declare(self, "margin", 0.1, "refuse an update whose held-out Bellman score is worse "
                              "than the current policy's by more than this fraction of it", 0.0, 100.0)
        self.seed = declare(self, "seed", 0, "seed of adaptation's sampling", 0, 2**31 - 1)
        config_file = declare(self, "config_file", "", "MQL YAML (not a ROS parameter file) whose adapt: "
                              "keys override the checkpoint's adaptation settings, key by key; empty: the "
                              "checkpoint's settings")
        self.robot = declare_robot(self)
        self.meta = load_checkpoint(self.meta_path, expect_robot=self.robot)
        self.adapt_cfg = (adapt_config_over(self.meta.config.adapt, config_file) if config_file
                          else self.meta.config.adapt)
        self.current_path, self.current_sha = self.meta_path, self.meta.sha256

        self._lock = threading.Lock()
        self.builder = TransitionBuilder(self.robot)
        self.task_id = ""
        self.new_episodes: list[Episode] = []
        self._collected = 0  # episodes collected since start (names the saved copies)
        self._commands = CommandPair()
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()  # set by /mql/rollback: the running adaptation is abandoned
        self._publish_lock = threading.Lock()  # a rollback and a finished adaptation publish one at a time
        self._stopping = threading.Event()  # set by close(): the worker's adaptation stops at its next update
        self._replay: MultiTaskReplay | None = None
        self._runs = 0
        self._started_ns = time.time_ns()  # DDS source timestamps are on the system clock
        self._last_stamp = -1
        self.recorder = None
        if self.archive_dir:  # imported only when used: a node without recording needs no bag libraries
            from mql_ros.archive import ArchiveRecorder

            self.recorder = ArchiveRecorder(self.archive_dir, self.robot)
        self.diag = Diagnostics(self)
        self.diag.values.update({"state": "idle", "new_transitions": 0, "current_sha256": self.current_sha})

        self._update_pub = self.create_publisher(String, POLICY_UPDATE, LATCHED_QOS)
        self.create_subscription(JointState, JOINT_STATES, self._on_arm_state, SENSOR_QOS)
        self.create_subscription(JointState, GRIPPER_STATES, self._on_gripper_state, SENSOR_QOS)
        self.create_subscription(Float64, REWARD, self._on_reward, RELIABLE_QOS)
        self.create_subscription(String, EPISODE, self._on_episode, LATCHED_QOS)
        self.create_subscription(Float64MultiArray, ARM_COMMANDS, self._on_arm_command, RELIABLE_QOS)
        self.create_subscription(Float64MultiArray, GRIPPER_COMMANDS, self._on_gripper_command, RELIABLE_QOS)
        self.create_service(Trigger, "mql/adapt", self._on_adapt)
        self.create_service(Trigger, "mql/rollback", self._on_rollback)
        self.diag.ok("collecting")

    # ------------------------------------------------------------------ recording + step rule
    def _feed(self, what: str, record, feed) -> object:
        """Record the message and feed the step rule; a bad message is reported and dropped, never fatal.

        The recording and the step rule see the same receive stamp (`_stamp`); callbacks run one at a time (one
        executor thread); the lock guards what they share with the adaptation worker."""
        if self.recorder is not None:
            try:
                record()
            except ArchiveError as exc:  # e.g. disk full: stop recording, keep the node running
                self._stop_recording(exc)
            except InputError as exc:
                self.diag.reject(f"record_{what}", str(exc))
        try:
            with self._lock:
                return feed()
        except (MQLError, ValueError) as exc:
            self.diag.reject(what, str(exc))
            return None

    def _stop_recording(self, exc: ArchiveError) -> None:
        self.diag.error(f"recording stopped: {exc}")
        self.get_logger().error(f"recording stopped: {exc}")
        self.recorder = None

    def _stamp(self) -> int:
        """The node clock now, taken once per message (recording and step rule share it). If it went back
        (simulated time reset), the episode in progress belongs to another timeline: it is dropped, its bag
        finished, and the step rule restarts, rather than refusing every message until the clock catches up.
        Called from subscription callbacks only."""
        now = self.get_clock().now().nanoseconds
        if now < self._last_stamp:
            self.diag.reject("time", f"clock went back from {self._last_stamp} to {now} ns: episode in "
                             "progress dropped, recording goes on in a new bag")
            with self._lock:
                self.builder = TransitionBuilder(self.robot, task_id=self.builder.rule.task_id)  # same task
                self._commands = CommandPair()
            self.diag.values["episode_steps"] = 0
            if self.recorder is not None:
                try:
                    self.recorder.close()
                except ArchiveError as exc:
                    self._stop_recording(exc)
        self._last_stamp = now
        return now

    def _on_state(self, topic: str, msg: JointState, feed_name: str) -> None:
        t, names, pos, vel = self._stamp(), list(msg.name), list(msg.position), list(msg.velocity)
        self._feed(feed_name, lambda: self.recorder.record_joint_state(topic, t, names, pos, vel),
                   lambda: getattr(self.builder, f"on_{feed_name}")(t, names, pos, vel))

    def _on_arm_state(self, msg: JointState) -> None:
        self._on_state("/joint_states", msg, "joint_state")

    def _on_gripper_state(self, msg: JointState) -> None:
        self._on_state("/gripper/joint_states", msg, "gripper_state")

    def _on_reward(self, msg: Float64) -> None:
        t, r = self._stamp(), float(msg.data)
        self._feed("reward", lambda: self.recorder.record_reward(t, r),
                   lambda: self.builder.on_reward(t, r))

    def _on_arm_command(self, msg: Float64MultiArray) -> None:
        self._on_command("arm", "/arm_controller/commands", msg)

    def _on_gripper_command(self, msg: Float64MultiArray) -> None:
        self._on_command("gripper", "/gripper_controller/commands", msg)

    def _on_command(self, which: str, topic: str, msg: Float64MultiArray) -> None:
        t, values = self._stamp(), np.asarray(msg.data, dtype=np.float64)
        with self._lock:
            step = self._commands.add(which, t, values)
        transition = self._feed("command", lambda: self.recorder.record_command(topic, t, values),
                                lambda: None if step is None else self.builder.on_command(t, *step[1:]))
        if transition is not None:  # shows on /diagnostics that the episode in progress is being collected
            self.diag.values["episode_steps"] = int(self.diag.values.get("episode_steps", 0)) + 1

    def _on_episode(self, msg: String, info: MessageInfo) -> None:
        if info["source_timestamp"] < self._started_ns and _event(msg.data) == "end":
            # Latched history from before this node started (a restart): its episodes were not recorded
            # here, and recording their ends would split the episode in progress into empty bags. History
            # starts are kept: the latest tells which episode and task are in progress.
            return
        t = self._stamp()
        self._feed("episode", lambda: self.recorder.record_episode(t, msg.data),
                   lambda: self.builder.on_episode(t, msg.data))
        self.diag.values["episode_steps"] = 0
        if _event(msg.data) != "end":
            return
        try:
            with self._lock:
                episode = self.builder.finish_episode()
        except (MQLError, ValueError) as exc:  # an episode the replay cannot hold: dropped, reported, never fatal
            self.diag.reject("episode", str(exc))
            return
        if episode is not None and len(episode) > 0:
            self._collect(episode)

    def _collect(self, episode: Episode) -> None:
        """Episodes of the task the robot is on now are the new-task data; a new task starts a new set."""
        with self._lock:
            if episode.task_id != self.task_id:
                self.task_id, self.new_episodes = episode.task_id, []
            self.new_episodes = newest_within(self.new_episodes + [episode], self.max_new)
            n = sum(len(e) for e in self.new_episodes)
            self._collected += 1
            count = self._collected
        if self.episodes_dir is not None:
            try:
                self.episodes_dir.mkdir(parents=True, exist_ok=True)
                episode.save(unused_path(self.episodes_dir, episode.task_id, first=count, digits=5, suffix=".npz"))
            except OSError as exc:  # losing the audit copy must not stop collection
                self.diag.reject("save_episode", f"cannot save episode to {self.episodes_dir}: {exc}")
        self.diag.values.update({"task_id": self.task_id, "new_episodes": len(self.new_episodes),
                                 "new_transitions": n})
        if self.min_new and n >= self.min_new and not self._busy():
            started, why = self._start("min_new_transitions reached")
            if not started:
                self.diag.warn(f"automatic adaptation not started: {why}")
                self.get_logger().warning(f"automatic adaptation not started: {why}")

    # ------------------------------------------------------------------ adaptation
    def _busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _start(self, why: str) -> tuple[bool, str]:
        with self._lock:
            if self._busy():
                return False, "adaptation is already running; try again when it has finished"
            episodes = list(self.new_episodes)
            if len(episodes) < self.held_out + 1:
                return False, (f"need at least {self.held_out + 1} complete new-task episodes "
                               f"({self.held_out} held out for validation), have {len(episodes)}")
            self._cancel = threading.Event()
            self._worker = threading.Thread(target=self._run, args=(episodes, self._cancel), daemon=True)
            self._worker.start()
        self.diag.values["state"] = "running"
        msg = f"adaptation started ({why}) on {len(episodes)} episodes of {episodes[-1].task_id}"
        self.get_logger().info(msg)
        return True, msg

    def _run(self, episodes: list[Episode], cancel: threading.Event) -> None:
        train, held = episodes[: len(episodes) - self.held_out], episodes[len(episodes) - self.held_out:]
        try:
            agent = agent_from_checkpoint(self.meta)
            current = agent_from_checkpoint(load_checkpoint(self.current_path, expect_robot=self.robot))
            report = adapt(agent, train, self._archive_replay(), self.adapt_cfg, seed=self.seed + self._runs,
                           stop=lambda: self._stopping.is_set() or cancel.is_set())
            result = validate_update(agent, current, held or train, self.margin)
            self._runs += 1
            self.diag.values.update({"last_ess": report.ess, "last_lambda": report.proximal_lambda,
                                     "last_validation": result.reason, "adaptations": self._runs})
            if not result.ok:
                self.diag.warn(f"adapted policy refused: {result.reason}")
                self.get_logger().warning(f"adapted policy refused: {result.reason}")
                return
            path = self.output_dir / f"adapted_{self._runs:04d}_{int(time.time())}.pt"
            sha = save_checkpoint(path, agent, self.meta.family, self.robot,
                                  extra={"task_id": episodes[-1].task_id, "parent_sha256": self.meta.sha256,
                                         "adaptation": report.to_dict(), "validation": result.reason})
            with self._publish_lock:
                if cancel.is_set():
                    raise AdaptationCancelled("rolled back while it was being saved")
                self._publish_update(str(path), sha)
            self.diag.ok(f"published adapted checkpoint {path.name}")
        except AdaptationCancelled:  # shutting down (nothing to report to), or a rollback asked for it
            if cancel.is_set():
                self.diag.warn("adaptation abandoned: /mql/rollback was called while it ran")
                self.get_logger().warning("adaptation abandoned: /mql/rollback was called while it ran")
            return
        except (MQLError, OSError, ValueError) as exc:
            self.diag.error(f"adaptation failed: {exc}")
            self.get_logger().error(f"adaptation failed: {exc}")
        finally:
            self.diag.values["state"] = "idle"

    def _archive_replay(self) -> MultiTaskReplay | None:
        """The meta-training archive as a replay, loaded once (None: adapt on new-task data only)."""
        if not self.replay_dir:
            return None
        if self._replay is None:
            from mql_ros.archive import load_episodes

            replay = MultiTaskReplay(self.meta.config.history_len)
            self.get_logger().info(f"loading the archive {self.replay_dir}")
            started = time.monotonic()
            try:
                episodes = load_episodes(self.replay_dir, self.robot, warn=self.get_logger().warning,
                                         stop=self._stopping.is_set)
            except AdaptationCancelled as exc:
                self.get_logger().info(f"shutting down: {exc}")
                raise
            for episode in episodes:
                replay.add_episode(episode)
            self.get_logger().info(f"loaded {len(episodes)} episodes from {self.replay_dir} "
                                   f"in {time.monotonic() - started:.1f} s")
            self._replay = replay
        return self._replay

    def _publish_update(self, path: str, sha: str) -> None:
        self.current_path, self.current_sha = path, sha
        self._update_pub.publish(String(data=json.dumps({"path": path, "sha256": sha})))
        self.diag.values["current_sha256"] = sha
        self.get_logger().info(f"published policy update {path} ({sha[:12]})")

    def _on_adapt(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = self._start("requested on mql/adapt")
        return response

    def _on_rollback(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Back to the meta-trained checkpoint, and it stays: an adaptation still running is abandoned."""
        with self._publish_lock:
            running = self._busy() and not self._cancel.is_set()
            self._cancel.set()
            self._publish_update(self.meta_path, self.meta.sha256)
        response.success = True
        response.message = (f"republished the meta-trained checkpoint {self.meta_path}"
                            + ("; the adaptation in progress is abandoned" if running else ""))
        return response

    def close(self) -> None:
        """Flush the archive; an adaptation in progress is stopped at its next update and abandoned (nothing
        was published from it): a thread still running torch at interpreter exit aborts the process."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


def _event(data: str) -> str | None:
    """The "event" of an episode message, None if it is malformed (the step rule then says why)."""
    try:
        return parse_episode_event(data)["event"]
    except InputError:
        return None


def main(args: list[str] | None = None) -> int:
    """`ros2 run mql_ros adaptation`; exit 2 on bad parameters, checkpoint or config.

    One executor thread: adaptation itself runs in its worker thread, so callbacks stay responsive, and
    rclpy's MultiThreadedExecutor spent most of this node's CPU polling its futures (py-spy, soak at 1 kHz)."""
    # The wait-set executor: _on_episode needs MessageInfo, and the step rule needs CommandPair's order (see
    # context_encoder.main).
    return main_for(AdaptationNode, args, SingleThreadedExecutor)

