"""The context: batched GRU windows (training) and the one-step StreamingContext (deployment) agree."""

import numpy as np
import pytest
import torch

from mql_ros.core import networks
from mql_ros.core.config import MQLConfig
from mql_ros.core.context import StreamingContext, context_entries, context_input_scale
from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError
from mql_ros.core.networks import ContextEncoder, PackedWindows, encode_windows
from mql_ros.core.replay import episodes_to_batch
from mql_ros.core.td3 import TD3Context

torch.set_num_threads(1)
OBS, ACT = 4, 2


def _episode(rng, steps, task="t"):
    return Episode(task, rng.normal(size=(steps + 1, OBS)), rng.uniform(-1, 1, (steps, ACT)),
                   rng.normal(size=steps))


def _stream(agent, episode):
    sc = agent.streaming_context()
    out = [sc.context.copy()]
    for k in range(len(episode)):
        out.append(sc.push(episode.observations[k], episode.actions[k], episode.rewards[k]).copy())
    return np.array(out)


@pytest.mark.parametrize("history_len", [5, 12])
def test_streaming_context_equals_batched_windows_also_past_history_len(history_len):
    rng = np.random.default_rng(0)
    agent = TD3Context(MQLConfig(history_len=history_len, hidden_sizes=(16,), context_dim=6), OBS, ACT)
    ep = _episode(rng, 11)  # longer than H=5: exercises the window recompute
    streamed = _stream(agent, ep)
    batch = episodes_to_batch([ep], history_len)
    now = agent.contexts(batch.hist, batch.hist_len).numpy()
    nxt = agent.contexts(batch.next_hist, batch.next_hist_len).numpy()
    np.testing.assert_allclose(streamed[:-1], now, atol=1e-5)
    np.testing.assert_allclose(streamed[1:], nxt, atol=1e-5)


def test_preview_returns_what_push_would_and_changes_nothing_also_past_history_len():
    rng = np.random.default_rng(3)
    agent = TD3Context(MQLConfig(history_len=4, hidden_sizes=(16,), context_dim=5), OBS, ACT)
    ep = _episode(rng, 9)
    sc = agent.streaming_context()
    for k in range(len(ep)):
        before = sc.context.copy()
        peeked = sc.preview(ep.observations[k], ep.actions[k], ep.rewards[k]).copy()
        sc.preview(ep.observations[k], ep.actions[k], ep.rewards[k] + 1.0)  # another reward: no trace left
        np.testing.assert_array_equal(sc.context, before)
        assert sc.steps == k
        np.testing.assert_array_equal(sc.push(ep.observations[k], ep.actions[k], ep.rewards[k]), peeked)


def test_context_is_zero_at_episode_start_and_after_reset():
    rng = np.random.default_rng(1)
    agent = TD3Context(MQLConfig(history_len=8, hidden_sizes=(16,), context_dim=5), OBS, ACT)
    ep = _episode(rng, 3)
    batch = episodes_to_batch([ep], 8)
    assert batch.hist_len[0] == 0
    assert torch.all(agent.contexts(batch.hist, batch.hist_len)[0] == 0)
    sc = agent.streaming_context()
    sc.push(ep.observations[0], ep.actions[0], 1.0)
    assert np.any(sc.context != 0)
    sc.reset()
    assert np.all(sc.context == 0) and sc.steps == 0


def test_context_entries_are_action_reward_observation_in_that_order():
    ep = Episode("t", np.arange(3 * OBS, dtype=float).reshape(3, OBS), [[0.1, 0.2], [0.3, 0.4]], [5.0, 6.0])
    e = context_entries(ep)
    np.testing.assert_allclose(e[1], [0.3, 0.4, 6.0, *ep.observations[1]])
    assert e.shape == (2, ACT + 1 + OBS)


