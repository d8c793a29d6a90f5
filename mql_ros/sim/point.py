"""point_goal: a tiny numpy task family whose goal is only revealed by the reward (for CI-sized tests).

A point starts at the origin and moves by at most `max_step` per axis per step toward a goal it does not
observe; the reward -|x - goal| is the only clue. Goals lie on both sides of the origin (1-D) or all
around it (2-D), so a policy without context can at best stop somewhere in the middle, while a policy
that infers the goal from the first rewards gets close to the oracle. The oracle is exact here (moving
each coordinate greedily minimizes every step's distance at once), which gives tests a known bound.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import numpy.typing as npt

from mql_ros.core.errors import InputError

POSITION_LIMIT = 3.0


class PointGoalEnv(gymnasium.Env):
    """Observation: the position x (dim values). Action in [-1, 1]^dim: x += max_step * a, then x is
    clipped to +-POSITION_LIMIT. Reward after each step: -|x - goal|. Episodes end by time limit only."""

    metadata = {"render_modes": []}

    def __init__(self, task: dict, dim: int = 1, episode_steps: int = 20, max_step: float = 0.25):
        self.dim = int(dim)
        self.episode_steps = int(episode_steps)
        self.max_step = float(max_step)
        self.goal = _check_goal(task, self.dim)
        self.observation_space = gymnasium.spaces.Box(-POSITION_LIMIT, POSITION_LIMIT, (self.dim,),
                                                       np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (self.dim,), np.float32)
        self._x = np.zeros(self.dim)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._x = np.zeros(self.dim)
        self._t = 0
        return self._x.astype(np.float32), {}

    def step(self, action: npt.ArrayLike) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.dim), -1.0, 1.0)
        self._x = np.clip(self._x + self.max_step * a, -POSITION_LIMIT, POSITION_LIMIT)
        self._t += 1
        reward = -float(np.linalg.norm(self._x - self.goal))
        return self._x.astype(np.float32), reward, False, self._t >= self.episode_steps, {}


def _check_goal(task: dict, dim: int) -> np.ndarray:
    if not isinstance(task, dict) or "goal" not in task:
        raise InputError(f"point_goal task must be a dict with a 'goal', got {task!r}")
    goal = np.asarray(task["goal"], dtype=np.float64).reshape(-1)
    if goal.shape[0] != dim or not np.all(np.isfinite(goal)) or np.any(np.abs(goal) > POSITION_LIMIT):
        raise InputError(f"point_goal: goal must be {dim} finite values within +-{POSITION_LIMIT}, "
                         f"got {task['goal']!r}")
    return goal


class PointGoalFamily:
    """Fixed, seeded splits: train and test goals at distance [0.5, 1.5] from the origin, ood goals at
    [1.75, 2.25] (1-D: either sign; 2-D: any direction)."""

    def __init__(self, dim: int = 1, n_train: int = 20, n_test: int = 10, n_ood: int = 6,
                 episode_steps: int = 20, max_step: float = 0.25, seed: int = 0):
        if dim not in (1, 2):
            raise InputError(f"point_goal: dim must be 1 or 2, got {dim}")
        self.name = "point_goal"
        self.dim = dim
        self.episode_steps = int(episode_steps)
        self.max_step = float(max_step)
        rng = np.random.default_rng(seed)
        self._splits = {"train": self._goals(rng, n_train, 0.5, 1.5),
                        "test": self._goals(rng, n_test, 0.5, 1.5),
                        "ood": self._goals(rng, n_ood, 1.75, 2.25)}

    def _goals(self, rng: np.random.Generator, n: int, r_min: float, r_max: float) -> list[dict]:
        radius = rng.uniform(r_min, r_max, size=n)
        if self.dim == 1:
            # Alternate signs so every split has goals on both sides of the origin.
            directions = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
        else:
            angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
            directions = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        goals = [r * d for r, d in zip(radius, directions, strict=True)]
        return [{"goal": [round(float(v), 6) for v in g]} for g in goals]

    def train_tasks(self) -> list[dict]:
        return [dict(t) for t in self._splits["train"]]

    def test_tasks(self) -> list[dict]:
        return [dict(t) for t in self._splits["test"]]

    def ood_tasks(self) -> list[dict]:
        return [dict(t) for t in self._splits["ood"]]

    def make_env(self, task: dict) -> PointGoalEnv:
        return PointGoalEnv(task, self.dim, self.episode_steps, self.max_step)

    def oracle_return(self, task: dict) -> float:
        """The best possible return on `task`: each coordinate moves straight to the goal at full speed."""
        goal = _check_goal(task, self.dim)
        x = np.zeros(self.dim)
        total = 0.0
        for _ in range(self.episode_steps):
            x = x + np.clip(goal - x, -self.max_step, self.max_step)
            total -= float(np.linalg.norm(x - goal))
        return total
