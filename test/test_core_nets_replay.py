"""MultiTaskReplay: windows equal a slow per-sample reference, FIFO by episode, task filters, bad input."""

import numpy as np
import pytest
import torch

from mql_ros.core.context import context_entries
from mql_ros.core.episode import Episode, newest_within
from mql_ros.core.errors import InputError
from mql_ros.core.replay import Batch, MultiTaskReplay, episodes_to_batch

torch.set_num_threads(1)
OBS, ACT, H = 3, 2, 4


def _episode(rng, steps, task, terminated=False):
    return Episode(task, rng.normal(size=(steps + 1, OBS)), rng.uniform(-1, 1, (steps, ACT)),
                   rng.normal(size=steps), terminated)


def _reference_window(ep, t):
    entries = context_entries(ep)
    win = np.zeros((H, ACT + 1 + OBS), dtype=np.float32)
    rows = entries[max(0, t - H):t]
    win[: len(rows)] = rows
    return win, len(rows)


def _check_rows(batch: Batch, episodes, store):
    where = {(ep.observations[t].tobytes(), ep.actions[t].tobytes()): (ep, t)
             for ep in episodes for t in range(len(ep))}
    for i in range(len(batch)):
        ep, t = where[(batch.obs[i].numpy().tobytes(), batch.actions[i].numpy().tobytes())]
        win, n = _reference_window(ep, t)
        nwin, nn = _reference_window(ep, t + 1)
        np.testing.assert_array_equal(batch.hist[i].numpy(), win)
        np.testing.assert_array_equal(batch.next_hist[i].numpy(), nwin)
        assert (batch.hist_len[i], batch.next_hist_len[i]) == (n, nn)
        np.testing.assert_array_equal(batch.next_obs[i].numpy(), ep.observations[t + 1])
        assert batch.rewards[i, 0] == ep.rewards[t]
        assert batch.not_done[i, 0] == (0.0 if ep.terminated and t == len(ep) - 1 else 1.0)
        assert store.task_ids()[batch.task_index[i]] == ep.task_id


def test_sampled_windows_match_slow_reference_across_ring_wraparound():
    rng = np.random.default_rng(0)
    store = MultiTaskReplay(H, capacity=40)
    episodes = [_episode(rng, int(rng.integers(1, 12)), f"task{i % 3}", terminated=bool(i % 2))
                for i in range(15)]
    for ep in episodes:
        store.add_episode(ep)
    kept = episodes[-len(store._episodes):]
    assert store.num_transitions() == sum(len(e) for e in kept) <= 40
    _check_rows(store.sample(64, rng), kept, store)


def test_arrays_grow_with_the_data_and_wrap_only_at_capacity():
    rng = np.random.default_rng(6)
    store = MultiTaskReplay(H, capacity=3000)
    episodes = [_episode(rng, 150, f"task{i % 4}") for i in range(25)]
    store.add_episode(episodes[0])
    assert store._entries.shape[0] == 1024  # not the full capacity up front
    for ep in episodes[1:]:
        store.add_episode(ep)
    assert store._entries.shape[0] == 3000 and store.num_transitions() == 3000
    _check_rows(store.sample(64, rng), episodes[-20:], store)


def test_fifo_eviction_drops_whole_oldest_episodes():
    rng = np.random.default_rng(1)
    store = MultiTaskReplay(H, capacity=10)
    for i, steps in enumerate([4, 4, 4]):
        store.add_episode(_episode(rng, steps, f"task{i}"))
    assert store.num_transitions("task0") == 0 and store.num_transitions() == 8
    assert store.task_ids() == ["task0", "task1", "task2"]


def test_sample_restricted_to_tasks_and_recent_returns_latest_transitions():
    rng = np.random.default_rng(2)
    store = MultiTaskReplay(H)
    eps = [_episode(rng, 5, "a"), _episode(rng, 5, "b"), _episode(rng, 5, "a")]
    for e in eps:
        store.add_episode(e)
    b = store.sample(50, rng, task_ids=["b"])
    assert set(b.task_index.tolist()) == {1}
    recent = store.recent("a", 7)
    expected = np.concatenate([eps[0].observations[3:5], eps[2].observations[:5]])
    np.testing.assert_array_equal(recent.obs.numpy(), expected)
    _check_rows(recent, eps, store)
    with pytest.raises(InputError, match="no task 'zzz'"):
        store.sample(4, rng, task_ids=["zzz"])


