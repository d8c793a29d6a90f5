"""Rollouts, the meta-training loop's bookkeeping and evaluation, on tiny networks (fast)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mql_ros.core.checkpoint import save_checkpoint
from mql_ros.core.config import AdaptConfig, MQLConfig
from mql_ros.core.context import context_input_scale
from mql_ros.core.errors import ConfigError, InputError
from mql_ros.core.replay import MultiTaskReplay
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.core.tasks import make_checked_env, resolve_family
from mql_ros.core.td3 import TD3Context
from mql_ros.core.training import evaluate, evaluate_adapted, meta_train, rollout
from mql_ros.sim.point import PointGoalFamily

torch.set_num_threads(1)

FAMILY = PointGoalFamily(n_train=3, n_test=2, n_ood=1, episode_steps=10)
CFG = MQLConfig(history_len=4, context_dim=4, hidden_sizes=(16, 16), batch_size=8, start_steps=30)


def test_meta_train_stores_and_reports_every_episode_and_logs_a_curve():
    seen = []
    replay = MultiTaskReplay(CFG.history_len)
    agent, curve = meta_train(FAMILY, CFG, 100, replay=replay, seed=0, progress=False, log_every=40,
                              on_episode=seen.append)
    assert len(seen) == 10 and replay.num_transitions() == 100
    # round-robin over shuffled train tasks: every task gets the same number of episodes (+-1)
    counts = [replay.num_transitions(f"point_goal/train/{i}") for i in range(3)]
    assert max(counts) - min(counts) <= 10
    assert [c["step"] for c in curve] == [40, 80, 100]
    # updates_per_step per collected step, run after each episode once start_steps have been collected
    # (the third episode completes the 30 random steps): 8 episodes x 10
    assert agent.updates == 80
    assert {"mean_return", "critic_loss", "seconds", "episodes"} <= set(curve[-1])
    # the warm-up episodes are uniformly random, so they are not all the same
    assert not np.allclose(seen[0].actions, seen[1].actions)
    # the context input scale was set once, from the three warm-up episodes, on every encoder
    expected = context_input_scale(seen[:3])
    for nets in (agent.nets, agent.targets):
        np.testing.assert_allclose(nets["critic_encoder"].input_scale.numpy(), expected, rtol=1e-6)


def test_meta_train_from_an_agent_continues_its_networks_under_the_new_settings():
    base, _ = meta_train(FAMILY, CFG, 100, seed=0, progress=False)
    before = {k: v.clone() for k, v in base.parameters_snapshot().items()}
    scale = base.nets["critic_encoder"].input_scale.clone()
    final = replace(CFG, lr=1e-4, expl_noise=0.05, start_steps=0, batch_size=16)
    # one 10-step episode, less than a batch: no update, so the agent comes back exactly as it went in
    agent, _ = meta_train(FAMILY, final, 5, seed=1, progress=False, init=base)
    assert agent is base and agent.cfg == final and agent.updates == 80
    assert all(torch.equal(before[k], v) for k, v in agent.parameters_snapshot().items())
    assert agent.actor_opt.param_groups[0]["lr"] == 1e-4
    # with updates: the same networks move on, and the context input scale is kept, not recomputed
    agent, _ = meta_train(FAMILY, final, 40, seed=1, progress=False, init=agent)
    assert agent.updates == 80 + 30  # from the second episode on, when the (new, empty) replay holds a batch
    assert any(not torch.equal(before[k], v) for k, v in agent.parameters_snapshot().items())
    assert torch.equal(agent.nets["critic_encoder"].input_scale, scale)


def test_meta_train_refuses_to_continue_an_agent_under_a_config_of_another_shape():
    base = TD3Context(CFG, 1, 1)
    with pytest.raises(ConfigError, match="context_dim"):
        meta_train(FAMILY, replace(CFG, context_dim=8), 10, progress=False, init=base)


def test_meta_train_rejects_bad_arguments():
    with pytest.raises(InputError, match="steps"):
        meta_train(FAMILY, CFG, 0, progress=False)
    with pytest.raises(InputError, match="unknown task family"):
        meta_train("no_such_family", CFG, 10, progress=False)


def test_rollout_with_a_deployed_policy_matches_the_training_agent(tmp_path):
    """The runtime (numpy) path and the training (torch) path act the same on the same task."""
    agent = TD3Context(CFG, 1, 1, seed=3)
    save_checkpoint(tmp_path / "a.pt", agent, "point_goal")
    policy = DeployedPolicy.from_checkpoint(tmp_path / "a.pt")
    env = make_checked_env(FAMILY, FAMILY.test_tasks()[0])
    a = rollout(env, agent, rng=np.random.default_rng(0))[0]
    b = rollout(env, policy, rng=np.random.default_rng(0))[0]
    np.testing.assert_allclose(a.actions, b.actions, atol=1e-5)
    np.testing.assert_allclose(a.rewards, b.rewards, atol=1e-5)


def test_rollout_noise_explores_and_stays_in_the_action_box():
    agent = TD3Context(CFG, 1, 1, seed=3)
    env = make_checked_env(FAMILY, FAMILY.test_tasks()[0])
    quiet = rollout(env, agent, rng=np.random.default_rng(0))[0]
    noisy = rollout(env, agent, noise=0.5, rng=np.random.default_rng(0))[0]
    assert not np.allclose(quiet.actions, noisy.actions)
    assert np.all(np.abs(noisy.actions) <= 1.0)
    with pytest.raises(InputError, match="episodes"):
        rollout(env, agent, episodes=0)


def test_evaluate_returns_the_mean_return_of_each_task():
    agent = TD3Context(CFG, 1, 1, seed=3)
    returns = evaluate(agent, FAMILY, FAMILY.test_tasks(), episodes=2)
    env = make_checked_env(FAMILY, FAMILY.test_tasks()[1])
    expected = rollout(env, agent)[0].total_reward  # deterministic env and policy
    assert len(returns) == 2 and returns[1] == pytest.approx(expected, abs=1e-5)


def test_meta_training_and_adaptation_run_end_to_end_on_the_arm_reach_family():
    family = resolve_family("arm_reach")
    cfg = replace(CFG, history_len=50, start_steps=100,
                  adapt=AdaptConfig(new_task_iters=2, archive_iters=3, snapshot_per_task=50))
    replay = MultiTaskReplay(cfg.history_len)
    agent, curve = meta_train(family, cfg, 150, replay=replay, seed=0, progress=False, log_every=150)
    assert agent.obs_dim == family.make_env(family.train_tasks()[0]).observation_space.shape[0]
    assert replay.num_transitions() == 150 and np.isfinite(curve[-1]["critic_loss"])
    returns, reports = evaluate_adapted(agent, family, family.test_tasks()[:1], replay, cfg.adapt)
    assert np.isfinite(returns[0]) and reports[0].n_new == 50 and len(reports[0].task_weights) == 3
