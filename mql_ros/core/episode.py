"""Episode: the unit that moves between the simulator, the replay, the archive and the nodes.

An episode is one task's trajectory from reset to termination or time limit. Keeping whole episodes (not
loose transitions) is what lets any transition's context window be rebuilt later.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mql_ros.core.errors import InputError


@dataclass(frozen=True)
class Episode:
    """observations[t] is s_t (T+1 of them), actions[t] is a_t in [-1, 1], rewards[t] is r_t (after a_t).

    `terminated` is true only for a real terminal state; a time limit is not one (TD3 bootstraps through it).
    """

    task_id: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool = False

    def __post_init__(self) -> None:
        obs = np.asarray(self.observations, dtype=np.float32)
        act = np.asarray(self.actions, dtype=np.float32)
        rew = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        if obs.ndim != 2 or act.ndim != 2:
            raise InputError(f"episode {self.task_id!r}: observations and actions must be 2-D, "
                             f"got shapes {obs.shape} and {act.shape}")
        t = act.shape[0]
        if obs.shape[0] != t + 1 or rew.shape[0] != t:
            raise InputError(f"episode {self.task_id!r}: need T+1 observations and T rewards for T={t} "
                             f"actions, got {obs.shape[0]} observations and {rew.shape[0]} rewards")
        for name, arr in (("observations", obs), ("actions", act), ("rewards", rew)):
            if not np.all(np.isfinite(arr)):
                raise InputError(f"episode {self.task_id!r}: {name} contain NaN or inf")
        object.__setattr__(self, "observations", obs)
        object.__setattr__(self, "actions", act)
        object.__setattr__(self, "rewards", rew)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def total_reward(self) -> float:
        """The episode's (undiscounted) return, summed in float64: the float32 rewards are what the replay holds,
        a float32 running sum would add its own rounding on top."""
        return float(self.rewards.sum(dtype=np.float64))

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    def save(self, path: str | Path) -> None:
        """One .npz holding the episode exactly (float32 arrays, task id, terminal flag)."""
        np.savez(path, task_id=np.array(self.task_id), observations=self.observations, actions=self.actions,
                 rewards=self.rewards, terminated=np.array(self.terminated))

    @classmethod
    def load(cls, path: str | Path) -> Episode:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(str(f["task_id"]), f["observations"], f["actions"], f["rewards"], bool(f["terminated"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:  # BadZipFile: a truncated file
            raise InputError(f"{path} is not a saved episode: {type(exc).__name__}: {exc}") from exc


def newest_within(episodes: list[Episode], max_transitions: int) -> list[Episode]:
    """The newest episodes holding at most `max_transitions` transitions in all (always the newest one).

    Bounds what a long-running collector holds, keeping the data nearest to the task as it is now."""
    if max_transitions < 1:
        raise InputError(f"max_transitions must be >= 1, got {max_transitions}")
    kept: list[Episode] = []
    n = 0
    for episode in reversed(episodes):
        if kept and n + len(episode) > max_transitions:
            break
        kept.append(episode)
        n += len(episode)
    return kept[::-1]
