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

The rule itself (`StepRule`) only decides which state, action and reward go into which transition; it
carries them as opaque payloads. `TransitionBuilder` feeds it validated numpy readings (the nodes, the
per-message bag reader); the bulk bag decoder (mql_ros.archive.columnar) feeds it row numbers of arrays it
decoded in one go and gathers the arrays afterwards. Both therefore follow the same rule, line for line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mql_ros.core.episode import Episode
from mql_ros.core.errors import IncompleteStep, InputError
from mql_ros.core.robot import BagEncoding, float32_finite


@dataclass(frozen=True)
class Transition:
    """(s_k, a_k, r_k, s_{k+1}); the action is the command turned back into [-1, 1]."""

    task_id: str
    obs: np.ndarray
    action: np.ndarray
    reward: float
    next_obs: np.ndarray


def parse_episode_event(event_json: str) -> dict:
    """An /mql/episode message as a dict whose "event" is "start" or "end"; InputError saying what is wrong
    otherwise (not JSON, nested past what the parser can hold, not an object, no such event)."""
    try:
        event = json.loads(event_json)
    except (json.JSONDecodeError, TypeError, RecursionError) as exc:
        raise InputError(f"episode event is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(event, dict) or event.get("event") not in ("start", "end"):
        raise InputError(f"episode event needs \"event\": \"start\" or \"end\", got {str(event_json)[:200]!r}")
    return event


class StepRule:
    """The step rule on opaque payloads: a state payload per arm/gripper reading, an action payload per
    joined command, a reward payload per reward. Observations come out as (arm, gripper) payload pairs.

    Each `on_*` method first checks that time does not go backwards (InputError, the message is skipped),
    then applies the rule; IncompleteStep means a step was cut at a boundary and is dropped.
    """

    def __init__(self, task_id: str = "", episode_gap_s: float = 1.0) -> None:
        if not episode_gap_s > 0:
            raise InputError(f"episode_gap_s must be > 0, got {episode_gap_s}")
        self.default_task_id = task_id
        self.episode_gap_ns = int(episode_gap_s * 1e9)
        self.task_id = task_id
        self.arm = self.grip = None  # latest state payloads of this episode
        self.reward = None  # latest (stamp, reward payload) of this episode
        self.pending = None  # (stamp, s_k, a_k) awaiting r_k and s_{k+1}
        self.rewarded = False  # a reward arrived since the pending command: r_k as it stands
        self.ended = False  # the latest event was an end: states from now on are the next episode's
        self.last_stamp = -1
        self.delimited = False  # seen an /mql/episode event: events, not time gaps, delimit episodes
        self.finished: list[tuple] = []  # episodes ended by a time gap, for the caller to take
        self.observations: list = []
        self.actions: list = []
        self.rewards: list = []

    def advance(self, stamp_ns: int) -> None:
        if stamp_ns < self.last_stamp:
            raise InputError(f"time went backwards: {stamp_ns} ns after {self.last_stamp} ns")
        self.last_stamp = stamp_ns

    def on_reward(self, stamp_ns: int, reward: float) -> None:
        self.advance(stamp_ns)
        self.reward = (stamp_ns, reward)
        self.rewarded = self.pending is not None

    def pending_entry(self) -> tuple | None:
        """(s_k, a_k, r_k) of the open step k once a reward has followed its command: the context entry command
        k+1 will complete, unless a later reward replaces r_k first. It lets the context be published before
        command k+1 is computed, as in training, where the policy's context at step k+1 holds step k."""
        if self.pending is None or not self.rewarded:
            return None
        _, obs, action = self.pending
        return obs, action, self.reward[1]

    def on_episode(self, stamp_ns: int, event_json: str) -> tuple | None:
        """A start event opens an episode of its task (dropping an unfinished one); an end event completes
        the last pending transition. Returns that transition's (task, s, a, r, s'), if any."""
        event = parse_episode_event(event_json)
        self.advance(stamp_ns)
        self.delimited = True
        if event["event"] == "start":
            # A reward from before it belongs to the last episode, and so does a state, unless it came after that
            # episode's end event: the sim publishes end, start, first state, but a wait-set executor handles
            # the state topic before the episode topic when both are ready, so the first state can come first.
            self.clear_episode()
            if not self.ended:
                self.arm = self.grip = None
            self.reward, self.ended = None, False
            self.task_id = str(event.get("task_id") or self.default_task_id)
            return None
        if event.get("diverged"):  # the sim published nothing of the last step: its reward and state are unknown
            self.pending, self.rewarded = None, False
        try:
            return self.complete()
        finally:  # the last episode's final state: the next episode starts from another
            self.arm = self.grip = None
            self.ended = True

    def on_command(self, stamp_ns: int, action: np.ndarray | tuple[int, int]) -> tuple | None:
        """Command k (already advanced past and turned into an action payload): completes transition k-1
        (returned as (task, s, a, r, s')) and opens transition k."""
        done, dropped = None, None
        if self.pending is not None:
            gap = not self.delimited and stamp_ns - self.pending[0] > self.episode_gap_ns  # a plain recording
            try:
                done = self.complete()
            except IncompleteStep as exc:  # step k-1 is dropped; command k still opens step k
                dropped = exc
            if gap:
                done = None
                episode = self.finish_episode()
                if episode is not None:
                    self.finished.append(episode)
        self.pending = (stamp_ns, self.state("command"), action)
        self.rewarded = False
        if dropped is not None:
            raise dropped
        return done

    def finish_episode(self) -> tuple | None:
        """(task, observations, actions, rewards) collected so far (None without a complete transition);
        starts a new episode."""
        episode = None
        if self.actions:
            episode = (self.task_id, self.observations, self.actions, self.rewards)
        self.clear_episode()
        return episode

    def complete(self) -> tuple | None:
        """Close the pending transition with the reward received after its command and the state now."""
        if self.pending is None:
            return None
        _, obs, action = self.pending
        self.pending, self.rewarded = None, False
        if self.reward is None:
            raise IncompleteStep("no reward received in this episode yet: the step is dropped")
        next_obs = self.state("next state")
        if not self.observations:
            self.observations.append(obs)
        self.observations.append(next_obs)
        self.actions.append(action)
        self.rewards.append(self.reward[1])
        return self.task_id, obs, action, self.reward[1], next_obs

    def state(self, what: str) -> tuple:
        if self.arm is None or self.grip is None:
            missing = "arm" if self.arm is None else "gripper"
            raise IncompleteStep(f"{what}: no {missing} joint state received in this episode yet")
        return self.arm, self.grip

    def clear_episode(self) -> None:
        self.pending, self.rewarded = None, False
        self.observations, self.actions, self.rewards = [], [], []


class TransitionBuilder:
    """Feed messages in receive (or log-time) order; `on_command` returns the transition it completes."""

    def __init__(self, robot: BagEncoding, task_id: str = "", episode_gap_s: float = 1.0) -> None:
        self.robot = robot
        self.rule = StepRule(task_id, episode_gap_s)

    @property
    def task_id(self) -> str:
        return self.rule.task_id

    @property
    def finished(self) -> list[Episode]:
        """Episodes ended by a time gap so far."""
        return [self._episode(raw) for raw in self.rule.finished]

    # ------------------------------------------------------------------ message handlers
    def on_joint_state(self, stamp_ns: int, names: Sequence[str], positions: npt.ArrayLike,
                       velocities: npt.ArrayLike) -> None:
        self.rule.advance(stamp_ns)
        self.rule.arm = self._read_state(names, positions, velocities, self.robot.arm_joints, "arm joint state")

    def on_gripper_state(self, stamp_ns: int, names: Sequence[str], positions: npt.ArrayLike,
                         velocities: npt.ArrayLike) -> None:
        self.rule.advance(stamp_ns)
        self.rule.grip = self._read_state(names, positions, velocities, self.robot.gripper_joints,
                                          "gripper joint state")

    def on_reward(self, stamp_ns: int, value: float) -> None:
        value = float(value)
        if not float32_finite(value):
            raise InputError(f"reward is not finite (as float32): {value}")
        self.rule.on_reward(stamp_ns, value)

    def pending_entry(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """StepRule.pending_entry as arrays: (observation, action, reward), or None."""
        entry = self.rule.pending_entry()
        if entry is None:
            return None
        obs, action, reward = entry
        return self._obs(obs), action, reward

    def on_episode(self, stamp_ns: int, event_json: str) -> Transition | None:
        """A start event opens an episode of its task (dropping an unfinished one); an end event completes
        the last pending transition. Returns that transition, if any."""
        return self._transition(self.rule.on_episode(stamp_ns, event_json))

    def on_command(self, stamp_ns: int, arm_cmd: npt.ArrayLike, grip_cmd: npt.ArrayLike) -> Transition | None:
        """Command k: completes transition k-1 (returned) and opens transition k."""
        self.rule.advance(stamp_ns)
        action = self.robot.commands_to_action(arm_cmd, grip_cmd)
        return self._transition(self.rule.on_command(stamp_ns, action))

    def finish_episode(self) -> Episode | None:
        """The episode collected so far (None if it has no complete transition); starts a new one."""
        return self._episode(self.rule.finish_episode())

    # ------------------------------------------------------------------ payloads -> arrays
    def _obs(self, pair) -> np.ndarray:
        (arm_pos, arm_vel), (grip_pos, grip_vel) = pair
        return self.robot.observation(arm_pos, arm_vel, grip_pos, grip_vel)

    def _transition(self, done) -> Transition | None:
        if done is None:
            return None
        task, obs, action, reward, next_obs = done
        return Transition(task, self._obs(obs), action, reward, self._obs(next_obs))

    def _episode(self, raw) -> Episode | None:
        if raw is None:
            return None
        task, observations, actions, rewards = raw
        return Episode(task, np.asarray([self._obs(o) for o in observations]), np.asarray(actions),
                       np.asarray(rewards))

    def _read_state(self, names, positions, velocities, joints, what) -> tuple[np.ndarray, np.ndarray]:
        pos = self.robot.order_joint_state(names, positions, joints, what + " positions")
        if len(velocities) == 0 and joints:  # a state of no joints (BoxSpec's gripper) has none
            raise InputError(f"{what}: no velocities")
        vel = self.robot.order_joint_state(names, velocities, joints, what + " velocities")
        if not (float32_finite(pos) and float32_finite(vel)):
            raise InputError(f"{what}: NaN or inf (as float32) in {pos.tolist()} / {vel.tolist()}")
        return pos, vel

