"""MQL adaptation's plumbing on tiny networks: every switch does what it says, bad input is refused without
changing the agent, validation refuses broken updates, and evaluation rolls back to the meta weights."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mql_ros.core.adaptation import adapt, bellman_score, validate_update
from mql_ros.core.config import AdaptConfig, MQLConfig
from mql_ros.core.episode import Episode
from mql_ros.core.errors import AdaptationCancelled, InputError
from mql_ros.core.replay import MultiTaskReplay, episodes_to_batch
from mql_ros.core.tasks import make_checked_env
from mql_ros.core.td3 import TD3Context
from mql_ros.core.training import evaluate_adapted, finetune_config, rollout
from mql_ros.sim.point import PointGoalFamily

torch.set_num_threads(1)

FAMILY = PointGoalFamily(n_train=4, n_test=2, n_ood=0, episode_steps=10)
ADAPT = AdaptConfig(new_task_iters=3, archive_iters=6, archive_batch_mult=2, snapshot_per_task=40, proximal="ess")
CFG = MQLConfig(history_len=5, context_dim=4, hidden_sizes=(16, 16), batch_size=16, start_steps=0,
                adapt=ADAPT)


def _episodes(goal: float, n: int, seed: int, name: str) -> list[Episode]:
    env = make_checked_env(FAMILY, {"goal": [goal]}, name)
    return rollout(env, None, episodes=n, rng=np.random.default_rng(seed), task_id=name)


@pytest.fixture
def archive() -> MultiTaskReplay:
    """Random-action episodes of two train tasks with goals far apart (60 transitions each)."""
    replay = MultiTaskReplay(CFG.history_len)
    for e in _episodes(1.0, 6, 0, "near") + _episodes(-2.5, 6, 1, "far"):
        replay.add_episode(e)
    return replay


def _agent(cfg: MQLConfig = CFG) -> TD3Context:
    return TD3Context(cfg, 1, 1, seed=0)


def _params(agent: TD3Context) -> dict[str, torch.Tensor]:
    return agent.parameters_snapshot()


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_reports_ess_lambda_and_one_loss_per_iteration(archive):
    agent = _agent()
    report = adapt(agent, _episodes(1.0, 1, 5, "new"), archive, ADAPT, seed=0)
    assert report.n_new == 10 and report.n_archive == archive.num_transitions()
    assert 0.0 < report.ess <= 1.0
    assert report.proximal_lambda == pytest.approx(1.0 - report.ess)
    assert [d["phase"] for d in report.losses] == ["new"] * 3 + ["archive"] * 6
    assert all(np.isfinite(d["critic_loss"]) for d in report.losses)
    edges, counts = report.weight_histogram
    assert sum(counts) == 2 * ADAPT.snapshot_per_task  # the latest 40 of each task
    assert set(report.task_weights) == {"near", "far"}
    assert report.to_dict()["ess"] == report.ess


@pytest.mark.parametrize("after", [0, 2, 5])
def test_adapt_stops_before_the_next_update_once_asked(archive, after):
    """A node shutting down asks its running adaptation to stop; a torch thread still running at interpreter
    exit had aborted the adaptation node (found by an audit)."""
    agent = _agent()
    updates = []
    original = agent.update
    agent.update = lambda *a, **k: updates.append(1) or original(*a, **k)
    with pytest.raises(AdaptationCancelled, match=f"after {after} updates"):
        adapt(agent, _episodes(1.0, 1, 5, "new"), archive, ADAPT, seed=0, stop=lambda: len(updates) >= after)
    assert len(updates) == after


def test_propensity_weights_favour_the_train_task_that_looks_like_the_new_one(archive):
    # The new task has the same goal as "near"; the rewards in the context windows give it away (even
    # through an untrained GRU: the model is fit on whatever the context carries).
    report = adapt(_agent(), _episodes(1.0, 2, 7, "new"), archive, ADAPT, seed=0)
    assert report.task_weights["near"] > 2.0 * report.task_weights["far"]


def test_adapt_with_context_and_obs_features_runs(archive):
    cfg = replace(ADAPT, propensity_features="context+obs")
    report = adapt(_agent(), _episodes(1.0, 1, 5, "new"), archive, cfg, seed=0)
    assert 0.0 < report.ess <= 1.0


def test_without_propensity_every_archived_weight_is_one_and_ess_lambda_is_zero(archive):
    report = adapt(_agent(), _episodes(1.0, 1, 5, "new"), archive, replace(ADAPT, use_propensity=False))
    assert report.mean_archive_weight == 1.0 and report.zero_weight_fraction == 0.0
    assert report.ess == 1.0 and report.proximal_lambda == 0.0
    assert report.weight_histogram == ()


def test_fixed_and_off_proximal_modes_set_lambda(archive):
    new = _episodes(1.0, 1, 5, "new")
    fixed = adapt(_agent(), new, archive, replace(ADAPT, proximal="fixed", fixed_lambda=0.3))
    assert fixed.proximal_lambda == 0.3
    assert adapt(_agent(), new, archive, replace(ADAPT, proximal="off")).proximal_lambda == 0.0


def test_naive_finetuning_ignores_the_archive_entirely(archive):
    """finetune_config is plain TD3 on the new data: passing an archive or not gives the same weights."""
    new = _episodes(1.0, 1, 5, "new")
    with_archive, without = _agent(), _agent()
    r1 = adapt(with_archive, new, archive, finetune_config(ADAPT), seed=3)
    r2 = adapt(without, new, None, finetune_config(ADAPT), seed=3)
    assert r1.n_archive == 0 and r1.proximal_lambda == 0.0
    assert _same(_params(with_archive), _params(without))
    assert r1.losses == r2.losses


def test_adapt_changes_the_agent_and_uses_the_configured_lr(archive):
    agent = _agent()
    before = _params(agent)
    adapt(agent, _episodes(1.0, 1, 5, "new"), archive, replace(ADAPT, lr=1e-2))
    assert not _same(before, _params(agent))
    assert agent.actor_opt.param_groups[0]["lr"] == 1e-2


def test_adapt_refuses_bad_episodes_without_touching_the_agent(archive):
    agent = _agent()
    before = _params(agent)
    wrong_dims = Episode("new", np.zeros((3, 2)), np.zeros((2, 1)), np.zeros(2))
    for bad in ([], [wrong_dims], ["not an episode"]):
        with pytest.raises(InputError):
            adapt(agent, bad, archive, ADAPT)
    assert _same(before, _params(agent))


def test_adapt_excludes_the_new_tasks_own_archived_data_from_the_train_tasks(archive):
    new = _episodes(1.0, 1, 5, "near")  # the adaptation node records the new task into the archive too
    report = adapt(_agent(), new, archive, ADAPT)
    assert set(report.task_weights) == {"far"}


def test_validate_update_accepts_an_unchanged_agent_and_refuses_nan_weights():
    held = _episodes(1.0, 2, 9, "new")
    current, candidate = _agent(), _agent()
    assert validate_update(candidate, current, held, margin=0.0).ok
    with torch.no_grad():
        next(candidate.nets["actor"].parameters())[0, 0] = float("nan")
    result = validate_update(candidate, current, held, margin=0.1)
    assert not result.ok and "non-finite" in result.reason


def test_validate_update_refuses_a_candidate_whose_critic_is_inconsistent():
    held = _episodes(1.0, 2, 9, "new")
    current, candidate = _agent(), _agent()
    with torch.no_grad():
        # Q far off and wildly state-dependent: its one-step Bellman residual is large.
        candidate.nets["critic"].biases[-1].add_(50.0)
        candidate.nets["critic"].weights[-1].mul_(30.0)
    result = validate_update(candidate, current, held, margin=0.5)
    assert not result.ok
    assert result.candidate_score < result.current_score


def test_validate_update_rejects_a_negative_margin():
    with pytest.raises(InputError, match="margin"):
        validate_update(_agent(), _agent(), _episodes(1.0, 1, 9, "new"), margin=-1.0)


@pytest.mark.parametrize("overrides", [{"shared_encoder": True}, {"use_context": False}])
def test_bellman_score_works_for_every_encoder_layout(overrides):
    agent = _agent(replace(CFG, **overrides))
    batch = episodes_to_batch(_episodes(1.0, 1, 9, "new"), CFG.history_len)
    assert np.isfinite(bellman_score(agent, batch))


def test_evaluate_adapted_restores_the_meta_weights_after_each_task(archive):
    agent = _agent()
    before = _params(agent)
    returns, reports = evaluate_adapted(agent, FAMILY, FAMILY.test_tasks(), archive, ADAPT, seed=0)
    assert len(returns) == len(reports) == 2 and all(np.isfinite(returns))
    assert _same(before, _params(agent))
