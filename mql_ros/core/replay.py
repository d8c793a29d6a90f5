"""Multi-task replay that keeps whole episodes, so every transition's context window can be rebuilt.

The store is a ring of preallocated numpy arrays holding context entries (a_t, r_t, s_t) per transition;
an episode occupies consecutive ring slots, so the window of step t is a slice of its episode and a batch
of windows is one fancy-indexing gather. Eviction is FIFO by whole episode. Anything else holding
episodes (the rosbag2 archive) can serve adaptation by following the ReplayStore protocol.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mql_ros.core.context import entry_dim
from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError


@dataclass
class Batch:
    """Transitions with their context windows, as float32 torch tensors (index tensors long).

    hist[i, :hist_len[i]] holds the entries of steps max(0, t-H) .. t-1 (left-aligned, zero padded);
    next_hist is the window before step t+1. task_index points into the store's task_ids().
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    not_done: Tensor
    hist: Tensor
    hist_len: Tensor
    next_hist: Tensor
    next_hist_len: Tensor
    task_index: Tensor

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def subset(self, index: Tensor | np.ndarray) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        return Batch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """One batch of all rows (windows padded to the longest H among them)."""
        if not batches:
            raise InputError("Batch.concat: no batches")
        width = max(b.hist.shape[1] for b in batches)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))

        out = {}
        for f in fields(Batch):
            parts = [getattr(b, f.name) for b in batches]
            if f.name in ("hist", "next_hist"):
                parts = [pad(p) for p in parts]
            out[f.name] = torch.cat(parts)
        return Batch(**out)


class ReplayStore(Protocol):
    """What meta-training and adaptation need from a replay (in memory here, or the rosbag2 archive)."""

    history_len: int

    def add_episode(self, episode: Episode) -> None: ...

    def task_ids(self) -> list[str]: ...

    def num_transitions(self, task_id: str | None = None) -> int: ...

    def sample(self, batch_size: int, rng: np.random.Generator,
               task_ids: Sequence[str] | None = None) -> Batch: ...

    def recent(self, task_id: str, n: int) -> Batch: ...


