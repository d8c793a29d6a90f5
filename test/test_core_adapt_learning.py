"""Learning actually happens, in CI time, on the point_goal family whose goal only the reward reveals.

Bounds are computed, not guessed: the oracle return (straight to the goal) and the best any policy
without context can do. Goals lie on both sides of the origin in nearly mirrored pairs, and a policy
without context follows the same trajectory whatever the goal, so its expected distance at each step is
at least |goal|: standing still at the origin, return -T * |goal|, is its bound. Scores are the fraction
of the gap between that bound and the oracle closed by the learned policy.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mql_ros.core.config import AdaptConfig, MQLConfig
from mql_ros.core.replay import MultiTaskReplay
from mql_ros.core.training import evaluate, evaluate_adapted, meta_train
from mql_ros.sim.point import PointGoalFamily

torch.set_num_threads(1)

FAMILY = PointGoalFamily(dim=1, episode_steps=20)
STEPS = 7000
# Small networks and a short window (the goal shows in the first few rewards); gamma 0.9 suits 20-step
# episodes; the adaptation defaults except a snapshot that fits this replay (350 transitions per task).
CFG = MQLConfig(history_len=10, context_dim=16, hidden_sizes=(64, 64), batch_size=128, start_steps=500,
                gamma=0.9, lr=1e-3, replay_size=100_000, adapt=AdaptConfig(snapshot_per_task=400))


def _gap_closed(returns: list[float], tasks: list[dict]) -> float:
    oracle = np.mean([FAMILY.oracle_return(t) for t in tasks])
    blind = np.mean([-FAMILY.episode_steps * abs(t["goal"][0]) for t in tasks])
    return float((np.mean(returns) - blind) / (oracle - blind))


@pytest.fixture(scope="module")
def meta_trained():
    replay = MultiTaskReplay(CFG.history_len, CFG.replay_size)
    agent, curve = meta_train(FAMILY, CFG, STEPS, replay=replay, seed=0, progress=False, log_every=1000)
    return agent, replay, curve


def test_td3_with_context_solves_the_point_family(meta_trained):
    agent, _, curve = meta_trained
    tasks = FAMILY.test_tasks()
    closed = _gap_closed(evaluate(agent, FAMILY, tasks), tasks)
    assert closed >= 0.6, f"context agent closed only {closed:.2f} of the gap to the oracle"
    assert curve[-1]["mean_return"] > curve[0]["mean_return"] + 5.0  # the learning curve rises


def test_td3_without_context_cannot_solve_the_point_family(meta_trained):
    agent, _, _ = meta_trained
    blind, _ = meta_train(FAMILY, replace(CFG, use_context=False), STEPS, seed=0, progress=False,
                          log_every=STEPS)
    tasks = FAMILY.test_tasks()
    without = _gap_closed(evaluate(blind, FAMILY, tasks), tasks)
    with_context = _gap_closed(evaluate(agent, FAMILY, tasks), tasks)
    assert without <= 0.25, f"a policy without context closed {without:.2f} of the gap: the goal leaks"
    assert with_context - without >= 0.4


def test_mql_adaptation_improves_held_out_tasks_over_zero_shot(meta_trained):
    """One episode of new data per held-out task (test and out-of-distribution), default adaptation."""
    agent, replay, _ = meta_trained
    tasks = FAMILY.test_tasks() + FAMILY.ood_tasks()
    zero_shot = evaluate(agent, FAMILY, tasks, seed=1)
    adapted, reports = evaluate_adapted(agent, FAMILY, tasks, replay, CFG.adapt, seed=1)
    assert all(0.0 < r.ess <= 1.0 and r.n_new == FAMILY.episode_steps for r in reports)
    oracle = np.mean([FAMILY.oracle_return(t) for t in tasks])
    gain = (np.mean(adapted) - np.mean(zero_shot)) / (oracle - np.mean(zero_shot))
    assert gain >= 0.1, (f"adaptation closed {gain:.2f} of the zero-shot-to-oracle gap "
                          f"(zero-shot {np.mean(zero_shot):.2f}, adapted {np.mean(adapted):.2f})")