def test_packed_gru_matches_torch_gru_values_and_gradients():
    torch.manual_seed(0)
    enc = ContextEncoder(5, 4).double()
    lens = torch.tensor([0, 1, 6, 3, 5, 2, 6])
    x = torch.randn(7, 6, 5, dtype=torch.float64) * (torch.arange(6)[None, :, None] < lens[:, None, None])
    out = enc(x, lens)
    ref_all, _ = enc.gru(x)
    ref = ref_all[torch.arange(7), (lens - 1).clamp(min=0)] * (lens > 0)[:, None]
    torch.testing.assert_close(out, ref)
    g = torch.randn(7, 4, dtype=torch.float64)
    (out * g).sum().backward()
    mine = [p.grad.clone() for p in enc.gru.parameters()]
    enc.zero_grad()
    (ref * g).sum().backward()
    for a, b in zip(mine, [p.grad for p in enc.gru.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_a_batch_of_only_empty_windows_gives_zero_contexts_and_trains():
    agent = TD3Context(MQLConfig(history_len=4, hidden_sizes=(8,), context_dim=3), OBS, ACT)
    eps = [Episode("t", np.ones((2, OBS)), np.zeros((1, ACT)), np.ones(1)) for _ in range(3)]
    batch = episodes_to_batch(eps, 4)
    assert torch.all(agent.contexts(batch.hist, batch.hist_len) == 0)
    for _ in range(2):
        assert np.isfinite(agent.update(batch)["critic_loss"])


def test_packed_windows_put_longest_windows_first():
    lens = torch.tensor([2, 0, 3, 1])
    p = PackedWindows.of(torch.zeros(4, 3, 2), lens)
    assert p.counts == [3, 2, 1]
    assert lens[p.order].tolist() == [3, 2, 1, 0]
    assert p.x.shape == (6, 2)


def test_streaming_push_rejects_bad_input_without_changing_state():
    agent = TD3Context(MQLConfig(history_len=4, hidden_sizes=(8,), context_dim=3), OBS, ACT)
    sc = agent.streaming_context()
    sc.push(np.ones(OBS), np.zeros(ACT), 0.5)
    before, steps = sc.context.copy(), sc.steps
    for obs, act, rew in [(np.ones(OBS + 1), np.zeros(ACT), 0.0), (np.ones(OBS), np.zeros(ACT), np.nan),
                          (np.full(OBS, np.inf), np.zeros(ACT), 0.0),
                          (np.ones(OBS), np.zeros(ACT), [1.0, 2.0])]:
        with pytest.raises(InputError):
            sc.push(obs, act, rew)
    assert sc.steps == steps and np.array_equal(sc.context, before)


def test_streaming_context_rejects_weights_of_another_size():
    with pytest.raises(InputError, match="obs_dim"):
        StreamingContext(np.zeros((9, 7)), np.zeros((9, 3)), np.zeros(9), np.zeros(9), 4, obs_dim=OBS + 1,
                         act_dim=ACT)


def _reference(enc, hist, lens):
    out, _ = enc.gru(hist)
    return out[torch.arange(hist.shape[0]), (lens - 1).clamp(min=0)] * (lens > 0)[:, None]


@pytest.mark.parametrize("steps", [7, 12])  # 12 > H: windows slide, so the shared pass must not be used
def test_one_pass_for_now_and_next_windows_matches_separate_torch_grus(steps):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    h = 8
    episodes = [_episode(rng, steps), _episode(rng, 3)]
    batch = episodes_to_batch(episodes, h)
    now = [ContextEncoder(ACT + 1 + OBS, 5).double() for _ in range(2)]
    nxt = [ContextEncoder(ACT + 1 + OBS, 5).double() for _ in range(2)]
    hist, nhist = batch.hist.double(), batch.next_hist.double()
    z_now, z_nxt = encode_windows(now, nxt, hist, batch.hist_len, nhist, batch.next_hist_len)
    for enc, z in zip(nxt, z_nxt, strict=True):
        torch.testing.assert_close(z, _reference(enc, nhist, batch.next_hist_len).detach())
    g = torch.randn(len(batch), 5, dtype=torch.float64)
    for enc, z in zip(now, z_now, strict=True):
        ref = _reference(enc, hist, batch.hist_len)
        torch.testing.assert_close(z, ref.detach())
        (z * g).sum().backward()
        mine = [p.grad.clone() for p in enc.gru.parameters()]
        enc.zero_grad()
        (ref * g).sum().backward()
        for a, b in zip(mine, [p.grad for p in enc.gru.parameters()], strict=True):
            torch.testing.assert_close(a, b)


needs_kernel = pytest.mark.skipif(networks._gru_kernel is None, reason="the C GRU kernel is not built")


@needs_kernel
@pytest.mark.parametrize("steps", [7, 30])  # 7 < H: one shifted pass for now and next windows; 30: two passes
def test_c_kernel_matches_the_numpy_steps_in_float32_values_and_gradients(steps, monkeypatch):
    rng = np.random.default_rng(1)
    batch = episodes_to_batch([_episode(rng, steps), _episode(rng, 40), _episode(rng, 1)], 16)
    torch.manual_seed(0)
    now = [ContextEncoder(ACT + 1 + OBS, 6) for _ in range(2)]
    nxt = [ContextEncoder(ACT + 1 + OBS, 6)]
    g = torch.randn(len(batch), 6)

    def contexts_and_grads():
        for e in now:
            e.zero_grad()
        z_now, z_nxt = encode_windows(now, nxt, batch.hist, batch.hist_len, batch.next_hist, batch.next_hist_len)
        sum((z * g).sum() for z in z_now).backward()
        return [z.detach() for z in z_now + z_nxt], [p.grad.clone() for e in now for p in e.gru.parameters()]

    compiled = contexts_and_grads()
    monkeypatch.setattr(networks, "_gru_kernel", None)
    reference = contexts_and_grads()
    for a, b in zip(compiled[0] + compiled[1], reference[0] + reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_c_kernel_rejects_arrays_of_the_wrong_size_or_type_before_writing():
    k, c, e, total, batch, steps = 1, 2, 3, 3, 2, 2
    f = np.float32
    args = dict(xt=np.zeros((e, total), f), w_ih=np.zeros((k, 3 * c, e), f), b_ih=np.zeros((k, 3 * c), f),
                w_hh=np.zeros((k, 3 * c, c), f), b_hh=np.zeros((k, 3 * c), f), counts=np.array([2, 1]),
                offsets=np.array([0, 2]), h=np.zeros((k, c, batch), f), prev=np.zeros((k, c, total), f),
                rz=np.zeros((k, 2 * c, total), f), new=np.zeros((k, c, total), f), ghn=np.zeros((k, c, total), f))
    run = networks._gru_kernel.gru_forward
    run(k, c, e, total, batch, steps, *args.values())  # the right sizes work
    for name, bad, error in [("xt", np.zeros((e, total + 1), f), ValueError),
                             ("w_hh", np.zeros((k, 3 * c, c)), TypeError),
                             ("offsets", np.array([0, 3]), ValueError),  # step 1 would run past the end
                             ("counts", np.array([3, 1]), ValueError)]:  # more rows than the batch
        sentinel = np.full((k, c, total), 7.0, f)
        with pytest.raises(error):
            run(k, c, e, total, batch, steps, *{**args, name: bad, "prev": sentinel}.values())
        assert np.all(sentinel == 7.0), f"bad {name}: the kernel wrote before refusing"


@needs_kernel
def test_c_kernel_keeps_a_nan_a_nan():
    enc = ContextEncoder(ACT + 1 + OBS, 4)
    with torch.no_grad():
        enc.gru.weight_ih_l0[0, 0] = float("nan")
    hist = torch.ones(2, 3, ACT + 1 + OBS)
    assert torch.isnan(enc(hist, torch.tensor([3, 2]))).any()


def test_input_scale_is_one_over_the_std_of_each_entry_feature_floored():
    rng = np.random.default_rng(0)
    eps = [_episode(rng, 30) for _ in range(3)]
    for e in eps:
        e.observations[:, 0] *= 8.0  # a fast feature (like a joint velocity)
        e.observations[:, 1] = 0.25  # a constant one
    entries = np.concatenate([context_entries(e) for e in eps])
    scale = context_input_scale(eps, floor=0.01)
    np.testing.assert_allclose(scale, 1.0 / np.maximum(entries.std(0), 0.01), rtol=1e-6)
    assert scale[ACT + 1 + 1] == pytest.approx(100.0)  # constant: the floor, not a division by zero
    assert np.std(entries * scale, axis=0)[ACT + 1] == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(InputError, match="at least one"):
        context_input_scale([])
    bad = _episode(rng, 3)
    bad.rewards[1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        context_input_scale([bad])


def test_a_scaled_encoder_equals_a_torch_gru_on_scaled_entries_values_gradients_and_streaming():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    e = ACT + 1 + OBS
    enc = ContextEncoder(e, 5)
    scale = torch.from_numpy(rng.uniform(0.1, 10.0, e).astype(np.float32))
    enc.input_scale.copy_(scale)
    ep = _episode(rng, 9)
    batch = episodes_to_batch([ep], 6)
    out = enc(batch.hist, batch.hist_len)
    ref = _reference(enc, batch.hist * scale, batch.hist_len)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape)
    (out * g).sum().backward()
    mine = [p.grad.clone() for p in enc.gru.parameters()]
    enc.zero_grad()
    (ref * g).sum().backward()
    for a, b in zip(mine, [p.grad for p in enc.gru.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sc = StreamingContext.from_encoder(enc, 6, OBS, ACT)
    streamed = [sc.push(ep.observations[k], ep.actions[k], ep.rewards[k]).copy() for k in range(len(ep))]
    np.testing.assert_allclose(streamed[-1], enc(batch.next_hist, batch.next_hist_len)[-1].detach(), atol=1e-5)


def test_the_agent_sets_one_input_scale_on_every_encoder_and_refuses_a_bad_one():
    agent = TD3Context(MQLConfig(history_len=4, hidden_sizes=(8,), context_dim=3), OBS, ACT)
    scale = np.linspace(0.5, 2.0, ACT + 1 + OBS)
    agent.set_context_input_scale(scale)
    encoders = [n[k] for n in (agent.nets, agent.targets) for k in ("critic_encoder", "actor_encoder")]
    for enc in encoders:
        np.testing.assert_allclose(enc.input_scale.numpy(), scale, rtol=1e-6)
    for bad in (np.ones(3), np.r_[np.ones(ACT + OBS), np.nan], np.r_[np.ones(ACT + OBS), 0.0]):
        with pytest.raises(InputError, match="set_context_input_scale"):
            agent.set_context_input_scale(bad)
        np.testing.assert_allclose(encoders[0].input_scale.numpy(), scale, rtol=1e-6)