class MultiTaskReplay:
    """In-memory ReplayStore: episode-structured, FIFO over `capacity` transitions, uniform sampling."""

    def __init__(self, history_len: int, capacity: int = 1_000_000):
        if int(history_len) < 1 or int(capacity) < 1:
            raise InputError(f"MultiTaskReplay: history_len and capacity must be >= 1, got {history_len}, "
                             f"{capacity}")
        self.history_len = int(history_len)
        self.capacity = int(capacity)
        self.obs_dim: int | None = None
        self.act_dim: int | None = None
        self._tasks: list[str] = []
        self._task_index: dict[str, int] = {}
        self._episodes: deque[tuple[int, int, int]] = deque()  # (first slot, length, task), oldest first
        self._task_counts: list[int] = []
        self._task_slots: dict[int, np.ndarray] = {}  # cache of each task's slots, dropped when it changes
        self._oldest = 0
        self._size = 0

    def _allocate(self, obs_dim: int, act_dim: int) -> None:
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self._entries = np.zeros((0, entry_dim(obs_dim, act_dim)), dtype=np.float32)
        self._next_obs = np.zeros((0, obs_dim), dtype=np.float32)
        self._not_done = np.ones(0, dtype=np.float32)
        self._ep_start = np.zeros(0, dtype=np.int64)  # ring slot of the episode's step 0
        self._step = np.zeros(0, dtype=np.int64)  # t within the episode
        self._task = np.zeros(0, dtype=np.int64)

    def _reserve(self, n: int) -> None:
        """Grow the arrays (doubling, at most to capacity) so a small replay never holds a full-size
        allocation; the ring wraps only once they have reached capacity."""
        have = self._entries.shape[0]
        if n <= have:
            return
        size = min(self.capacity, max(n, 2 * have, 1024))
        for name in ("_entries", "_next_obs", "_not_done", "_ep_start", "_step", "_task"):
            old = getattr(self, name)
            grown = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
            grown[:have] = old
            setattr(self, name, grown)

    def add_episode(self, episode: Episode) -> None:
        """Store every transition of `episode`, evicting the oldest whole episodes to make room."""
        if not isinstance(episode, Episode):
            raise InputError(f"add_episode: expected an Episode, got {type(episode).__name__}")
        t = len(episode)
        if t == 0:
            return
        if t > self.capacity:
            raise InputError(f"episode {episode.task_id!r} has {t} steps, more than the replay capacity "
                             f"{self.capacity}")
        if self.obs_dim is None:
            self._allocate(episode.obs_dim, episode.act_dim)
        elif (episode.obs_dim, episode.act_dim) != (self.obs_dim, self.act_dim):
            raise InputError(f"episode {episode.task_id!r} has obs_dim={episode.obs_dim}, "
                             f"act_dim={episode.act_dim}; this replay holds obs_dim={self.obs_dim}, "
                             f"act_dim={self.act_dim}")
        for name in ("observations", "actions", "rewards"):
            if not np.all(np.isfinite(getattr(episode, name))):
                raise InputError(f"episode {episode.task_id!r}: {name} contain NaN or inf")
        wraps = self._oldest != 0 or self._size + t > self.capacity
        self._reserve(self.capacity if wraps else self._size + t)
        while self._size + t > self.capacity:
            self._evict_oldest()
        task = self._task_index.get(episode.task_id)
        if task is None:
            task = self._task_index[episode.task_id] = len(self._tasks)
            self._tasks.append(episode.task_id)
            self._task_counts.append(0)
        first = (self._oldest + self._size) % self.capacity
        slots = (first + np.arange(t)) % self.capacity
        act = episode.actions
        self._entries[slots, : self.act_dim] = act
        self._entries[slots, self.act_dim] = episode.rewards
        self._entries[slots, self.act_dim + 1:] = episode.observations[:-1]
        self._next_obs[slots] = episode.observations[1:]
        self._not_done[slots] = 1.0
        if episode.terminated:
            self._not_done[slots[-1]] = 0.0
        self._ep_start[slots] = first
        self._step[slots] = np.arange(t)
        self._task[slots] = task
        self._episodes.append((first, t, task))
        self._size += t
        self._task_counts[task] += t
        self._task_slots.pop(task, None)

    def _evict_oldest(self) -> None:
        first, t, task = self._episodes.popleft()
        self._oldest = (first + t) % self.capacity
        self._size -= t
        self._task_counts[task] -= t
        self._task_slots.pop(task, None)

    def task_ids(self) -> list[str]:
        """Every task ever added, in order of first appearance (indices stay stable after eviction)."""
        return list(self._tasks)

    def num_transitions(self, task_id: str | None = None) -> int:
        if task_id is None:
            return self._size
        index = self._task_index.get(task_id)
        return 0 if index is None else self._task_counts[index]

    def _slots_of(self, task: int) -> np.ndarray:
        slots = self._task_slots.get(task)
        if slots is None:
            parts = [(f + np.arange(n)) % self.capacity for f, n, k in self._episodes if k == task]
            slots = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            self._task_slots[task] = slots
        return slots

    def _known(self, task_id: str) -> int:
        if task_id not in self._task_index:
            raise InputError(f"replay has no task {task_id!r} (it has {len(self._tasks)} tasks)")
        return self._task_index[task_id]

    def sample(self, batch_size: int, rng: np.random.Generator,
               task_ids: Sequence[str] | None = None) -> Batch:
        """`batch_size` transitions drawn uniformly (with replacement) from all, or from `task_ids`."""
        if batch_size < 1:
            raise InputError(f"sample: batch_size must be >= 1, got {batch_size}")
        if task_ids is None:
            if self._size == 0:
                raise InputError("sample: the replay is empty")
            slots = (self._oldest + rng.integers(0, self._size, size=batch_size)) % self.capacity
        else:
            pool = [self._slots_of(self._known(k)) for k in task_ids]
            pool = np.concatenate(pool) if pool else np.zeros(0, dtype=np.int64)
            if pool.shape[0] == 0:
                raise InputError(f"sample: no transitions for tasks {list(task_ids)}")
            slots = pool[rng.integers(0, pool.shape[0], size=batch_size)]
        return self._gather(slots)

    def recent(self, task_id: str, n: int) -> Batch:
        """The latest `n` transitions of one task (fewer if it has fewer), oldest first."""
        slots = self._slots_of(self._known(task_id))
        return self._gather(slots[max(0, slots.shape[0] - int(n)):])

    def all_transitions(self) -> Batch:
        """Every stored transition, oldest first."""
        return self._gather((self._oldest + np.arange(self._size)) % self.capacity)

    def _windows(self, start: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-aligned windows of steps max(0, t-H) .. t-1 of the episodes starting at ring slots `start`."""
        h = self.history_len
        length = np.minimum(t, h)
        offsets = np.arange(h)
        idx = (start[:, None] + (t - length)[:, None] + offsets[None, :]) % self.capacity
        win = self._entries[idx]
        win[offsets[None, :] >= length[:, None]] = 0.0
        return win, length

    def _gather(self, slots: np.ndarray) -> Batch:
        if self.obs_dim is None:
            raise InputError("the replay is empty")
        entries = self._entries[slots]
        start, t = self._ep_start[slots], self._step[slots]
        hist, hist_len = self._windows(start, t)
        next_hist, next_len = self._windows(start, t + 1)
        a = self.act_dim
        return Batch(
            obs=torch.from_numpy(np.ascontiguousarray(entries[:, a + 1:])),
            actions=torch.from_numpy(np.ascontiguousarray(entries[:, :a])),
            rewards=torch.from_numpy(np.ascontiguousarray(entries[:, a: a + 1])),
            next_obs=torch.from_numpy(self._next_obs[slots]),
            not_done=torch.from_numpy(self._not_done[slots][:, None]),
            hist=torch.from_numpy(hist), hist_len=torch.from_numpy(hist_len),
            next_hist=torch.from_numpy(next_hist), next_hist_len=torch.from_numpy(next_len),
            task_index=torch.from_numpy(self._task[slots]))



class EpisodeReplay:
    """ReplayStore over Episodes left where they are (the archive's memory-mapped caches): nothing is
    copied up front, a batch gathers only its rows, so an archive larger than RAM can be sampled. Same
    Batch contents as MultiTaskReplay for the same transitions; no capacity and no eviction."""

    def __init__(self, history_len: int, episodes: Sequence[Episode] = ()) -> None:
        if int(history_len) < 1:
            raise InputError(f"EpisodeReplay: history_len must be >= 1, got {history_len}")
        self.history_len = int(history_len)
        self.obs_dim: int | None = None
        self.act_dim: int | None = None
        self._episodes: list[Episode] = []
        self._ep_task: list[int] = []
        self._tasks: list[str] = []
        self._task_index: dict[str, int] = {}
        self._index: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}  # task -> (episodes, cum. lengths)
        for e in episodes:
            self.add_episode(e)

    def add_episode(self, episode: Episode) -> None:
        if not isinstance(episode, Episode):
            raise InputError(f"add_episode: expected an Episode, got {type(episode).__name__}")
        if len(episode) == 0:
            return
        if self.obs_dim is None:
            self.obs_dim, self.act_dim = episode.obs_dim, episode.act_dim
        elif (episode.obs_dim, episode.act_dim) != (self.obs_dim, self.act_dim):
            raise InputError(f"episode {episode.task_id!r} has obs_dim={episode.obs_dim}, "
                             f"act_dim={episode.act_dim}; this replay holds obs_dim={self.obs_dim}, "
                             f"act_dim={self.act_dim}")
        if episode.task_id not in self._task_index:
            self._task_index[episode.task_id] = len(self._tasks)
            self._tasks.append(episode.task_id)
        self._episodes.append(episode)
        self._ep_task.append(self._task_index[episode.task_id])
        self._index.clear()

    def task_ids(self) -> list[str]:
        return list(self._tasks)

    def _pool(self, task: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(episode numbers, cumulative lengths starting at 0) of one task, or of all (None)."""
        if task not in self._index:
            eps = np.array([i for i, k in enumerate(self._ep_task) if task is None or k == task], dtype=np.int64)
            lengths = np.array([len(self._episodes[i]) for i in eps], dtype=np.int64)
            self._index[task] = (eps, np.concatenate([[0], np.cumsum(lengths)]))
        return self._index[task]

    def num_transitions(self, task_id: str | None = None) -> int:
        if task_id is not None and task_id not in self._task_index:
            return 0
        return int(self._pool(None if task_id is None else self._task_index[task_id])[1][-1])

    def _known(self, task_id: str) -> int:
        if task_id not in self._task_index:
            raise InputError(f"replay has no task {task_id!r} (it has {len(self._tasks)} tasks)")
        return self._task_index[task_id]

    def _locate(self, task: int | None, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        eps, cum = self._pool(task)
        pos = np.searchsorted(cum, flat, side="right") - 1
        return eps[pos], flat - cum[pos]

    def sample(self, batch_size: int, rng: np.random.Generator,
               task_ids: Sequence[str] | None = None) -> Batch:
        """`batch_size` transitions drawn uniformly (with replacement) from all, or from `task_ids`."""
        if batch_size < 1:
            raise InputError(f"sample: batch_size must be >= 1, got {batch_size}")
        tasks = [None] if task_ids is None else [self._known(k) for k in task_ids]
        sizes = np.array([self._pool(k)[1][-1] for k in tasks], dtype=np.int64)
        if sizes.sum() == 0:
            raise InputError("sample: the replay is empty" if task_ids is None
                             else f"sample: no transitions for tasks {list(task_ids)}")
        flat = rng.integers(0, int(sizes.sum()), size=batch_size)
        which = np.searchsorted(np.cumsum(sizes), flat, side="right")
        offset = np.concatenate([[0], np.cumsum(sizes)])
        ep, t = np.zeros(batch_size, dtype=np.int64), np.zeros(batch_size, dtype=np.int64)
        for j, task in enumerate(tasks):
            sel = which == j
            ep[sel], t[sel] = self._locate(task, flat[sel] - offset[j])
        return self._gather(ep, t)

    def recent(self, task_id: str, n: int) -> Batch:
        """The latest `n` transitions of one task (fewer if it has fewer), oldest first."""
        task = self._known(task_id)
        total = self.num_transitions(task_id)
        return self._gather(*self._locate(task, np.arange(max(0, total - int(n)), total)))

    def all_transitions(self) -> Batch:
        """Every transition, in the order added."""
        return self._gather(*self._locate(None, np.arange(self.num_transitions())))

    def _gather(self, ep: np.ndarray, t: np.ndarray) -> Batch:
        if self.obs_dim is None:
            raise InputError("the replay is empty")
        h, a, n = self.history_len, self.act_dim, ep.shape[0]
        width = entry_dim(self.obs_dim, a)
        obs = np.empty((n, self.obs_dim), np.float32)
        next_obs = np.empty((n, self.obs_dim), np.float32)
        actions = np.empty((n, a), np.float32)
        rewards = np.empty((n, 1), np.float32)
        not_done = np.ones((n, 1), np.float32)
        hist = np.zeros((n, h, width), np.float32)
        next_hist = np.zeros((n, h, width), np.float32)
        hist_len = np.minimum(t, h)
        next_len = np.minimum(t + 1, h)
        for i, (e, k) in enumerate(zip(ep.tolist(), t.tolist(), strict=True)):
            episode = self._episodes[e]
            lo = max(0, k - h)
            rows = slice(lo, k + 1)  # the entries (a, r, s) of steps lo .. k
            block = np.concatenate([episode.actions[rows], episode.rewards[rows, None],
                                    episode.observations[rows]], axis=1)
            hist[i, : k - lo] = block[:-1]
            next_hist[i, : next_len[i]] = block[k + 1 - next_len[i] - lo:]
            obs[i], actions[i], rewards[i, 0] = block[-1, a + 1:], block[-1, :a], block[-1, a]
            next_obs[i] = episode.observations[k + 1]
            if episode.terminated and k == len(episode) - 1:
                not_done[i, 0] = 0.0
        task = np.array(self._ep_task, dtype=np.int64)[ep]
        return Batch(obs=torch.from_numpy(obs), actions=torch.from_numpy(actions),
                     rewards=torch.from_numpy(rewards), next_obs=torch.from_numpy(next_obs),
                     not_done=torch.from_numpy(not_done), hist=torch.from_numpy(hist),
                     hist_len=torch.from_numpy(hist_len), next_hist=torch.from_numpy(next_hist),
                     next_hist_len=torch.from_numpy(next_len), task_index=torch.from_numpy(task))

def episodes_to_batch(episodes: Sequence[Episode], history_len: int) -> Batch:
    """Every transition of `episodes`, in order, with their windows."""
    total = sum(len(e) for e in episodes)
    if total == 0:
        raise InputError("episodes_to_batch: the episodes hold no transitions")
    store = MultiTaskReplay(history_len, capacity=total)
    for e in episodes:
        store.add_episode(e)
    return store.all_transitions()
