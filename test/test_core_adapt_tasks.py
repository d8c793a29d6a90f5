"""Task families: name resolution, the checked env that stops bad env output, and the point_goal family."""

import gymnasium
import numpy as np
import pytest
import torch

from mql_ros.core.config import MQLConfig
from mql_ros.core.errors import InputError
from mql_ros.core.tasks import (
    BUILTIN_FAMILIES,
    CheckedEnv,
    TaskFamily,
    make_checked_env,
    resolve_family,
    split_tasks,
    task_id,
)
from mql_ros.core.training import meta_train, rollout
from mql_ros.sim.point import PointGoalEnv, PointGoalFamily

torch.set_num_threads(1)


class _BadEnv(gymnasium.Env):
    """An env that misbehaves at step `bad_step` in the way `kind` says."""

    def __init__(self, kind: str, bad_step: int = 2):
        self.kind, self.bad_step = kind, bad_step
        self.observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        if self.kind == "old_reset":  # the Gym API before gymnasium
            return np.zeros(2, np.float32)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        bad = self.t == self.bad_step
        self.t += 1
        obs, reward = np.zeros(2, np.float32), 0.0
        if bad and self.kind == "nan_obs":
            obs = np.array([0.0, np.nan], np.float32)
        elif bad and self.kind == "short_obs":
            obs = np.zeros(1, np.float32)
        elif bad and self.kind == "text_obs":
            obs = np.array(["a", "b"])
        elif bad and self.kind == "huge_obs":  # finite as float64, inf as float32
            obs = np.array([0.0, 1e39])
        elif bad and self.kind == "inf_reward":
            reward = float("inf")
        elif bad and self.kind == "huge_reward":
            reward = -1e39
        elif bad and self.kind == "none_reward":
            reward = None
        elif bad and self.kind == "old_step":
            return obs, reward, False, {}
        return obs, reward, False, self.t >= 5, {}


class BadFamily:
    """A user family (importable as test_core_adapt_tasks:BadFamily) whose env goes wrong at step 2."""

    name = "bad"

    def __init__(self, kind: str = "nan_obs"):
        self.kind = kind

    def train_tasks(self):
        return [{"k": 0}, {"k": 1}]

    def test_tasks(self):
        return [{"k": 2}]

    def ood_tasks(self):
        return []

    def make_env(self, task):
        return _BadEnv(self.kind)


NOT_A_FAMILY = 42


def _failing_factory():
    raise RuntimeError("boom")


def test_resolve_family_finds_every_builtin_name():
    for name in BUILTIN_FAMILIES:
        family = resolve_family(name)
        assert isinstance(family, TaskFamily)
        assert family.name == name


def test_resolve_family_accepts_module_attribute_class_and_instance():
    family = resolve_family("mql_ros.sim.point:PointGoalFamily")  # a zero-argument factory
    assert isinstance(family, PointGoalFamily)
    assert resolve_family(family) is family  # an instance passes through


def test_resolve_family_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_cwd.py").write_text(
        "from mql_ros.sim.point import PointGoalFamily\nFAMILY = PointGoalFamily(dim=2)\n")
    monkeypatch.chdir(tmp_path)
    family = resolve_family("my_tasks_cwd:FAMILY")
    assert family.dim == 2


@pytest.mark.parametrize("spec, words", [
    ("no_such_family", ["unknown task family", "arm_reach"]),
    ("no_such_module_xyz:Family", ["cannot import", "no_such_module_xyz"]),
    ("mql_ros.sim.point:Missing", ["no attribute", "Missing"]),
    ("test_core_adapt_tasks:NOT_A_FAMILY", ["not a task family"]),
    ("test_core_adapt_tasks:_failing_factory", ["_failing_factory() failed", "boom"]),
    ("", ["expected a name"]),
])
def test_resolve_family_rejects_bad_specs_with_a_clear_error(spec, words):
    with pytest.raises(InputError) as err:
        resolve_family(spec)
    for w in words:
        assert w in str(err.value)


def test_task_ids_name_family_split_and_index():
    family = PointGoalFamily()
    assert task_id(family, "train", 3) == "point_goal/train/3"
    with pytest.raises(InputError, match="split"):
        task_id(family, "validation", 0)
    with pytest.raises(InputError, match="split"):
        split_tasks(family, "nope")


