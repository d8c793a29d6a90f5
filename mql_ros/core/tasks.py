"""Task families: what can be meta-trained and adapted on, and how a user names one on the command line.

A family is any object with a name, fixed train/test/ood task lists and an env factory
(../shared/INTERFACES.md). Users bring their own as "package.module:attribute"; since a user-written env
is the likeliest source of bad data, every env the core steps is wrapped in `CheckedEnv`, which turns a
wrong-shaped or non-finite observation or reward into an InputError naming the family, task and step
instead of letting NaN reach the replay and the networks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np
import numpy.typing as npt

from mql_ros.core.errors import InputError
from mql_ros.core.robot import FLOAT32_MAX

BUILTIN_FAMILIES = {
    "arm_reach": "mql_ros.sim.families:ArmReachFamily",
    "arm_payload": "mql_ros.sim.families:ArmPayloadFamily",
    "point_goal": "mql_ros.sim.point:PointGoalFamily",
}
SPLITS = ("train", "test", "ood")


@runtime_checkable
class TaskFamily(Protocol):
    name: str

    def train_tasks(self) -> list[dict]: ...  # fixed and seeded

    def test_tasks(self) -> list[dict]: ...  # held out

    def ood_tasks(self) -> list[dict]: ...  # outside the training range (may be empty)

    def make_env(self, task: dict) -> gymnasium.Env: ...


def _is_family(obj: Any) -> bool:
    return (not isinstance(obj, type) and isinstance(getattr(obj, "name", None), str)
            and all(callable(getattr(obj, m, None)) for m in ("train_tasks", "test_tasks", "ood_tasks",
                                                              "make_env")))


def resolve_family(spec: str | TaskFamily) -> TaskFamily:
    """A built-in name ("arm_reach") or "package.module:attribute", the attribute being a family instance
    or a zero-argument factory (e.g. the class). The current directory is importable, as on the CLI."""
    if _is_family(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise InputError(f"task family: expected a name or 'package.module:attribute', got {spec!r}")
    target = BUILTIN_FAMILIES.get(spec, spec)
    if ":" not in target:
        raise InputError(f"unknown task family {spec!r}: use one of {sorted(BUILTIN_FAMILIES)} "
                         f"or 'package.module:attribute'")
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module can fail in any way on import; report it as bad input
        raise InputError(f"task family {spec!r}: cannot import module {module_name!r}: "
                         f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"task family {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not _is_family(obj) and callable(obj):
        try:
            obj = obj()
        except Exception as e:
            raise InputError(f"task family {spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
    if not _is_family(obj):
        raise InputError(f"task family {spec!r}: {type(obj).__name__} object is not a task family (needs a "
                         f"str `name` and methods train_tasks, test_tasks, ood_tasks, make_env)")
    return obj


def split_tasks(family: TaskFamily, split: str) -> list[dict]:
    """The task list of one split, checked to be a list of dicts."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {list(SPLITS)}, got {split!r}")
    tasks = getattr(family, f"{split}_tasks")()
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, dict) for t in tasks):
        raise InputError(f"family {family.name!r}: {split}_tasks() must return a list of dicts")
    return list(tasks)


def task_id(family: TaskFamily, split: str, index: int) -> str:
    """The id under which a task's data is stored and looked up, e.g. "arm_reach/train/3"."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return f"{family.name}/{split}/{int(index)}"


def _describe_return(out: Any) -> str:
    return f"a {len(out)}-tuple" if isinstance(out, tuple) else type(out).__name__


class CheckedEnv(gymnasium.Wrapper):
    """Checks every observation and reward of a family's env, and maps actions from [-1, 1] to its Box.

    The learner always acts in [-1, 1] (what the replay stores); an env with other finite action bounds
    gets the affine image of that cube.
    """

    def __init__(self, env: gymnasium.Env, family_name: str, task_name: str = ""):
        super().__init__(env)
        self._where = f"family {family_name!r}" + (f" task {task_name!r}" if task_name else "")
        space = env.action_space
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise InputError(f"{self._where}: action space must be a 1-D Box, got {space}")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise InputError(f"{self._where}: action space bounds must be finite, got {space}")
        obs_space = env.observation_space
        if not isinstance(obs_space, gymnasium.spaces.Box) or len(obs_space.shape) != 1:
            raise InputError(f"{self._where}: observation space must be a 1-D Box, got {obs_space}")
        self.obs_dim = int(obs_space.shape[0])
        self.act_dim = int(space.shape[0])
        self._low = space.low.astype(np.float64)
        self._high = space.high.astype(np.float64)
        self._step = 0

    def _check_obs(self, obs: Any, when: str) -> np.ndarray:
        arr = np.asarray(obs)
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise InputError(f"{self._where}: {when} returned an observation of dtype {arr.dtype}, "
                             f"expected real numbers")
        if arr.shape != (self.obs_dim,):
            raise InputError(f"{self._where}: {when} returned an observation of shape {arr.shape}, "
                             f"expected ({self.obs_dim},)")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{self._where}: {when} returned an observation with NaN or inf: {arr.tolist()}")
        if np.any(np.abs(arr) > FLOAT32_MAX):  # finite here, but inf once stored as float32
            raise InputError(f"{self._where}: {when} returned an observation with values too large for float32 "
                             f"(beyond {FLOAT32_MAX:.4g}): {arr.tolist()}")
        return arr.astype(np.float32)

    def reset(self, **kwargs) -> tuple[np.ndarray, dict]:
        out = self.env.reset(**kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise InputError(f"{self._where}: reset returned {_describe_return(out)}, expected gymnasium's "
                             f"(obs, info) with info a dict (the old Gym API returned obs alone)")
        obs, info = out
        self._step = 0
        return self._check_obs(obs, "reset"), info

    def step(self, action: npt.ArrayLike) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.act_dim or not np.all(np.isfinite(a)):
            raise InputError(f"{self._where}: step {self._step}: action must be {self.act_dim} finite "
                             f"values, got {a.tolist()}")
        a = self._low + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (self._high - self._low)
        out = self.env.step(a.astype(self.env.action_space.dtype))
        when = f"step {self._step}"
        if not (isinstance(out, tuple) and len(out) == 5):
            raise InputError(f"{self._where}: {when} returned {_describe_return(out)}, expected gymnasium's "
                             f"(obs, reward, terminated, truncated, info) (the old Gym API returned "
                             f"(obs, reward, done, info))")
        obs, reward, terminated, truncated, info = out
        self._step += 1
        obs = self._check_obs(obs, when)
        try:
            r = float(reward)
        except (TypeError, ValueError) as e:
            raise InputError(f"{self._where}: {when} returned a reward that is not a number: "
                             f"{reward!r}") from e
        if not np.isfinite(r):
            raise InputError(f"{self._where}: {when} returned a non-finite reward {r}")
        if abs(r) > FLOAT32_MAX:
            raise InputError(f"{self._where}: {when} returned a reward too large for float32: {r}")
        return obs, r, bool(terminated), bool(truncated), info


def make_checked_env(family: TaskFamily, task: dict, task_name: str = "") -> CheckedEnv:
    """family.make_env(task) wrapped in CheckedEnv; a failing factory is reported as bad input."""
    try:
        env = family.make_env(task)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"family {family.name!r}: make_env({task}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(env, gymnasium.Env):
        raise InputError(f"family {family.name!r}: make_env returned {type(env).__name__}, "
                         f"not a gymnasium.Env")
    return CheckedEnv(env, family.name, task_name)
