"""The control-step rule: a stream of ROS messages -> transitions and Episodes (../shared/INTERFACES.md).

One rule serves the context encoder node (online, messages as they arrive) and the bag reader (offline,
messages in log-time order), so a bag recorded with plain `ros2 bag record` is adaptation data and gives
exactly the transitions the running graph saw.

Command k (an arm command and a gripper command, joined by the caller) is matched with the latest arm and
gripper state received before it: that is s_k. The reward that followed it, r_k, is the latest reward
received before command k+1 (or before the episode's end event). The simulator publishes one reward per
step, so this is the reward of step k; when unsynchronized timers let two commands pass without a new
reward, the latest one is reused rather than dropping the step (the same online and offline). The state before command
k+1 (or before the end event) is s_{k+1}. So transition k is complete when command k+1 or the end of the
episode arrives. This is the simulator's Episode convention too: rewards[t] follows actions[t].
Episodes are delimited by /mql/episode events; without them (a plain recording), by a gap in time between
commands longer than `episode_gap_s`, with the task id given by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mql_ros.core.episode import Episode
from mql_ros.core.errors import IncompleteStep, InputError
from mql_ros.core.robot import RobotSpec


@dataclass(frozen=True)
class Transition:
    """(s_k, a_k, r_k, s_{k+1}); the action is the command turned back into [-1, 1]."""

    task_id: str
    obs: np.ndarray
    action: np.ndarray
    reward: float
    next_obs: np.ndarray


class TransitionBuilder:
    """Feed messages in receive (or log-time) order; `on_command` returns the transition it completes."""

    def __init__(self, robot: RobotSpec, task_id: str = "", episode_gap_s: float = 1.0) -> None:
        if not episode_gap_s > 0:
            raise InputError(f"episode_gap_s must be > 0, got {episode_gap_s}")
        self.robot = robot
        self.default_task_id = task_id
        self.episode_gap_ns = int(episode_gap_s * 1e9)
        self.task_id = task_id
        self._arm: tuple[np.ndarray, np.ndarray] | None = None
        self._grip: tuple[np.ndarray, np.ndarray] | None = None
        self._reward: tuple[int, float] | None = None
        self._pending: tuple[int, np.ndarray, np.ndarray] | None = None  # (stamp, s_k, a_k) awaiting r_k
        self._last_stamp = -1
        self.finished: list[Episode] = []  # episodes ended by a time gap, for the caller to take
        self._observations: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []

    # ------------------------------------------------------------------ message handlers
    def on_joint_state(self, stamp_ns: int, names, positions, velocities) -> None:
        self._advance(stamp_ns)
        self._arm = self._read_state(names, positions, velocities, self.robot.arm_joints, "arm joint state")

    def on_gripper_state(self, stamp_ns: int, names, positions, velocities) -> None:
        self._advance(stamp_ns)
        self._grip = self._read_state(names, positions, velocities, self.robot.gripper_joints,
                                      "gripper joint state")

    def on_reward(self, stamp_ns: int, value: float) -> None:
        value = float(value)
        if not np.isfinite(value):
            raise InputError(f"reward is not finite: {value}")
        self._advance(stamp_ns)
        self._reward = (stamp_ns, value)

    def on_episode(self, stamp_ns: int, event_json: str) -> Transition | None:
        """A start event opens an episode of its task (dropping an unfinished one); an end event completes
        the last pending transition. Returns that transition, if any."""
        try:
            event = json.loads(event_json)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"episode event is not JSON: {exc}") from exc
        if not isinstance(event, dict) or event.get("event") not in ("start", "end"):
            raise InputError(f"episode event needs \"event\": \"start\" or \"end\", got {event_json!r}")
        self._advance(stamp_ns)
        if event["event"] == "start":  # state and reward from before it belong to the last episode
            self._clear_episode()
            self._arm = self._grip = self._reward = None
            self.task_id = str(event.get("task_id") or self.default_task_id)
            return None
        return self._complete(stamp_ns)

    def on_command(self, stamp_ns: int, arm_cmd, grip_cmd) -> Transition | None:
        """Command k: completes transition k-1 (returned) and opens transition k."""
        self._advance(stamp_ns)
        action = self.robot.commands_to_action(arm_cmd, grip_cmd)
        done = None
        if self._pending is not None:
            if stamp_ns - self._pending[0] > self.episode_gap_ns:  # a plain recording: the gap ends it
                self._complete(stamp_ns)
                episode = self.finish_episode()
                if episode is not None:
                    self.finished.append(episode)
            else:
                done = self._complete(stamp_ns)
        self._pending = (stamp_ns, self._state("command"), action)
        return done

    def finish_episode(self) -> Episode | None:
        """The episode collected so far (None if it has no complete transition); starts a new one."""
        episode = None
        if self._actions:
            episode = Episode(self.task_id, np.asarray(self._observations), np.asarray(self._actions),
                              np.asarray(self._rewards))
        self._clear_episode()
        return episode

    # ------------------------------------------------------------------ the rule
    def _complete(self, stamp_ns: int) -> Transition | None:
        """Close the pending transition with the reward received after its command and the state now."""
        if self._pending is None:
            return None
        _, obs, action = self._pending
        self._pending = None
        if self._reward is None:
            raise IncompleteStep("no reward received in this episode yet: the step is dropped")
        next_obs = self._state("next state")
        if not self._observations:
            self._observations.append(obs)
        self._observations.append(next_obs)
        self._actions.append(action)
        self._rewards.append(self._reward[1])
        return Transition(self.task_id, obs, action, self._reward[1], next_obs)

    def _state(self, what: str) -> np.ndarray:
        if self._arm is None or self._grip is None:
            missing = "arm" if self._arm is None else "gripper"
            raise IncompleteStep(f"{what}: no {missing} joint state received in this episode yet")
        return self.robot.observation(self._arm[0], self._arm[1], self._grip[0], self._grip[1])

    def _read_state(self, names, positions, velocities, joints, what) -> tuple[np.ndarray, np.ndarray]:
        pos = self.robot.order_joint_state(names, positions, joints, what + " positions")
        if len(velocities) == 0:
            raise InputError(f"{what}: no velocities")
        vel = self.robot.order_joint_state(names, velocities, joints, what + " velocities")
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(vel))):
            raise InputError(f"{what}: NaN or inf in {pos.tolist()} / {vel.tolist()}")
        return pos, vel

    def _advance(self, stamp_ns: int) -> None:
        if stamp_ns < self._last_stamp:
            raise InputError(f"time went backwards: {stamp_ns} ns after {self._last_stamp} ns")
        self._last_stamp = stamp_ns

    def _clear_episode(self) -> None:
        self._pending = None
        self._observations, self._actions, self._rewards = [], [], []