@pytest.mark.parametrize("kind, words", [
    ("nan_obs", ["NaN or inf", "step 2"]),
    ("short_obs", ["shape (1,)", "expected (2,)", "step 2"]),
    ("text_obs", ["dtype", "step 2"]),
    ("huge_obs", ["step 2 returned an observation with values too large for float32"]),
    ("old_reset", ["reset returned ndarray, expected gymnasium's (obs, info)"]),
    ("old_step", ["step 2 returned a 4-tuple, expected gymnasium's (obs, reward, terminated, truncated, info)"]),
    ("inf_reward", ["non-finite reward", "step 2"]),
    ("huge_reward", ["step 2 returned a reward too large for float32: -1e+39"]),
    ("none_reward", ["not a number", "step 2"]),
])
def test_checked_env_names_family_task_and_step_of_bad_env_output(kind, words):
    env = make_checked_env(BadFamily(kind), {"k": 0}, "bad/train/0")
    with pytest.raises(InputError) as err:
        rollout(env, None, rng=np.random.default_rng(0), task_id="bad/train/0")
    message = str(err.value)
    for w in ["'bad'", "'bad/train/0'", *words]:
        assert w in message


def test_meta_train_on_a_family_returning_nan_fails_before_storing_anything():
    stored = []
    cfg = MQLConfig(history_len=4, context_dim=4, hidden_sizes=(8,), batch_size=4, start_steps=100)
    with pytest.raises(InputError, match="NaN"):
        meta_train(BadFamily("nan_obs"), cfg, 50, progress=False, on_episode=stored.append)
    assert stored == []


def test_checked_env_rejects_actions_of_wrong_length_or_nan():
    env = CheckedEnv(PointGoalEnv({"goal": [1.0]}), "point_goal")
    env.reset(seed=0)
    with pytest.raises(InputError, match="1 finite values"):
        env.step(np.array([0.1, 0.2]))
    with pytest.raises(InputError, match="1 finite values"):
        env.step(np.array([np.nan]))


def test_checked_env_maps_unit_actions_to_the_env_action_box():
    class Wide(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-10, 10, (1,), np.float32)
        action_space = gymnasium.spaces.Box(np.array([0.0], np.float32), np.array([4.0], np.float32))

        def reset(self, *, seed=None, options=None):
            return np.zeros(1, np.float32), {}

        def step(self, action):
            return np.asarray(action, np.float32), 0.0, False, False, {}

    env = CheckedEnv(Wide(), "wide")
    env.reset()
    for a, expected in [(-1.0, 0.0), (0.0, 2.0), (1.0, 4.0), (5.0, 4.0)]:
        assert env.step(np.array([a]))[0][0] == pytest.approx(expected)


def test_point_family_splits_are_fixed_and_disjoint_in_range():
    a, b = PointGoalFamily(seed=0), PointGoalFamily(seed=0)
    assert a.train_tasks() == b.train_tasks() and a.test_tasks() == b.test_tasks()
    assert a.train_tasks() != PointGoalFamily(seed=1).train_tasks()
    r_train = [abs(t["goal"][0]) for t in a.train_tasks()]
    r_ood = [abs(t["goal"][0]) for t in a.ood_tasks()]
    assert max(r_train) < min(r_ood)
    signs = {np.sign(t["goal"][0]) for t in a.train_tasks()}
    assert signs == {-1.0, 1.0}  # goals on both sides: no single direction is right for all tasks


def test_point_env_reward_is_minus_distance_and_goal_is_not_observed():
    env = PointGoalEnv({"goal": [1.0]}, episode_steps=3, max_step=0.25)
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0.0]
    obs, r, term, trunc, _ = env.step(np.array([1.0]))
    assert obs.tolist() == [0.25] and r == pytest.approx(-0.75) and not term and not trunc
    env.step(np.array([1.0]))
    assert env.step(np.array([1.0]))[3]  # time limit, not a terminal


def test_point_oracle_return_is_the_greedy_straight_line():
    family = PointGoalFamily(episode_steps=4, max_step=0.25)
    # goal 0.6: positions 0.25, 0.5, 0.6, 0.6 -> distances 0.35, 0.1, 0, 0
    assert family.oracle_return({"goal": [0.6]}) == pytest.approx(-0.45)


@pytest.mark.parametrize("task", [{}, {"goal": [np.nan]}, {"goal": [1.0, 2.0]}, {"goal": [9.0]}, "x"])
def test_point_env_rejects_bad_tasks(task):
    with pytest.raises(InputError, match="goal"):
        PointGoalEnv(task)
