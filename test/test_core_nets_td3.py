"""TD3Context update: sample weights, the proximal pull, delay and smoothing, snapshots, acting."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mql_ros.core.config import MQLConfig
from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError
from mql_ros.core.replay import Batch, episodes_to_batch
from mql_ros.core.td3 import TD3Context

torch.set_num_threads(1)
OBS, ACT = 3, 2
CFG = MQLConfig(history_len=6, context_dim=4, hidden_sizes=(16, 16), batch_size=8)


def _batch(seed=0, steps=8):
    rng = np.random.default_rng(seed)
    ep = Episode("t", rng.normal(size=(steps + 1, OBS)), rng.uniform(-1, 1, (steps, ACT)),
                 rng.normal(size=steps))
    return episodes_to_batch([ep], CFG.history_len)


def _params(agent):
    return agent.parameters_snapshot()


@pytest.mark.parametrize("shared", [False, True])
def test_zero_weight_samples_do_not_change_the_update(shared):
    cfg = replace(CFG, shared_encoder=shared)
    a, b = TD3Context(cfg, OBS, ACT, seed=3), TD3Context(cfg, OBS, ACT, seed=3)
    clean, other = _batch(0), _batch(1)
    mixed = Batch.concat([clean, other])
    garbage = Batch.concat([clean, _batch(2)])
    w = torch.cat([torch.ones(len(clean)), torch.zeros(len(other))])
    for _ in range(2):  # the second call also takes the actor step
        a.update(mixed, w)
        b.update(garbage, w)
    for name, t in _params(a).items():
        torch.testing.assert_close(t, _params(b)[name], atol=1e-6, rtol=0, msg=name)


def test_proximal_term_alone_pulls_parameters_back_to_the_anchor():
    agent = TD3Context(replace(CFG, lr=5e-3), OBS, ACT)
    anchor = agent.parameters_snapshot()
    with torch.no_grad():
        for p in agent.nets.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()

    def distance():
        return sum(float((t - anchor[n]).pow(2).sum()) for n, t in _params(agent).items())

    before = distance()
    for _ in range(20):  # zero sample weights leave only the proximal loss
        agent.update(batch, torch.zeros(len(batch)), proximal_lambda=1.0, anchor=anchor)
    assert distance() < 0.3 * before


def test_proximal_without_anchor_and_bad_weights_are_errors():
    agent = TD3Context(CFG, OBS, ACT)
    batch = _batch()
    with pytest.raises(InputError, match="anchor"):
        agent.update(batch, proximal_lambda=0.5)
    with pytest.raises(InputError, match="weights"):
        agent.update(batch, torch.ones(len(batch) + 1))
    with pytest.raises(InputError, match="weights"):
        agent.update(batch, torch.full((len(batch),), float("nan")))


def test_actor_and_targets_move_only_every_policy_delay_steps_by_polyak_tau():
    agent = TD3Context(CFG, OBS, ACT)
    batch = _batch()
    actor0 = [p.clone() for p in agent.nets["actor"].parameters()]
    target0 = [p.clone() for p in agent.targets.parameters()]
    info = agent.update(batch)
    assert "actor_loss" not in info and agent.updates == 1
    assert all(torch.equal(p, q) for p, q in zip(agent.nets["actor"].parameters(), actor0, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(agent.targets.parameters(), target0, strict=True))
    info = agent.update(batch)
    assert "actor_loss" in info
    assert not all(torch.equal(p, q) for p, q in zip(agent.nets["actor"].parameters(), actor0, strict=True))
    for tp, t0, p in zip(agent.targets.parameters(), target0, agent.nets.parameters(), strict=True):
        torch.testing.assert_close(tp, (1 - CFG.tau) * t0 + CFG.tau * p)


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_preactivation_penalty_alone_pulls_saturated_actions_back_from_the_tanh_limits(l2):
    agent = TD3Context(replace(CFG, policy_delay=1, lr=1e-2, actor_preactivation_l2=l2), OBS, ACT)
    with torch.no_grad():
        agent.nets["actor"].net[-1].bias.fill_(6.0)  # tanh(6) = 0.99998: saturated
        agent.nets["critic"].weights[-1].zero_()  # Q constant in the action: no gradient from the critic
    agent.critic_opt.param_groups[0]["lr"] = 0.0
    batch = _batch()
    z = agent.contexts(batch.hist, batch.hist_len)

    def mean_preactivation():
        with torch.no_grad():
            return float(agent.nets["actor"].preactivation(batch.obs, z).mean())

    before = mean_preactivation()
    for _ in range(20):
        agent.update(batch)
    if l2 == 0.0:
        assert mean_preactivation() == before  # nothing else moves the actor here
    else:
        assert mean_preactivation() < before - 1.0


def test_target_policy_smoothing_noise_is_clipped_and_actions_stay_in_range():
    cfg = replace(CFG, policy_noise=100.0, noise_clip=0.2)
    agent = TD3Context(cfg, OBS, ACT)
    obs = torch.randn(500, OBS)
    z = torch.zeros(500, cfg.context_dim)
    with torch.no_grad():
        mu = agent.targets["actor"](obs, z)
    a = agent.smoothed_target_action(obs, z)
    assert float((a - mu).abs().max()) <= 0.2 + 1e-6
    assert float((a - mu).abs().max()) > 0.19  # huge noise: clipped, not absent
    assert float(a.abs().max()) <= 1.0


def test_critic_loss_falls_on_a_fixed_batch():
    agent = TD3Context(replace(CFG, lr=3e-3), OBS, ACT)
    batch = _batch(steps=12)
    first = agent.update(batch)["critic_loss"]
    for _ in range(60):
        last = agent.update(batch)["critic_loss"]
    assert np.isfinite(last) and last < 0.5 * first


def test_snapshot_restore_round_trip_is_exact():
    agent = TD3Context(CFG, OBS, ACT)
    batch = _batch()
    agent.update(batch)
    snap = agent.snapshot()
    before = _params(agent)
    for _ in range(3):
        agent.update(batch)
    agent.restore(snap)
    assert agent.updates == 1
    for n, t in _params(agent).items():
        assert torch.equal(t, before[n]), n
    a1 = agent.update(batch)
    agent.restore(snap)
    assert agent.update(batch)["critic_loss"] == pytest.approx(a1["critic_loss"], rel=1e-6)


def test_act_stays_in_range_and_rejects_bad_input():
    agent = TD3Context(CFG, OBS, ACT)
    rng = np.random.default_rng(0)
    z = np.zeros(CFG.context_dim)
    for _ in range(20):
        a = agent.act(rng.normal(size=OBS) * 10, z, noise=2.0, rng=rng)
        assert a.shape == (ACT,) and np.all(np.abs(a) <= 1.0)
    with pytest.raises(InputError):
        agent.act(np.zeros(OBS + 1), z)
    with pytest.raises(InputError):
        agent.act(np.full(OBS, np.nan), z)


def test_without_context_the_agent_is_plain_multitask_td3():
    cfg = replace(CFG, use_context=False)
    agent = TD3Context(cfg, OBS, ACT)
    batch = _batch()
    assert agent.contexts(batch.hist, batch.hist_len).shape == (len(batch), 0)
    assert not any("encoder" in n for n in agent.parameters_snapshot())
    agent.update(batch)
    sc = agent.streaming_context()
    assert sc.push(np.zeros(OBS), np.zeros(ACT), 0.0).shape == (0,)
    assert agent.act(np.zeros(OBS), sc.context).shape == (ACT,)