def test_episodes_to_batch_holds_every_transition_in_order():
    rng = np.random.default_rng(3)
    eps = [_episode(rng, 3, "x"), _episode(rng, 6, "y")]
    b = episodes_to_batch(eps, H)
    assert len(b) == 9
    np.testing.assert_array_equal(b.actions.numpy(), np.concatenate([e.actions for e in eps]))
    assert b.task_index.tolist() == [0] * 3 + [1] * 6


def test_replay_rejects_wrong_dims_and_nan():
    rng = np.random.default_rng(4)
    store = MultiTaskReplay(H)
    store.add_episode(_episode(rng, 3, "a"))
    with pytest.raises(InputError, match="obs_dim=4"):
        store.add_episode(Episode("b", np.zeros((4, OBS + 1)), np.zeros((3, ACT)), np.zeros(3)))
    with pytest.raises(InputError, match="NaN"):
        Episode("c", np.full((4, OBS), np.nan), np.zeros((3, ACT)), np.zeros(3))
    ep = _episode(rng, 3, "d")
    ep.observations[1, 0] = np.nan  # arrays are mutable after validation: the replay checks again
    with pytest.raises(InputError, match="NaN"):
        store.add_episode(ep)
    assert store.num_transitions() == 3 and store.task_ids() == ["a"]
    with pytest.raises(InputError, match="capacity"):
        MultiTaskReplay(H, capacity=2).add_episode(_episode(rng, 3, "e"))


def test_batch_concat_and_subset_keep_rows():
    rng = np.random.default_rng(5)
    b1 = episodes_to_batch([_episode(rng, 3, "a")], H)
    b2 = episodes_to_batch([_episode(rng, 2, "b")], H + 2)
    both = Batch.concat([b1, b2])
    assert len(both) == 5 and both.hist.shape[1] == H + 2
    torch.testing.assert_close(both.subset([3, 4]).obs, b2.obs)


def test_newest_within_keeps_the_newest_whole_episodes_up_to_the_transition_budget():
    rng = np.random.default_rng(0)
    episodes = [_episode(rng, steps, f"t/{i}") for i, steps in enumerate((5, 7, 3, 4))]
    assert [e.task_id for e in newest_within(episodes, 7)] == ["t/2", "t/3"]
    assert [e.task_id for e in newest_within(episodes, 14)] == ["t/1", "t/2", "t/3"]
    assert [e.task_id for e in newest_within(episodes, 100)] == ["t/0", "t/1", "t/2", "t/3"]
    assert [e.task_id for e in newest_within(episodes, 2)] == ["t/3"], "the newest is kept even if larger"
    with pytest.raises(InputError, match="max_transitions must be >= 1"):
        newest_within(episodes, 0)


def test_an_episodes_total_reward_is_summed_in_float64():
    # 2**24 + 1 + 1: a float32 running sum rounds each +1 away (2**24 is where float32 spacing becomes 2)
    rewards = np.array([2.0**24, 1.0, 1.0])
    episode = Episode("t", np.zeros((4, 1)), np.zeros((3, 1)), rewards)
    assert float(episode.rewards.sum()) == 2.0**24  # what summing the float32 array itself gives
    assert episode.total_reward == 2.0**24 + 2.0


def test_loading_a_saved_episode_cut_short_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "episode.npz"
    episode = _episode(np.random.default_rng(0), 5, "t")
    episode.save(path)
    np.testing.assert_array_equal(Episode.load(path).rewards, episode.rewards)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match=f"{path} is not a saved episode"):
        Episode.load(path)


def test_unused_path_skips_names_an_earlier_run_left_so_nothing_is_overwritten(tmp_path):
    """The adaptation node names saved episodes <task>_<count>.npz with a count from its start; a restarted node
    wrote over the first run's files (found by an audit)."""
    from mql_ros.core.paths import unused_path

    first = unused_path(tmp_path, "arm_reach/test 0", first=1, digits=5, suffix=".npz")
    assert first == tmp_path / "arm_reach_test_0_00001.npz"
    first.write_bytes(b"earlier run")
    (tmp_path / "arm_reach_test_0_00002.npz").write_bytes(b"earlier run")
    again = unused_path(tmp_path, "arm_reach/test 0", first=1, digits=5, suffix=".npz")
    assert again.name == "arm_reach_test_0_00003.npz"
    assert first.read_bytes() == b"earlier run"
